"""Does a criterion predict what pruning does? Predicted importance against the true loss change.

    python bench/fidelity.py --config configs/fashion_mnist.py --pretrained runs/fashion_mnist/dense \
        --out bench/results/vgg [--held-out 2000] [--channels 0] [--weights 200] [--sets 50] \
        [--score-data train|held-out] [--config.KEY=VALUE ...]

For the trained model of `--pretrained` (a train.py workdir of the config's model):

* **Channels.** Every channel of every prunable group (`--channels N`: a seeded sample of N) is removed alone
  (masked: zero on every member, which is what shrinking computes) and the true Δloss — the mean cross-entropy
  of the eval-mode model on the first `--held-out` test images, minus the dense model's — is set against each
  method's predicted channel importance (`group_scores`, the scores of the config's scoring sample).
  Spearman and Kendall per group (independent of the normaliser) and pooled over groups (one per normaliser).
* **Sets.** The lowest-scored 10% / 25% of every group removed together, and the lowest 10% / 25% of all
  channels pooled (per normaliser): the true Δloss of each set (lower is better).
* **Weights.** `--weights` single weights drawn at random (seeded) from the layers' kernels, each zeroed
  alone (Δloss in float64), against |score| (the importance a global mask ranks by; for magnitude |w|) and
  against the signed first-order estimate −θ·g; `--sets` random sets of `--set-size` weights inside one
  kernel, against the summed importance.

Methods: oba (train-mode BN: the config's), oba with eval-mode BN, oba with the first-order term, fastoba,
taylor (train and eval BN), magnitude, random (`--random-seeds` seeds; its correlations are their mean). Writes
`OUT/fidelity.json`, `OUT/fidelity.md` (the tables) and the scatter plots `OUT/channels.png`,
`OUT/weights.png`. Numbers are what this run measured; nothing is asserted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from oba_jax import nnx_model  # noqa: E402
from oba_jax.experiment import config as config_lib  # noqa: E402
from oba_jax.experiment import runs, training  # noqa: E402
from oba_jax.experiment.checkpoint import restore_model  # noqa: E402
from oba_jax.experiment.data import preprocess_batch  # noqa: E402
from oba_jax.losses import cross_entropy  # noqa: E402
from oba_jax.paths import flat_by_path, unflatten_by_path  # noqa: E402
from oba_jax.scores import score_model  # noqa: E402
from oba_jax.structured import NORMALIZERS, group_scores, mask_model, model_group_graph  # noqa: E402
from oba_jax.structured.select import Selection  # noqa: E402

SET_FRACTIONS = (0.1, 0.25)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the benchmark: a registered importance method with a BN mode and options."""

    name: str
    method: str
    bn_mode: str | None = None          # None: the config's
    options: Mapping[str, object] = dataclasses.field(default_factory=dict)


def variants(random_seeds: int) -> list[Variant]:
    return [Variant("oba", "oba"), Variant("oba (eval BN)", "oba", "eval"),
            Variant("oba + first order", "oba", options={"first_order": True}), Variant("fastoba", "fastoba"),
            Variant("taylor", "taylor"), Variant("taylor (eval BN)", "taylor", "eval"), Variant("magnitude", "magnitude"),
            *[Variant(f"random {s}", "random", options={"seed": s}) for s in range(random_seeds)]]


def _row_name(name: str) -> str:
    """Random seeds share one row."""
    return "random" if name.startswith("random ") else name


# ----------------------------------------------------------------------------------------------- truth


