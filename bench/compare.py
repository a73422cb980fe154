"""Head-to-head pruning: the same one-shot pipeline for every importance method, several seeds, mean ± std.

    python bench/compare.py --config configs/fashion_mnist.py --pretrained runs/fashion_mnist/dense \
        --out bench/results/vgg [--seeds 3] [--methods oba,fastoba,taylor,magnitude,random] \
        [--targets 0.5,0.3,0.15] [--keeps 0.5,0.3,0.1] [--finetune-steps 100] [--only structured|unstructured] \
        [--config.KEY=VALUE ...]

Every run is `prune.py`'s own pipeline (`oba_jax.experiment.pipelines.run`) from the dense model of
`--pretrained`, with the config's settings except:

* structured (`prune.mode=oneshot`): `prune.importance` = the method, `prune.ops_ratios` = `--targets`; per
  target the accuracy right after pruning and after `--finetune-steps` steps of fine-tuning, the achieved
  ops and parameter ratios, and the latency of the jitted forward (dense and pruned);
* unstructured (`prune.mode=unstructured`, every method through the same progressive schedule):
  accuracy at each of `--keeps` (no fine-tuning), the one-shot 2:4 masks before and after fine-tuning, and the
  final masks (the lowest keep) after fine-tuning. Each method in its standard mask form (README).

A seed sets `prune.seed` (the scoring sample, and the random method's scores) and `train.seed` (the
fine-tuning order); the dense model is the same for all. Runs go to OUT/structured/<method>/seed<k> and
OUT/unstructured/seed<k>; a finished run is reused (the pipelines' manifests), so an interrupted command
continues; `--tables-only` rebuilds the tables and plots from the reports in OUT without running anything.
Writes OUT/compare.json, OUT/compare.md (the tables), OUT/structured.png, OUT/unstructured.png. Latency is
reported as the ratio pruned / dense of each run (both forwards timed in the same alternating rounds).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from oba_jax.experiment import config as config_lib  # noqa: E402
from oba_jax.experiment import pipelines, runs  # noqa: E402
from oba_jax.experiment.pipelines.reports import StructuredReport, UnstructuredReport  # noqa: E402

METHODS = ("oba", "fastoba", "taylor", "magnitude", "random")


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in text.split(",") if t)


def parse(argv: Sequence[str]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Other --config.KEY=VALUE arguments override the config.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--pretrained", required=True, help="a train.py workdir of the config's model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--targets", type=_floats, default=(0.5, 0.3, 0.15), help="structured ops ratios")
    ap.add_argument("--keeps", type=_floats, default=(0.5, 0.3, 0.1), help="unstructured keep ratios")
    ap.add_argument("--finetune-steps", type=int, default=100)
    ap.add_argument("--only", choices=("structured", "unstructured"))
    ap.add_argument("--tables-only", action="store_true",
                    help="rebuild the tables and plots from the reports already in OUT (runs nothing)")
    rest, overrides = config_lib.split_override_args(argv)
    args = ap.parse_args(rest)
    args.methods = tuple(m for m in args.methods.split(",") if m)
    if args.seeds < 1 or args.finetune_steps < 1:
        ap.error("--seeds and --finetune-steps must be >= 1")
    if not args.methods:
        ap.error("--methods names no method")
    from oba_jax import METHODS as known
    unknown = [m for m in args.methods if m not in known]
    if unknown:
        ap.error(f"--methods: {unknown} are not importance methods; choose from {sorted(known)}")
    if not os.path.isdir(args.pretrained):
        ap.error(f"--pretrained {args.pretrained!r} is not a directory (give a train.py --workdir)")
    return args, overrides


def _config(args, overrides, **settings):
    extra = [(k.replace("__", "."), repr(v) if not isinstance(v, str) else v) for k, v in settings.items()]
    return config_lib.load_config(args.config, [*overrides, ("prune.pretrained", args.pretrained),
                                                ("finetune.max_steps", str(args.finetune_steps)),
                                                ("plot.enabled", "False"), *extra])


def _report(args, workdir: str, config_of):
    """The run's report: read from `workdir` with --tables-only (a clear exit if it is missing), else run."""
    if args.tables_only:
        if not os.path.isfile(os.path.join(workdir, pipelines.REPORT_FILE)):
            raise SystemExit(f"--tables-only: {workdir} has no {pipelines.REPORT_FILE}; run without --tables-only")
        return pipelines.load_report(workdir)
    return pipelines.run(config_of(), workdir)


