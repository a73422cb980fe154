"""Unstructured prune-and-finetune from a config: the mode "unstructured" of `prune.py`.

    dense model (prune.pretrained, or trained into WORKDIR/dense, resumable)
      └─ per method (prune.importance, then prune.compare): the progressive schedule (OBA_SPEC.md §6) down
         to prune.keep_ratio, one compiled scorer for all steps; test accuracy at every report ratio
         (0.9, 0.8, …) it passes; with prune.n_m also the one-shot N:M masks from the dense model's scores
         └─ masked fine-tuning (finetune.epochs; 0: none) into WORKDIR/unstructured_<method> (and of the N:M
            masks into WORKDIR/n_m_<method>; stages with manifests): a checkpoint whose optimizer state holds
            the masks (restore them with `checkpoint.restore_masks`)
      └─ WORKDIR/report.json (`reports.UnstructuredReport`), accuracy_vs_keep.png, layer_sparsity.png, a table
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from oba_jax.experiment import config as config_lib
from oba_jax.experiment import runs, training
from oba_jax.experiment.pipelines.reports import (
    FinalMasks,
    KeepPoint,
    KeepStep,
    MethodResult,
    NMResult,
    UnstructuredReport,
    publish,
)
from oba_jax.paths import flat_by_path, matches
from oba_jax.scores import get_method, model_connectivity, model_scorer
from oba_jax.unstructured import (
    apply_masks,
    mask_sparsity,
    n_m_masks,
    progressive_masks,
    scored_leaves,
    unstructured_masks,
)

__all__ = ["check_settings", "plot", "run", "table"]


def _sparsity_record(masks: Any, leaves: tuple[str, ...]) -> dict:
    summary = mask_sparsity(masks, leaves)
    return {"keep_ratio": summary["global"]["keep_ratio"], "sparsity": summary["global"]["sparsity"],
            "size": summary["global"]["size"], "kept": summary["global"]["kept"],
            "layers": {p: v["sparsity"] for p, v in summary["layers"].items()}}


def _run_method(method: str, begin: runs.Start, params, graph, evaluate, config, workdir: str) -> MethodResult:
    p = config.prune
    dense, batches = begin.dense, begin.batches
    example = batches[0][0][:1]
    score = model_scorer(dense, example, method, bn_mode=p.bn_mode, **runs.method_options(config, method))
    data = batches if get_method(method).needs_data else None
    first: list = []

    def score_fn(masked):
        result = score(masked, data)
        if not first:
            first.append(result)   # the dense model's scores: the one-shot N:M masks use them
        return result

    leaves = scored_leaves(graph, tuple(p.exclude))
    bar = runs.progress(p.unstructured_steps, f"{method} to keep {p.keep_ratio:g}")
    start = time.perf_counter()
    try:
        schedule = progressive_masks(score_fn, params, p.keep_ratio, graph=graph, steps=p.unstructured_steps,
                                     exclude=tuple(p.exclude), report_ratios=tuple(p.report_keep_ratios),
                                     form=p.mask_form,
                                     on_step=lambda record: (bar.set_postfix(keep=f"{record['keep_ratio']:.3f}"), bar.update(1)))
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    points = tuple(KeepPoint(target_keep_ratio=r, **_sparsity_record(m, leaves), acc=evaluate(apply_masks(params, m))["top1"])
                   for r, m in sorted(schedule.reported.items(), reverse=True))
    n_m = None
    if p.n_m is not None:
        exclude = tuple(p.exclude) + tuple(p.n_m_exclude)
        try:
            nm = unstructured_masks(first[0], params, keep_ratio=None, n_m=tuple(p.n_m), exclude=exclude, graph=graph,
                                    form=p.mask_form)
        except ValueError as e:
            raise config_lib.ConfigError(f"config.prune.n_m: {e}") from None
        n_m = NMResult(pattern=f"{p.n_m[0]}:{p.n_m[1]}", **_sparsity_record(nm, leaves),
                       acc=evaluate(apply_masks(params, nm))["top1"],
                       **_finetuned(begin, params, nm, config, os.path.join(workdir, f"n_m_{method}"), "n_m", method))
    final = FinalMasks(**_sparsity_record(schedule.masks, leaves), acc_pruned=points[-1].acc,
                       **_finetuned(begin, params, schedule.masks, config,
                                    os.path.join(workdir, f"unstructured_{method}"), "unstructured", method))
    return MethodResult(points=points, history=tuple(KeepStep(**r) for r in schedule.history),
                        schedule_seconds=seconds, final=final, n_m=n_m)


def _finetuned(begin: runs.Start, params, masks, config: ml_collections.ConfigDict, run_dir: str, stage: str,
               method: str) -> dict:
    """Masked fine-tuning of the dense model with `params` under `masks` into `run_dir` (a stage of kind
    `stage`; finetune.epochs 0: only the step-0 checkpoint with the masks); `acc_finetuned` (None without
    fine-tuning), steps, the checkpoint."""
    begin.claim(config, run_dir, stage, method=method)
    parts, _, batch_stats = training.split_model(begin.dense)
    masked = training.merge_model(parts, apply_masks(params, masks), batch_stats)
    _, final = training.fit(masked, begin.dataset, config_lib.finetune_config(config), run_dir, masks=masks)
    return {"acc_finetuned": final["top1"] if config.finetune.epochs > 0 else None,
            "finetune_steps": final["steps"], "checkpoint": os.path.abspath(run_dir)}


def check_settings(outline: Any, example: jax.Array, p: ml_collections.ConfigDict) -> None:
    """ConfigError unless `prune.exclude`, `prune.n_m_exclude` and `prune.n_m` fit the model (`outline`: a
    model of its structure, e.g. `runs.model_outline`; parameter values are not read)."""
    graph = model_connectivity(outline, example, bn_mode=p.bn_mode)
    for key in ("exclude", "n_m_exclude"):
        unknown = [e for e in p[key] if not any(matches(path, (e,)) for path in graph.leaf_paths)]
        if unknown:
            raise config_lib.ConfigError(f"config.prune.{key}: {unknown} match no parameter of the model "
                                         f"(parameters: {list(graph.leaf_paths)})")
    if not scored_leaves(graph, tuple(p.exclude)):
        raise config_lib.ConfigError("config.prune.exclude: excludes every layer weight and bias")
    if p.n_m is not None:
        covered = scored_leaves(graph, tuple(p.exclude) + tuple(p.n_m_exclude))
        shapes = flat_by_path(training.split_model(outline)[1])
        try:
            n_m_masks({path: jax.numpy.zeros(leaf.shape) for path, leaf in shapes.items() if path in covered},
                      graph, tuple(p.n_m))
        except ValueError as e:
            raise config_lib.ConfigError(f"config.prune.n_m: {e} (or add it to config.prune.n_m_exclude)") from None


def run(config: ml_collections.ConfigDict, workdir: str) -> UnstructuredReport:
    """The whole experiment of a config in unstructured mode (see the module docstring); returns the report."""
    p = config.prune
    begin = runs.start(config, workdir, check=lambda outline, example: check_settings(outline, example, p))
    dense, batches = begin.dense, begin.batches
    graph = model_connectivity(dense, batches[0][0][:1], bn_mode=p.bn_mode)
    params = jax.device_get(training.split_model(dense)[1])
    evaluate = training.model_evaluator(dense, begin.dataset, config.train.eval_batch_size)
    acc_dense = evaluate(params)["top1"]
    methods = config_lib.unstructured_methods(p)
    results = {m: _run_method(m, begin, params, graph, evaluate, config, workdir) for m in methods}
    report = UnstructuredReport(
        mode="unstructured", importance=p.importance, methods=methods, keep_ratio=p.keep_ratio,
        steps=p.unstructured_steps, score_batches=p.score_batches, score_batch_size=p.score_batch_size,
        bn_mode=p.bn_mode, exclude=tuple(p.exclude), dense_checkpoint=os.path.abspath(begin.source),
        acc_dense=acc_dense, scored_leaves=tuple(scored_leaves(graph, tuple(p.exclude))), results=results,
        mask_forms={m: p.mask_form or get_method(m).mask_form for m in methods})
    return publish(report, workdir, plot, config)


def plot(report: UnstructuredReport, workdir: str) -> list[str]:
    """`accuracy_vs_keep.png` (one curve per method, N:M and fine-tuned points) and `layer_sparsity.png`."""
    plt = runs.pyplot()

    paths = []
    from matplotlib.lines import Line2D
    fig, ax = plt.subplots(figsize=(6, 4))
    kinds = {"schedule, no fine-tuning": dict(marker="o", ls="-"), "fine-tuned": dict(marker="D", ls="", mfc="none", ms=9)}
    for i, (method, r) in enumerate(report.results.items()):
        color = f"C{i}"
        keep = [1.0] + [pt.keep_ratio for pt in r.points]
        acc = [100 * report.acc_dense] + [100 * pt.acc for pt in r.points]
        ax.plot(keep, acc, color=color, **kinds["schedule, no fine-tuning"])
        if r.final.acc_finetuned is not None:
            ax.plot([r.final.keep_ratio], [100 * r.final.acc_finetuned], color=color, **kinds["fine-tuned"])
        if r.n_m is not None:
            kinds[f"{r.n_m.pattern} one-shot"] = dict(marker="*", ls="", ms=13)
            ax.plot([r.n_m.keep_ratio], [100 * r.n_m.acc], color=color,
                    **kinds[f"{r.n_m.pattern} one-shot"])
            if r.n_m.acc_finetuned is not None:
                kinds[f"{r.n_m.pattern} fine-tuned"] = dict(marker="*", ls="", mfc="none", ms=13)
                ax.plot([r.n_m.keep_ratio], [100 * r.n_m.acc_finetuned], color=color,
                        **kinds[f"{r.n_m.pattern} fine-tuned"])
    # colour = method, marker = kind of point: two short legends instead of one entry per combination
    ax.add_artist(ax.legend([Line2D([], [], color=f"C{i}", lw=3) for i in range(len(report.results))],
                            list(report.results), fontsize=7, loc="lower left", title="method", title_fontsize=7))
    ax.legend([Line2D([], [], color="0.3", **style) for style in kinds.values()], list(kinds), fontsize=7,
              loc="lower center", title="point", title_fontsize=7)
    ax.set_xlabel("keep ratio (kept fraction of layer weights and biases)")
    ax.set_ylabel("test top-1 (%)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    paths.append(runs.save_figure(fig, workdir, "accuracy_vs_keep.png"))

    leaves = report.scored_leaves
    methods = list(report.results)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(leaves) + 2), 3.8))
    width = 0.8 / len(methods)
    pos = np.arange(len(leaves))
    for i, method in enumerate(methods):
        layers = report.results[method].final.layers
        ax.bar(pos + i * width, [100 * layers[leaf] for leaf in leaves], width, label=method, color=f"C{i}")
    ax.set_xticks(pos + 0.4 - width / 2, leaves, rotation=70, fontsize=7)
    ax.set_ylabel("sparsity (%)")
    ax.set_title(f"per-layer sparsity at keep ratio {report.keep_ratio:g}", fontsize=9)
    ax.legend(fontsize=7)
    paths.append(runs.save_figure(fig, workdir, "layer_sparsity.png"))
    return paths


def table(report: UnstructuredReport) -> str:
    """Test top-1 per method at every report ratio, the N:M point and the fine-tuned final masks."""
    methods = list(report.results)
    ratios = [pt.target_keep_ratio for pt in report.results[methods[0]].points]
    header = ["keep ratio"] + methods
    rows = [["1 (dense)"] + [f"{100 * report.acc_dense:.2f}%"] * len(methods)]
    for k, r in enumerate(ratios):
        rows.append([f"{r:g}"] + [f"{100 * report.results[m].points[k].acc:.2f}%" for m in methods])
    finals = [report.results[m].final for m in methods]
    if any(f.acc_finetuned is not None for f in finals):
        rows.append([f"{report.keep_ratio:g} fine-tuned"] +
                    [f"{100 * f.acc_finetuned:.2f}%" if f.acc_finetuned is not None else "-" for f in finals])
    nm = [report.results[m].n_m for m in methods]
    if any(nm):
        pattern = next(x.pattern for x in nm if x)
        rows.append([f"{pattern} one-shot"] + [f"{100 * x.acc:.2f}% (keep {x.keep_ratio:.3f})" if x else "-"
                                               for x in nm])
        if any(x and x.acc_finetuned is not None for x in nm):
            rows.append([f"{pattern} fine-tuned"] + [f"{100 * x.acc_finetuned:.2f}%"
                                                     if x and x.acc_finetuned is not None else "-" for x in nm])
    forms = ", ".join(f"{m}: {f}" for m, f in report.mask_forms.items())
    return "\n".join(runs.text_table([header] + rows, f"unstructured pruning to keep ratio {report.keep_ratio:g}, "
                                                      f"{report.steps} steps (test top-1 before fine-tuning; "
                                                      f"importance {forms})"))
