"""Importance scores of the dense model: the mode "score" of `prune.py`.

    dense model (prune.pretrained, or trained into WORKDIR/dense, resumable)
      └─ prune.importance on prune.score_batches × prune.score_batch_size training examples (prune.seed),
         in prune.score_dtype, with OBA's parts (prune.score_parts) and first-order term (prune.first_order)
         on request
      └─ WORKDIR/scores_<method>/: scores.npz (per-parameter sums and the count), channel_scores.npz (OBA:
         per-layer output/input channel sums), graph.txt + graph.dot (the connectivity map),
         score_histogram.png; WORKDIR/report.json (`reports.ScoreReport`) and a table

Nothing is reused: the scores are computed again on every run (they take seconds, not a training run).
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from oba_jax.experiment import runs
from oba_jax.experiment.hosts import is_writer
from oba_jax.experiment.pipelines.reports import ScoreReport, publish
from oba_jax.scores import channel_scores, get_method, score_model

__all__ = ["plot", "run", "table"]

HISTOGRAM = "score_histogram.png"


def _with_progress(items, bar):
    for item in items:
        yield item
        bar.update(1)
    bar.close()


def run(config: ml_collections.ConfigDict, workdir: str) -> ScoreReport:
    """Scores the dense model of `config` into WORKDIR/scores_<method> (see the module docstring)."""
    from oba_jax.experiment.progress import progress_bar

    p = config.prune
    begin = runs.start(config, workdir, finetunes=False)
    out = os.path.join(workdir, f"scores_{p.importance}")
    float64 = p.score_dtype == "float64"
    batches = list(zip(*(jnp.asarray(a) for a in begin.batches)))
    taken = get_method(p.importance).options      # validation refused a set key the method does not take
    options = {k: v for k, v in (("parts", p.score_parts), ("first_order", p.first_order)) if k in taken}
    with jax.enable_x64(float64):
        bar = progress_bar(len(batches), f"{p.importance} scores", "batch")
        start = time.perf_counter()
        result = score_model(begin.dense, _with_progress(batches, bar), p.importance, bn_mode=p.bn_mode,
                                     dtype=jnp.float64 if float64 else None, **options)
        seconds = time.perf_counter() - start
        sums = result.by_path("sum")
        arrays = {f"sum/{k}": np.asarray(v) for k, v in sums.items()}
        for part in (result.parts or {}):
            arrays.update({f"{part}/{k}": np.asarray(v) for k, v in result.by_path(part).items()})
        channels = channel_scores(result) if result.graph is not None else None

    if is_writer():   # (one process of a multi-host run writes the run's files)
        os.makedirs(out, exist_ok=True)
        np.savez(os.path.join(out, "scores.npz"), count=result.count, **arrays)
        if result.graph is not None:
            np.savez(os.path.join(out, "channel_scores.npz"),
                     **{f"out/{k}": np.asarray(v.outputs) for k, v in channels.items()},
                     **{f"in/{k}": np.asarray(v.inputs) for k, v in channels.items()})
            with open(os.path.join(out, "graph.txt"), "w") as f:
                f.write(result.graph.summary() + "\n")
            with open(os.path.join(out, "graph.dot"), "w") as f:
                f.write(result.graph.to_dot() + "\n")
    report = ScoreReport(
        mode="score", method=p.importance, dense_checkpoint=os.path.abspath(begin.source),
        dataset=config.data.name, batches=int(result.count), batch_size=p.score_batch_size, bn_mode=p.bn_mode,
        dtype=p.score_dtype, seconds=round(seconds, 3), output=os.path.abspath(out),
        per_leaf_abs_mean={k: float(np.abs(arrays[f"sum/{k}"]).mean() / result.count) for k in sums},
        layers=None if result.graph is None else len(result.graph.layers),
        parallel_products=None if result.graph is None else len(result.graph.parallel))
    return publish(report, workdir, plot, config)


def plot(report: ScoreReport, workdir: str) -> list[str]:
    """`scores_<method>/score_histogram.png`: log10 |score| of the positive and the negative sums."""
    plt = runs.pyplot()

    with np.load(os.path.join(report.output, "scores.npz")) as f:
        values = np.concatenate([f[k].reshape(-1) for k in f.files if k.startswith("sum/")])
    values = values[values != 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if values.size:
        mags = np.log10(np.abs(values) + 1e-30)
        ax.hist(mags[values > 0], bins=80, alpha=0.6, label="positive")
        ax.hist(mags[values < 0], bins=80, alpha=0.6, label="negative")
        ax.legend()
    ax.set_xlabel("log10 |score|")
    ax.set_ylabel("parameters")
    ax.set_title(f"{report.method} scores, {report.dataset}")
    return [runs.save_figure(fig, report.output, HISTOGRAM)]


def table(report: ScoreReport) -> str:
    rows = [["method", "batches", "batch", "dtype", "seconds", "output"],
            [report.method, str(report.batches), str(report.batch_size), report.dtype, f"{report.seconds:.2f}",
             report.output]]
    return "\n".join(runs.text_table(rows, f"importance scores of {report.dense_checkpoint}"))