def run_structured(args, overrides) -> dict[str, list[StructuredReport]]:
    out: dict[str, list[StructuredReport]] = {}
    for method in args.methods:
        for seed in range(args.seeds):
            print(f"== structured: {method}, seed {seed}", flush=True)
            config_of = lambda: _config(args, overrides, prune__mode="oneshot", prune__importance=method,  # noqa: E731
                                        prune__ops_ratios=tuple(args.targets), prune__seed=seed, train__seed=seed)
            report = _report(args, os.path.join(args.out, "structured", method, f"seed{seed}"), config_of)
            out.setdefault(method, []).append(report)
    return out


def run_unstructured(args, overrides) -> list[UnstructuredReport]:
    out = []
    first, *others = args.methods
    for seed in range(args.seeds):
        print(f"== unstructured: seed {seed}", flush=True)
        config_of = lambda: _config(  # noqa: E731
            args, overrides, prune__mode="unstructured", prune__importance=first, prune__compare=tuple(others),
            prune__keep_ratio=min(args.keeps), prune__report_keep_ratios=tuple(sorted(args.keeps, reverse=True)),
            prune__n_m=(2, 4), prune__seed=seed, train__seed=seed)
        out.append(_report(args, os.path.join(args.out, "unstructured", f"seed{seed}"), config_of))
    return out


