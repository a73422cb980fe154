"""oba-jax pruning CLI.

Prune-and-finetune of the experiment a config describes (`oba_jax.experiment.pipelines`):

    python prune.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist [--config.KEY=VALUE ...]

trains the dense model into WORKDIR/dense first unless `prune.pretrained` names a train.py workdir, then
prunes to every target of `prune.ops_ratios`, fine-tunes, and writes WORKDIR/report.json, the plots and
one checkpoint per target (WORKDIR/ops_<target>). User errors end with one paragraph on stderr and the exit
statuses of train.py (oba_jax.experiment.cli): 2 invalid config, 3 dataset missing or corrupt, 4 a checkpoint
of another model, 5 a corrupt checkpoint, 6 a diverged fine-tuning, 7 WORKDIR held by another run, 8 a file
system error.

Unstructured masks instead of channels (OBA_SPEC.md §6):

    python prune.py --config configs/fashion_mnist.py --workdir runs/fm_unstructured --config.prune.mode=unstructured

runs the progressive schedule to `prune.keep_ratio` for `prune.importance` and every method of `prune.compare`,
reports test accuracy at each of `prune.report_keep_ratios` (and the one-shot `prune.n_m` point), fine-tunes the
masked model for `finetune.epochs` (0: not at all) into WORKDIR/unstructured_<method> (a checkpoint holding the
masks), and writes WORKDIR/report.json, accuracy_vs_keep.png and layer_sparsity.png.

Importance scores of a trained checkpoint:

    python prune.py score --checkpoint runs/fashion_mnist --method oba --num-batches 20 --batch-size 64

writes to `--out` (default `<checkpoint>/scores_<method>`): `scores.npz` (per-parameter sums, count),
`channel_scores.npz` (per-layer output/input channel sums, OBA only), `graph.txt` + `graph.dot` (the
connectivity map), `summary.json` and `score_histogram.png`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from oba_jax.scores import BN_MODES, METHODS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prune.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("score", help="importance scores of a trained checkpoint")
    s.add_argument("--checkpoint", required=True, help="train.py workdir (or its checkpoints/ or a step dir)")
    s.add_argument("--method", default="oba", choices=METHODS)
    s.add_argument("--num-batches", type=int, default=20)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--bn-mode", default="train", choices=BN_MODES)
    s.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    s.add_argument("--parts", action="store_true", help="also write the upward/downward/parallel parts")
    s.add_argument("--first-order", action="store_true", help="add the first-order term −θ·g")
    s.add_argument("--data-dir", default=None, help="override the dataset location stored in the checkpoint")
    s.add_argument("--seed", type=int, default=0, help="which training examples are scored")
    s.add_argument("--out", default=None)
    return parser


def _fail(message: str, code: int) -> None:
    print(f"prune.py: {message}", file=sys.stderr)
    sys.exit(code)


def _score_batches(dataset, num_batches: int, batch_size: int, seed: int):
    """Normalised training batches (no augmentation), a deterministic sample of the training set."""
    import jax.numpy as jnp
    from oba_jax.experiment.data import preprocess_batch

    n = num_batches * batch_size
    if n > len(dataset.train_labels):
        _fail(f"--num-batches × --batch-size = {n} exceeds the {len(dataset.train_labels)} training examples", 2)
    order = np.random.default_rng(seed).permutation(len(dataset.train_labels))[:n]
    for i in range(num_batches):
        idx = order[i * batch_size:(i + 1) * batch_size]
        x = preprocess_batch(jnp.asarray(dataset.train_images[idx]), None, augment=False,
                             mean=dataset.mean, std=dataset.std)
        yield x, jnp.asarray(dataset.train_labels[idx])


def _with_progress(items, bar):
    for item in items:
        yield item
        bar.update(1)
    bar.close()


def _plot_histogram(by_path: dict[str, np.ndarray], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.concatenate([v.reshape(-1) for v in by_path.values()])
    values = values[values != 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if values.size:
        mags = np.log10(np.abs(values) + 1e-30)
        ax.hist(mags[values > 0], bins=80, alpha=0.6, label="positive")
        ax.hist(mags[values < 0], bins=80, alpha=0.6, label="negative")
        ax.legend()
    ax.set_xlabel("log10 |score|")
    ax.set_ylabel("parameters")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def score_command(args: argparse.Namespace) -> dict:
    import jax
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import oba_jax
    from oba_jax.experiment.checkpoint import CorruptCheckpointError, restore_model
    from oba_jax.experiment.data import load_dataset
    from oba_jax.experiment.progress import progress_bar

    if args.num_batches < 1 or args.batch_size < 1:
        _fail("--num-batches and --batch-size must be positive", 2)
    oba_options = {"parts": args.parts, "first_order": args.first_order}
    if args.method != "oba" and any(oba_options.values()):
        _fail(f"--parts and --first-order are options of --method oba, not of {args.method}", 2)
    try:
        model, meta = restore_model(args.checkpoint)
    except CorruptCheckpointError:
        raise      # its own exit status (5)
    except (FileNotFoundError, ValueError) as err:
        _fail(f"cannot restore a model from {args.checkpoint!r}: {err}. Pass the --workdir of a train.py run.", 2)
    data_cfg = (meta.get("config") or {}).get("data", {})
    name = data_cfg.get("name", "fashion_mnist")
    out = args.out or os.path.join(args.checkpoint, f"scores_{args.method}")
    if os.path.exists(out) and not os.path.isdir(out):
        _fail(f"--out {out!r} is an existing file; pass a directory (it is created if missing)", 2)
    if name == "synthetic":
        dataset = load_dataset(name, **data_cfg.get("synthetic", {}))
    else:
        dataset = load_dataset(name, args.data_dir or data_cfg.get("data_dir") or None)

    batches = _with_progress(_score_batches(dataset, args.num_batches, args.batch_size, args.seed),
                             progress_bar(args.num_batches, f"{args.method} scores", "batch"))
    start = time.perf_counter()
    result = oba_jax.score_model(model, batches, args.method, bn_mode=args.bn_mode,
                                 dtype=jnp.float64 if args.dtype == "float64" else None,
                                 **(oba_options if args.method == "oba" else {}))
    seconds = time.perf_counter() - start

    os.makedirs(out, exist_ok=True)
    sums = result.by_path("sum")
    arrays = {f"sum/{k}": v for k, v in sums.items()}
    for part in (result.parts or {}):
        arrays.update({f"{part}/{k}": v for k, v in result.by_path(part).items()})
    np.savez(os.path.join(out, "scores.npz"), count=result.count, **arrays)
    summary = {"method": args.method, "checkpoint": os.path.abspath(args.checkpoint), "dataset": name,
               "batches": result.count, "batch_size": args.batch_size, "bn_mode": args.bn_mode,
               "dtype": args.dtype, "seconds": round(seconds, 3),
               "per_leaf_abs_mean": {k: float(np.abs(v).mean() / result.count) for k, v in sums.items()}}
    if result.graph is not None:
        channels = oba_jax.channel_scores(result)
        np.savez(os.path.join(out, "channel_scores.npz"),
                 **{f"out/{k}": v.outputs for k, v in channels.items()},
                 **{f"in/{k}": v.inputs for k, v in channels.items()})
        with open(os.path.join(out, "graph.txt"), "w") as f:
            f.write(result.graph.summary() + "\n")
        with open(os.path.join(out, "graph.dot"), "w") as f:
            f.write(result.graph.to_dot() + "\n")
        summary["layers"] = len(result.graph.layers)
        summary["parallel_products"] = len(result.graph.parallel)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _plot_histogram(sums, os.path.join(out, "score_histogram.png"), f"{args.method} scores, {name}")

    print(f"{'method':<10}{'batches':>8}{'batch':>7}{'seconds':>10}  output")
    print(f"{args.method:<10}{result.count:>8}{args.batch_size:>7}{seconds:>10.2f}  {out}")
    return summary


def prune_command(argv: list[str]) -> int:
    """`prune.py --config C --workdir W [--config.k=v ...]`: the prune pipeline of `prune.mode`; the exit status."""
    from oba_jax.experiment import config as config_lib
    workdir, config = config_lib.config_from_cli(argv, prog="prune.py", description=__doc__,
                                                 workdir_help="directory for the dense run, checkpoints, report, plots")
    from oba_jax.experiment import pipelines
    from oba_jax.experiment.lock import workdir_lock
    with workdir_lock(workdir):
        report = pipelines.run_pruning(config, workdir)
    print(pipelines.result_table(report))
    print(f"report: {os.path.join(workdir, pipelines.REPORT_FILE)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from oba_jax.experiment.cli import run_cli
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["score"]:
        def score() -> int:
            score_command(_parser().parse_args(argv))
            return 0
        return run_cli("prune.py", score)
    return run_cli("prune.py", lambda: prune_command(argv))


if __name__ == "__main__":
    sys.exit(main())
