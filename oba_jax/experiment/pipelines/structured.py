"""Structured prune-and-finetune from a config: the modes "oneshot" and "iterative" of `prune.py`.

    dense model (prune.pretrained, or trained into WORKDIR/dense, resumable)
      └─ per target ops ratio: the step schedule (OBA_SPEC.md §5) scores a *masked* model of fixed shapes
         with one compiled scorer, selects channels, stops at the target; then one physical shrink
         └─ evaluate (before fine-tuning) → fine-tune into WORKDIR/ops_<target> (a stage with a manifest:
            resumed only from the same inputs) → evaluate, latency of the jitted forward (dense and pruned)
      └─ WORKDIR/report.json (`reports.StructuredReport`), widths.png, accuracy_vs_ops.png, a table

"oneshot" restarts every target from the dense model; "iterative" takes the targets in decreasing order
and continues from each fine-tuned model.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from oba_jax import nnx_model
from oba_jax.experiment import config as config_lib
from oba_jax.experiment import runs, training
from oba_jax.experiment.pipelines.reports import ScheduleStep, StructuredReport, TargetResult, publish
from oba_jax.graph import GroupGraph
from oba_jax.paths import flat_by_path, matches
from oba_jax.scores import score_model
from oba_jax.structured import group_scores, mask_model, model_group_graph, shrink_model
from oba_jax.structured.nnx import is_param
from oba_jax.structured.select import OutOfReachError, Selection, prune_to_ops

__all__ = ["check_settings", "plot", "prune_once", "run", "table"]


def _latency_batch(dataset, size: int) -> jax.Array:
    """The first `size` test images, normalised: the batch both latencies are measured on."""
    from oba_jax.experiment import inputs
    from oba_jax.experiment.data import preprocess_batch
    images, _ = inputs.examples(dataset, "test", range(min(size, dataset.num_test)))
    return preprocess_batch(jnp.asarray(images), None, augment=False, mean=dataset.mean, std=dataset.std)


def _latencies_ms(models: list[nnx.Module], x: jax.Array, repeats: int) -> list[float]:
    """Median times of the models' jitted eval-mode forwards on `x`, timed in alternating rounds (one
    call of each per round, after one untimed call), so a slow spell of a shared machine falls on all."""
    forwards = []
    for model in models:
        graphdef, state = nnx_model.split(model)

        @jax.jit
        def forward(state, x, graphdef=graphdef):
            m = nnx_model.merge(graphdef, state)
            m.eval()
            return m(x)

        jax.block_until_ready(forward(state, x))
        forwards.append((forward, state))
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for k, (forward, state) in enumerate(forwards):
            t0 = time.perf_counter()
            jax.block_until_ready(forward(state, x))
            times[k].append(time.perf_counter() - t0)
    return [1000 * statistics.median(t) for t in times]


def _graph(model: nnx.Module, config: ml_collections.ConfigDict, example: jax.Array) -> GroupGraph:
    p = config.prune
    return model_group_graph(model, example, ignore=tuple(p.ignored_layers), bn_mode=p.bn_mode)


def _selection(graph: GroupGraph, p: ml_collections.ConfigDict) -> tuple[Selection, tuple]:
    """The configured selection and the groups it may prune in `graph` (ConfigError if none)."""
    try:
        selection = Selection(global_pruning=p.global_pruning, max_pruning_ratio=p.max_pruning_ratio,
                              round_to=p.round_to, kinds=tuple(p.kinds))
        return selection, selection.selectable(graph.groups)
    except ValueError as e:   # e.g. ignored_layers / kinds that leave nothing to prune
        raise config_lib.ConfigError(f"config.prune: {e}") from None


def check_settings(outline: nnx.Module, example: jax.Array, config: ml_collections.ConfigDict) -> None:
    """ConfigError unless `prune.ignored_layers` name layers (path prefixes) or groups of the model and the
    selection leaves something to prune (`outline`: a model of its structure, e.g. `runs.model_outline`)."""
    p = config.prune
    graph = _graph(outline, config, example)
    paths = flat_by_path(training.split_model(outline)[1])
    names = {g.name for g in graph.groups}
    unknown = [e for e in p.ignored_layers if e not in names and not any(matches(path, (e,)) for path in paths)]
    if unknown:
        raise config_lib.ConfigError(f"config.prune.ignored_layers: {unknown} match no layer or group of the model "
                                     f"(groups: {sorted(names)})")
    _selection(graph, p)


def prune_once(model: nnx.Module, graph: GroupGraph, config: ml_collections.ConfigDict, target: float,
               batches: tuple[jax.Array, jax.Array], dense_macs: int) -> tuple[nnx.Module, dict]:
    """One target: the schedule on the masked model, then the shrink. `target` is relative to the dense
    model (`dense_macs`); `model` (with its `graph`) may already be pruned (iterative)."""
    p = config.prune
    selection, chosen = _selection(graph, p)
    current = graph.macs(attention=p.count_attention)
    relative = target * dense_macs / current
    if not 0 < relative < 1:
        raise config_lib.ConfigError(f"config.prune.ops_ratios: target {target} is not below the current model's "
                                     f"ops ratio {current / dense_macs:.3f}")
    final = p.final_ratio if p.final_ratio is not None else (1 - 0.9 * relative if p.mode == "oneshot" else 0.955)
    bar = runs.progress(p.steps, f"prune to {target:g}")

    def score_fn(plan):
        masked = mask_model(model, graph.groups, plan)
        result = score_model(masked, batches, p.importance, bn_mode=p.bn_mode,
                             **runs.method_options(config, p.importance))
        return group_scores(result, chosen, p.normalizer)

    def on_step(record):
        bar.set_postfix(ops=f"{record['ops_ratio'] * current / dense_macs:.3f}")
        bar.update(1)

    try:
        plan, history = prune_to_ops(graph, score_fn, relative, final_ratio=final, steps=p.steps, selection=selection,
                                     attention=p.count_attention, params=is_param, on_step=on_step)
    except OutOfReachError as e:
        keys = "config.prune.ops_ratios" + (f" / config.prune.round_to ({p.round_to})" if p.round_to > 1 else "")
        hint = (f"; round_to={p.round_to} keeps every group's width a multiple of {p.round_to}, so groups narrower "
                "than that cannot be pruned: lower prune.round_to" if p.round_to > 1 else "")
        raise config_lib.ConfigError(f"{keys}: {e}{hint}") from None
    finally:
        bar.close()
    small = shrink_model(model, graph.groups, plan)
    scale = current / dense_macs
    steps = tuple(ScheduleStep(**{**record, "ops_ratio": record["ops_ratio"] * scale}) for record in history)
    widths_before = {g.name: g.size for g in chosen}
    widths_after = {name: int(len(plan.get(name, range(size)))) for name, size in widths_before.items()}
    return small, {"history": steps, "widths_before": widths_before, "widths_after": widths_after}


def run(config: ml_collections.ConfigDict, workdir: str) -> StructuredReport:
    """The whole experiment of a config (see the module docstring); returns the report it writes."""
    begin = runs.start(config, workdir, check=lambda outline, example: check_settings(outline, example, config))
    dataset, dense, source, batches = begin.dataset, begin.dense, begin.source, begin.batches
    p = config.prune
    eval_bs = config.train.eval_batch_size
    example = batches[0][0][:1]
    dense_graph = _graph(dense, config, example)
    dense_macs = {a: dense_graph.macs(attention=a) for a in (True, False)}
    dense_params = dense_graph.params(include=is_param)
    acc_dense = training.evaluate_model(dense, dataset, eval_bs)
    latency_x = _latency_batch(dataset, eval_bs)
    targets = sorted(p.ops_ratios, reverse=True) if p.mode == "iterative" else list(p.ops_ratios)
    results, model, model_graph = [], dense, dense_graph
    ft_config = config_lib.finetune_config(config)
    previous = ""
    for target in targets:
        start, start_graph = (dense, dense_graph) if p.mode == "oneshot" else (model, model_graph)
        run_dir = os.path.join(workdir, f"ops_{target:g}")
        # before the schedule: a directory of other inputs is refused in seconds, not after the scoring
        begin.claim(config, run_dir, "structured", start=None if start is dense else start,
                    start_from=previous, target_ops_ratio=target)
        small, info = prune_once(start, start_graph, config, target, batches, dense_macs[p.count_attention])
        graph = _graph(small, config, example)
        acc_pruned = training.evaluate_model(small, dataset, eval_bs)
        tuned, final = training.fit(small, dataset, ft_config, run_dir)
        latency_dense, latency_pruned = _latencies_ms([dense, tuned], latency_x, p.latency_repeats)
        macs = {a: graph.macs(attention=a) for a in (True, False)}
        results.append(TargetResult(
            target_ops_ratio=target, ops_ratio=macs[p.count_attention] / dense_macs[p.count_attention],
            ops_ratio_without_attention=macs[False] / dense_macs[False],
            params_ratio=graph.params(include=is_param) / dense_params, macs_dense=dense_macs[p.count_attention],
            macs_pruned=macs[p.count_attention], params_dense=dense_params,
            params_pruned=graph.params(include=is_param),
            acc_dense=acc_dense["top1"], acc_pruned=acc_pruned["top1"], acc_finetuned=final["top1"],
            latency_dense_ms=latency_dense, latency_pruned_ms=latency_pruned, latency_batch=int(latency_x.shape[0]),
            checkpoint=os.path.abspath(run_dir), spec=_spec_dict(tuned), **info))
        model, model_graph = tuned, graph   # fine-tuning changes values, not the structure
        previous = f"the fine-tuned model of {run_dir}"
    report = StructuredReport(mode=p.mode, importance=p.importance, bn_mode=p.bn_mode,
                              dense_checkpoint=os.path.abspath(source), macs_per_image=True,
                              count_attention=p.count_attention, targets=tuple(results))
    return publish(report, workdir, plot, config)


def _spec_dict(model: nnx.Module) -> Any:
    spec = getattr(model, "spec", None)
    if spec is None:
        return None
    import json
    from models import spec_to_dict
    return json.loads(json.dumps(spec_to_dict(spec)))   # as report.json holds it (lists, not tuples)


def plot(report: StructuredReport, workdir: str) -> list[str]:
    """`widths.png` (per-group widths before/after, one panel per target) and `accuracy_vs_ops.png`."""
    plt = runs.pyplot()

    targets = report.targets
    paths = []
    fig, axes = plt.subplots(len(targets), 1, figsize=(max(6, 0.35 * len(targets[0].widths_before) + 2),
                                                         2.8 * len(targets)), squeeze=False)
    for ax, t in zip(axes[:, 0], targets):
        names = list(t.widths_before)
        pos = np.arange(len(names))
        ax.bar(pos, [t.widths_before[n] for n in names], color="#cccccc", label="dense")
        ax.bar(pos, [t.widths_after[n] for n in names], color="#1f77b4", label="pruned")
        ax.set_xticks(pos, [n.replace("/kernel", "") for n in names], rotation=70, fontsize=7)
        ax.set_ylabel("channels")
        ax.set_title(f"ops ratio {t.ops_ratio:.3f} (target {t.target_ops_ratio:g})", fontsize=9)
        ax.legend(fontsize=7)
    paths.append(runs.save_figure(fig, workdir, "widths.png"))

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ops = [1.0] + [t.ops_ratio for t in targets]
    ax.plot(ops, [100 * targets[0].acc_dense] + [100 * t.acc_finetuned for t in targets], "o-", label="fine-tuned")
    ax.plot(ops[1:], [100 * t.acc_pruned for t in targets], "s--", label="pruned, before fine-tuning")
    ax.set_xlabel("ops ratio (MACs kept)")
    ax.set_ylabel("test top-1 (%)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(runs.save_figure(fig, workdir, "accuracy_vs_ops.png"))
    return paths


def table(report: StructuredReport) -> str:
    """Dense vs pruned, one block per target: accuracy, MACs, parameters, latency."""
    lines = []
    for t in report.targets:
        rows = [("", "dense", "pruned"),
                ("test top-1", f"{100 * t.acc_dense:.2f}%",
                 f"{100 * t.acc_finetuned:.2f}% ({100 * t.acc_pruned:.2f}% before fine-tuning)"),
                ("MACs / image", f"{t.macs_dense:,}", f"{t.macs_pruned:,} ({t.ops_ratio:.3f}×)"),
                ("parameters", f"{t.params_dense:,}", f"{t.params_pruned:,} ({t.params_ratio:.3f}×)"),
                (f"latency (batch {t.latency_batch})", f"{t.latency_dense_ms:.2f} ms",
                 f"{t.latency_pruned_ms:.2f} ms ({t.latency_pruned_ms / t.latency_dense_ms:.3f}×)")]
        lines += runs.text_table([list(r) for r in rows],
                                 f"target ops ratio {t.target_ops_ratio:g} ({report.importance}, {report.mode})")
    return "\n".join(lines)