def _ms(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


def summarise_structured(reports: Mapping[str, Sequence[StructuredReport]]) -> dict:
    out = {}
    for method, rs in reports.items():
        rows = {}
        for k, first in enumerate(rs[0].targets):
            ts = [r.targets[k] for r in rs]
            rows[f"{first.target_ops_ratio:g}"] = {
                "ops_ratio": _ms([t.ops_ratio for t in ts]), "params_ratio": _ms([t.params_ratio for t in ts]),
                "acc_pruned": _ms([100 * t.acc_pruned for t in ts]),
                "acc_finetuned": _ms([100 * t.acc_finetuned for t in ts]),
                "latency_pruned_ms": _ms([t.latency_pruned_ms for t in ts]),
                "latency_dense_ms": _ms([t.latency_dense_ms for t in ts]),
                # per run, both timed in the same alternating rounds: comparable where the milliseconds of
                # runs made at different times on a shared machine are not
                "latency_ratio": _ms([t.latency_pruned_ms / t.latency_dense_ms for t in ts]),
                "acc_dense": 100 * first.acc_dense}
        out[method] = rows
    return out


def summarise_unstructured(reports: Sequence[UnstructuredReport]) -> dict:
    out = {}
    for method in reports[0].methods:
        rs = [r.results[method] for r in reports]
        row = {f"keep {pt.target_keep_ratio:g}": _ms([100 * r.points[i].acc for r in rs])
               for i, pt in enumerate(rs[0].points)}
        if all(r.final.acc_finetuned is not None for r in rs):
            row[f"keep {reports[0].keep_ratio:g}, fine-tuned"] = _ms([100 * r.final.acc_finetuned for r in rs])
        if all(r.n_m is not None for r in rs):
            row["2:4"] = _ms([100 * r.n_m.acc for r in rs])
            if all(r.n_m.acc_finetuned is not None for r in rs):
                row["2:4, fine-tuned"] = _ms([100 * r.n_m.acc_finetuned for r in rs])
        out[method] = row
    return out


def _pm(s: Mapping[str, float]) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def markdown(summary: Mapping) -> str:
    lines = [f"Head to head on `{summary['config']}` ({summary['seeds']} seeds, fine-tuning "
             f"{summary['finetune_steps']} steps; {summary['machine']}, jax {summary['jax']}, "
             f"{summary['seconds']:.0f} s)", ""]
    s = summary.get("structured")
    if s:
        dense = next(iter(next(iter(s.values())).values()))["acc_dense"]
        lines += [f"Structured, one-shot (dense top-1 {dense:.2f}%): top-1 % mean ± std over seeds", "",
                  "| method | target ops | ops ratio | params ratio | pruned | fine-tuned | latency pruned / dense |",
                  "|---|---|---|---|---|---|---|"]
        for method, rows in s.items():
            for target, r in rows.items():
                lines.append(f"| {method} | {target} | {r['ops_ratio']['mean']:.3f} | {r['params_ratio']['mean']:.3f} |"
                             f" {_pm(r['acc_pruned'])} | {_pm(r['acc_finetuned'])} | "
                             f"{r['latency_ratio']['mean']:.2f} ± {r['latency_ratio']['std']:.2f} |")
        lines.append("")
    u = summary.get("unstructured")
    if u:
        cols = list(next(iter(u.values())))
        lines += ["Unstructured (progressive schedule; each method in its standard mask form): top-1 % mean ± std", "",
                  "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for method, row in u.items():
            lines.append(f"| {method} | " + " | ".join(_pm(row[c]) if c in row else "–" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: Mapping, out: str) -> None:
    plt = runs.pyplot()
    s = summary.get("structured")
    if s:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=False)
        for i, (method, rows) in enumerate(s.items()):
            x = [r["ops_ratio"]["mean"] for r in rows.values()]
            for ax, key in zip(axes, ("acc_pruned", "acc_finetuned")):
                ax.errorbar(x, [r[key]["mean"] for r in rows.values()], yerr=[r[key]["std"] for r in rows.values()],
                            marker="o", capsize=3, label=method, color=f"C{i}")
        for ax, title in zip(axes, ("right after pruning", "after fine-tuning")):
            ax.set_xlabel("ops ratio (pruned / dense MACs)")
            ax.set_title(title, fontsize=10)
            ax.invert_xaxis()
        axes[0].set_ylabel("test top-1 (%)")
        axes[1].legend(fontsize=8)
        runs.save_figure(fig, out, "structured.png")
    u = summary.get("unstructured")
    if u:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for i, (method, row) in enumerate(u.items()):
            keys = [k for k in row if k.startswith("keep") and "fine" not in k]
            ax.errorbar([float(k.split()[1]) for k in keys], [row[k]["mean"] for k in keys],
                        yerr=[row[k]["std"] for k in keys], marker="o", capsize=3, label=method, color=f"C{i}")
        ax.set_xlabel("keep ratio (no fine-tuning)")
        ax.set_ylabel("test top-1 (%)")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
        runs.save_figure(fig, out, "unstructured.png")


def main(argv: Sequence[str] | None = None) -> dict:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    t0 = time.time()
    summary: dict = {"config": args.config, "pretrained": os.path.abspath(args.pretrained), "seeds": args.seeds,
                     "finetune_steps": args.finetune_steps, "methods": list(args.methods),
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
                     "jax": jax.__version__, "overrides": [f"{k}={v}" for k, v in overrides]}
    if args.only != "unstructured":
        summary["structured"] = summarise_structured(run_structured(args, overrides))
    if args.only != "structured":
        summary["unstructured"] = summarise_unstructured(run_unstructured(args, overrides))
    summary["seconds"] = time.time() - t0
    previous = os.path.join(args.out, "compare.json")
    if args.tables_only and os.path.isfile(previous):   # the time the runs took, not the time to read them
        summary["seconds"] = json.load(open(previous)).get("seconds", summary["seconds"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(summary, f, indent=1)
    text = markdown(summary)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(text)
    print(text)
    plot(summary, args.out)
    return summary


if __name__ == "__main__":
    main()