def heldout_loss_fn(model, x: jax.Array, y: jax.Array, chunk: int = 500) -> Callable:
    """`loss(state)`: mean cross-entropy of the eval-mode model of `state` (its `nnx_model.split`) on (x, y),
    in chunks (one compiled program for every state of the same shapes and dtype)."""
    graphdef, _ = nnx_model.split(model)
    n = (len(y) // chunk) * chunk or len(y)
    chunk = min(chunk, n)
    xs, ys = x[:n].reshape(-1, chunk, *x.shape[1:]), y[:n].reshape(-1, chunk)

    @jax.jit
    def loss(state):
        m = nnx_model.merge(graphdef, state)
        m.eval()
        xs_ = xs.astype(jax.tree.leaves(state.params)[0].dtype)
        per_chunk = jax.lax.map(lambda xy: jnp.sum(cross_entropy(m(xy[0]), xy[1])), (xs_, ys))
        return jnp.sum(per_chunk) / n
    return loss


def channel_truth(model, groups, channels: Sequence[tuple[str, int]], loss: Callable, base: float) -> np.ndarray:
    """Δloss of removing each (group, channel) alone."""
    sizes = {g.name: g.size for g in groups}
    out = np.empty(len(channels))
    bar = runs.progress(len(channels), "channels removed one at a time")
    for k, (name, c) in enumerate(channels):
        keep = {name: np.delete(np.arange(sizes[name]), c)}
        out[k] = float(loss(nnx_model.split(mask_model(model, groups, keep))[1])) - base
        bar.update(1)
    bar.close()
    return out


def set_truth(model, groups, removed: Mapping[str, np.ndarray], loss: Callable, base: float) -> float:
    sizes = {g.name: g.size for g in groups}
    keep = {n: np.setdiff1d(np.arange(sizes[n]), r) for n, r in removed.items() if len(r)}
    return float(loss(nnx_model.split(mask_model(model, groups, keep))[1])) - base


def _zero(state, entries: Sequence[tuple[str, tuple[int, ...]]]):
    """`state` with the given (leaf path, index) parameter entries set to zero."""
    flat = flat_by_path(state.params)
    for path, idx in entries:
        flat[path] = flat[path].at[idx].set(0)
    return state._replace(params=unflatten_by_path(state.params, flat))


# ------------------------------------------------------------------------------------------- statistics


def correlations(predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    if len(true) < 3 or np.ptp(predicted) == 0 or np.ptp(true) == 0:
        return {"spearman": float("nan"), "kendall": float("nan")}
    return {"spearman": float(stats.spearmanr(predicted, true).statistic),
            "kendall": float(stats.kendalltau(predicted, true).statistic)}


def lowest(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the `fraction` lowest scores (at least one; ties broken by position)."""
    k = max(1, int(round(fraction * len(scores))))
    return np.argsort(scores, kind="stable")[:k]


def global_lowest(scores: Mapping[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """The `fraction` lowest of all channels pooled, per group; a group keeps at least one channel (the next
    lowest elsewhere is taken instead)."""
    pooled = [(s, name, c) for name, v in scores.items() for c, s in enumerate(v)]
    total = max(1, int(round(fraction * len(pooled))))
    left = {name: len(v) for name, v in scores.items()}
    removed: dict[str, list[int]] = {name: [] for name in scores}
    for _, name, c in sorted(pooled, key=lambda t: t[0]):
        if sum(map(len, removed.values())) == total:
            break
        if left[name] > 1:
            removed[name].append(c)
            left[name] -= 1
    return {name: np.array(sorted(r), int) for name, r in removed.items()}


# ----------------------------------------------------------------------------------------------- main


def parse(argv: Sequence[str]):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Other --config.KEY=VALUE arguments override the config.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--pretrained", required=True, help="a train.py workdir of the config's model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--held-out", type=int, default=2000, help="test images the true Δloss is measured on")
    ap.add_argument("--channels", type=int, default=0, help="seeded sample of channels (0: every channel)")
    ap.add_argument("--weights", type=int, default=200, help="single weights removed alone")
    ap.add_argument("--sets", type=int, default=50, help="random sets of weights removed together")
    ap.add_argument("--set-size", type=int, default=10)
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="of the channel and weight samples")
    ap.add_argument("--score-data", choices=("train", "held-out"), default="train",
                    help="score on the config's training sample (what pruning does) or on the held-out images the "
                         "truth is measured on (the criterion's own error, without sampling noise)")
    ap.add_argument("--no-plots", action="store_true")
    rest, overrides = config_lib.split_override_args(argv)
    args = ap.parse_args(rest)
    if not os.path.isdir(args.pretrained):
        ap.error(f"--pretrained {args.pretrained!r} is not a directory (give a train.py --workdir)")
    for name in ("held_out", "weights", "sets", "set_size", "random_seeds"):
        if getattr(args, name) < (0 if name in ("weights", "sets") else 1):
            ap.error(f"--{name.replace('_', '-')} must be {'>= 0' if name in ('weights', 'sets') else '>= 1'}")
    return args, overrides


def main(argv: Sequence[str] | None = None) -> dict:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    config = config_lib.load_config(args.config, [*overrides, ("prune.pretrained", args.pretrained)])
    p = config.prune
    dataset = training.load_dataset_for(config)
    model, _ = restore_model(args.pretrained)
    if model.spec != config_lib.model_spec(config):
        raise SystemExit(f"{args.pretrained} holds a {model.spec} model, not the config's "
                         f"{config_lib.model_spec(config)}")
    if args.held_out > len(dataset.test_labels):
        raise SystemExit(f"--held-out {args.held_out} exceeds the {len(dataset.test_labels)} test images")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    x = preprocess_batch(jnp.asarray(dataset.test_images[:args.held_out]), None, augment=False,
                         mean=dataset.mean, std=dataset.std)
    y = jnp.asarray(dataset.test_labels[:args.held_out], jnp.int32)
    batches = runs.score_batches(dataset, config)
    if args.score_data == "held-out":
        b = p.score_batch_size if args.held_out % p.score_batch_size == 0 else args.held_out
        batches = (x.reshape(-1, b, *x.shape[1:]), y.reshape(-1, b))
    graph = model_group_graph(model, batches[0][0][:1], ignore=tuple(p.ignored_layers), bn_mode=p.bn_mode)
    groups = graph.groups
    chosen = Selection(kinds=tuple(p.kinds)).selectable(groups)
    rng = np.random.default_rng(args.seed)

    # scores of every variant: per-channel (per normaliser) and per-weight
    rows = variants(args.random_seeds)
    channel_scores, weight_scores = {}, {}
    bar = runs.progress(len(rows), "scores")
    for v in rows:
        result = score_model(model, batches, v.method, bn_mode=v.bn_mode or p.bn_mode, **v.options)
        channel_scores[v.name] = {n: group_scores(result, chosen, n) for n in NORMALIZERS}
        weight_scores[v.name] = {k: np.asarray(a, np.float64) for k, a in result.by_path("mean").items()}
        if v.method == "taylor" and v.bn_mode == "eval":   # the first-order estimate of the eval-mode truth
            weight_scores["−θ·g, eval BN (signed)"] = {k: -a for k, a in weight_scores[v.name].items()}
        bar.update(1)
    bar.close()

    loss32 = heldout_loss_fn(model, x, y)
    state32 = nnx_model.split(model)[1]
    base32 = float(loss32(state32))
    all_channels = [(g.name, c) for g in chosen for c in range(g.size)]
    if args.channels and args.channels < len(all_channels):
        pick = np.sort(rng.choice(len(all_channels), args.channels, replace=False))
        channels = [all_channels[i] for i in pick]
    else:
        channels = all_channels
    truth = channel_truth(model, groups, channels, loss32, base32)

    report = {"config": args.config, "pretrained": os.path.abspath(args.pretrained), "held_out": args.held_out,
              "dense_loss": base32, "score_data": args.score_data,
              "score_batches": list(batches[1].shape), "bn_mode": p.bn_mode,
              "channels": len(channels), "channels_total": len(all_channels), "seed": args.seed,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}",
              "jax": jax.__version__, "channel_truth": truth.tolist(),
              "channel_ids": [f"{n}:{c}" for n, c in channels]}
    report["channels_by_method"] = _channel_statistics(channel_scores, channels, truth, chosen)
    report["sets"] = _set_statistics(model, groups, chosen, channel_scores, loss32, base32)
    if args.weights or args.sets:
        with jax.enable_x64(True):   # a single weight's Δloss needs float64 (the scores stay float32)
            report["weights"] = _weight_statistics(model, weight_scores, x, y, args, rng)
    report["seconds"] = time.time() - t0
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out, "fidelity.md"), "w") as f:
        f.write(text)
    print(text)
    if not args.no_plots:
        plot(report, channel_scores, weight_scores, channels, args.out)
    return report


def _channel_statistics(channel_scores, channels, truth, chosen) -> dict:
    out: dict[str, dict] = {}
    for name, per_norm in channel_scores.items():
        row = out.setdefault(_row_name(name), {"runs": []})
        run = {"pooled": {}, "per_group": {}}
        for norm, scores in per_norm.items():
            predicted = np.array([scores[n][c] for n, c in channels])
            run["pooled"][norm] = correlations(predicted, truth)
        for g in chosen:
            idx = [k for k, (n, _) in enumerate(channels) if n == g.name]
            predicted = np.array([per_norm["none"][g.name][channels[k][1]] for k in idx])
            run["per_group"][g.name] = correlations(predicted, truth[idx])
        row["runs"].append(run)
    for row in out.values():   # random: the mean over seeds
        runs_ = row.pop("runs")
        row["pooled"] = {n: _mean_stats([r["pooled"][n] for r in runs_]) for n in runs_[0]["pooled"]}
        row["per_group"] = {g: _mean_stats([r["per_group"][g] for r in runs_]) for g in runs_[0]["per_group"]}
        row["per_group_mean"] = _mean_stats(list(row["per_group"].values()))
    return out


def _mean_stats(items: Sequence[Mapping[str, float]]) -> dict[str, float]:
    return {k: float(np.nanmean([i[k] for i in items])) if any(np.isfinite(i[k]) for i in items) else float("nan")
            for k in items[0]}


def _set_statistics(model, groups, chosen, channel_scores, loss, base) -> dict:
    out: dict[str, dict] = {}
    for name, per_norm in channel_scores.items():
        row = out.setdefault(_row_name(name), {})
        for f in SET_FRACTIONS:
            per_group = {g.name: lowest(per_norm["none"][g.name], f) for g in chosen}
            row.setdefault(f"per group {f:g}", []).append(set_truth(model, groups, per_group, loss, base))
            for norm in NORMALIZERS:
                removed = global_lowest({g.name: per_norm[norm][g.name] for g in chosen}, f)
                row.setdefault(f"global {f:g} ({norm})", []).append(set_truth(model, groups, removed, loss, base))
    return {name: {k: float(np.mean(v)) for k, v in row.items()} for name, row in out.items()}


def _weight_statistics(model, weight_scores, x, y, args, rng) -> dict:
    """Single weights and random sets inside one kernel, Δloss in float64."""
    state = nnx_model.split(model)[1]
    flat = flat_by_path(state.params)
    kernels = sorted(k for k, a in flat.items() if k.endswith("kernel") and a.ndim >= 2)
    state64 = jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    model64 = nnx_model.merge(nnx_model.split(model)[0], state64)
    loss64 = heldout_loss_fn(model64, x.astype(jnp.float64), y)
    base = float(loss64(state64))
    sizes = np.array([flat[k].size for k in kernels], np.float64)

    def draw(kernel: str, n: int) -> list[tuple[str, tuple[int, ...]]]:
        flat_idx = rng.choice(flat[kernel].size, n, replace=False)
        return [(kernel, tuple(int(i) for i in np.unravel_index(j, flat[kernel].shape))) for j in flat_idx]

    singles = [draw(str(rng.choice(kernels, p=sizes / sizes.sum())), 1)[0] for _ in range(args.weights)]
    sets = [draw(k, min(args.set_size, flat[k].size)) for k in rng.choice(kernels, args.sets)]
    bar = runs.progress(len(singles) + len(sets), "weights removed")
    truth_single, truth_sets = [], []
    for e in singles:
        truth_single.append(float(loss64(_zero(state64, [e]))) - base)
        bar.update(1)
    for s in sets:
        truth_sets.append(float(loss64(_zero(state64, s))) - base)
        bar.update(1)
    bar.close()
    truth_single, truth_sets = np.array(truth_single), np.array(truth_sets)
    out: dict[str, dict] = {"truth_single": truth_single.tolist(), "truth_sets": truth_sets.tolist(),
                            "kernels": kernels, "methods": {}}
    for name, scores in weight_scores.items():
        signed = name.endswith("(signed)")
        imp = (lambda k, i: scores[k][i]) if signed else (lambda k, i: abs(scores[k][i]))
        single = np.array([imp(k, i) for k, i in singles]) if singles else np.zeros(0)
        summed = np.array([sum(imp(k, i) for k, i in s) for s in sets]) if sets else np.zeros(0)
        row = out["methods"].setdefault(_row_name(name), {"single": [], "sets": [], "single_predicted": []})
        row["single"].append(correlations(single, truth_single))
        row["sets"].append(correlations(summed, truth_sets))
        row["single_predicted"].append(single.tolist())
    for row in out["methods"].values():
        row["single"] = _mean_stats(row["single"])
        row["sets"] = _mean_stats(row["sets"])
        row["single_predicted"] = row["single_predicted"][0]
    return out


def _fmt(v: float) -> str:
    return "–" if not np.isfinite(v) else f"{v:.2f}"


def markdown(report: Mapping) -> str:
    ch = report["channels_by_method"]
    lines = [f"Fidelity of `{report['config']}` ({report['channels']} of {report['channels_total']} channels, "
             f"Δloss on {report['held_out']} held-out images, dense loss {report['dense_loss']:.4f}; scores on "
             f"{'the held-out images' if report['score_data'] == 'held-out' else 'the training sample'} "
             f"({report['score_batches'][0]}×{report['score_batches'][1]}); "
             f"{report['machine']}, jax {report['jax']}, {report['seconds']:.0f} s)", "",
             "Channels removed alone: rank correlation of predicted importance with the true Δloss "
             "(per group: mean over groups; pooled: all channels, per normaliser)", "",
             "| method | per group ρ | per group τ | " + " | ".join(f"pooled ρ ({n})" for n in NORMALIZERS) + " |",
             "|---|---|---|" + "---|" * len(NORMALIZERS)]
    for name, row in ch.items():
        lines.append(f"| {name} | {_fmt(row['per_group_mean']['spearman'])} | {_fmt(row['per_group_mean']['kendall'])}"
                     " | " + " | ".join(_fmt(row["pooled"][n]["spearman"]) for n in NORMALIZERS) + " |")
    sets = report["sets"]
    keys = list(next(iter(sets.values())))
    shown = [k for k in keys if k.startswith("per group") or k.endswith("(max)") or k.endswith("(none)")]
    lines += ["", "Channel sets removed together: true Δloss (lower is better; random: mean of its seeds)", "",
              "| method | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    for name, row in sets.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in shown) + " |")
    if "weights" in report:
        w = report["weights"]
        lines += ["", f"Weights ({len(w['truth_single'])} single weights, {len(w['truth_sets'])} random sets inside one "
                  "kernel, Δloss in float64): rank correlation of |score| (the summed |score| for sets) with the "
                  "true Δloss", "", "| method | single ρ | single τ | sets ρ | sets τ |", "|---|---|---|---|---|"]
        for name, row in w["methods"].items():
            lines.append(f"| {name} | {_fmt(row['single']['spearman'])} | {_fmt(row['single']['kendall'])} | "
                         f"{_fmt(row['sets']['spearman'])} | {_fmt(row['sets']['kendall'])} |")
    return "\n".join(lines) + "\n"


def _grid(plt, n: int, columns: int = 4):
    """A figure of `n` panels, `columns` per row; the unused panels hidden."""
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, min(n, columns), figsize=(3.2 * min(n, columns), 3.0 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def plot(report, channel_scores, weight_scores, channels, out: str) -> None:
    plt = runs.pyplot()
    names = [n for n in channel_scores if not n.startswith("random ") or n == "random 0"]
    truth = np.array(report["channel_truth"])
    fig, axes = _grid(plt, len(names))
    groups = sorted({n for n, _ in channels})
    colour = {g: plt.cm.viridis(i / max(len(groups) - 1, 1)) for i, g in enumerate(groups)}
    for ax, name in zip(axes, names):
        pred = np.array([channel_scores[name]["max"][n][c] for n, c in channels])
        ax.scatter(pred, truth, s=6, c=[colour[n] for n, _ in channels])
        ax.set_yscale("symlog", linthresh=1e-3)
        rho = report["channels_by_method"][_row_name(name)]["pooled"]["max"]["spearman"]
        ax.set_title(f"{_row_name(name)}\npooled ρ = {_fmt(rho)}", fontsize=9)
        ax.set_xlabel("importance (max-normalised)", fontsize=8)
    axes[0].set_ylabel("true Δloss (channel removed)")
    if len(groups) <= 12:   # one colour per group
        axes[0].legend(handles=[plt.Line2D([], [], ls="", marker="o", ms=4, color=colour[g], label=g) for g in groups],
                       fontsize=6, loc="lower right")
    fig.tight_layout()
    runs.save_figure(fig, out, "channels.png")
    if "weights" in report:
        w = report["weights"]
        names = list(w["methods"])
        fig, axes = _grid(plt, len(names))
        for ax, name in zip(axes, names):
            ax.scatter(w["methods"][name]["single_predicted"], w["truth_single"], s=6)
            ax.set_yscale("symlog", linthresh=1e-6)
            ax.set_title(f"{name}\nρ = {_fmt(w['methods'][name]['single']['spearman'])}", fontsize=9)
            ax.set_xlabel("|score|" if not name.endswith("(signed)") else "−θ·g", fontsize=8)
        axes[0].set_ylabel("true Δloss (weight zeroed)")
        fig.tight_layout()
        runs.save_figure(fig, out, "weights.png")


if __name__ == "__main__":
    main()
