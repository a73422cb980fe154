"""The one schema of `report.json`: frozen records written with `dataclasses.asdict` and read back by
`load_report`, used by the pipelines that write them, their tables and plots, and the tests.

Every mode's report is a dataclass with a `mode` field; `load_report(path)` rebuilds the right one from the
JSON (nested records, tuples and optional fields included), so the keys on disk and the fields in code are
the same names by construction.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable
from typing import Any, Union

from oba_jax.experiment.hosts import is_writer

__all__ = ["REPORT_FILE", "FineTunedMasks", "FinalMasks", "KeepPoint", "KeepStep", "MaskSummary", "MethodResult",
           "NMResult", "Report", "ScheduleStep", "ScoreReport", "StructuredReport", "TargetResult", "UnstructuredReport",
           "load_report", "publish", "report_from_dict", "write_report"]

REPORT_FILE = "report.json"


# ----------------------------------------------------------------------------- structured


@dataclasses.dataclass(frozen=True)
class ScheduleStep:
    """One step of the structured schedule (OBA_SPEC.md §5); ratios relative to the dense model."""

    step: int
    channel_ratio: float
    ops_ratio: float
    params_ratio: float
    refined: bool = False     # the last step: the search for a plan in [target - 0.01, target]


@dataclasses.dataclass(frozen=True)
class TargetResult:
    """One target ops ratio: the pruned model before and after fine-tuning, against the dense one."""

    target_ops_ratio: float
    ops_ratio: float
    ops_ratio_without_attention: float
    params_ratio: float
    macs_dense: int
    macs_pruned: int
    params_dense: int
    params_pruned: int
    acc_dense: float
    acc_pruned: float
    acc_finetuned: float
    latency_dense_ms: float
    latency_pruned_ms: float
    latency_batch: int
    checkpoint: str
    spec: Any
    history: tuple[ScheduleStep, ...]
    widths_before: dict[str, int]
    widths_after: dict[str, int]


@dataclasses.dataclass(frozen=True)
class StructuredReport:
    """`mode` "oneshot" or "iterative"."""

    mode: str
    importance: str
    bn_mode: str
    dense_checkpoint: str
    macs_per_image: bool
    count_attention: bool
    targets: tuple[TargetResult, ...]


# ----------------------------------------------------------------------------- unstructured


@dataclasses.dataclass(frozen=True)
class KeepStep:
    """One step of the progressive unstructured schedule (OBA_SPEC.md §6)."""

    step: int
    target_keep_ratio: float
    keep_ratio: float
    scored_batches: int


@dataclasses.dataclass(frozen=True)
class MaskSummary:
    """How much of the scored leaves a set of masks keeps."""

    keep_ratio: float
    sparsity: float
    size: int
    kept: int
    layers: dict[str, float]   # sparsity per scored leaf


@dataclasses.dataclass(frozen=True)
class KeepPoint(MaskSummary):
    """The masks at one report ratio and their test accuracy (no fine-tuning)."""

    target_keep_ratio: float
    acc: float


@dataclasses.dataclass(frozen=True)
class FineTunedMasks(MaskSummary):
    """Masks after masked fine-tuning into `checkpoint` (`acc_finetuned` None: finetune.epochs = 0)."""

    acc_finetuned: float | None
    finetune_steps: int
    checkpoint: str


@dataclasses.dataclass(frozen=True)
class NMResult(FineTunedMasks):
    """The one-shot N:M masks from the dense model's scores; `acc` before fine-tuning."""

    pattern: str
    acc: float


@dataclasses.dataclass(frozen=True)
class FinalMasks(FineTunedMasks):
    """The schedule's final masks; `acc_pruned` before fine-tuning."""

    acc_pruned: float


@dataclasses.dataclass(frozen=True)
class MethodResult:
    points: tuple[KeepPoint, ...]
    history: tuple[KeepStep, ...]
    schedule_seconds: float
    final: FinalMasks
    n_m: NMResult | None = None


@dataclasses.dataclass(frozen=True)
class UnstructuredReport:
    mode: str                 # "unstructured"
    importance: str
    methods: tuple[str, ...]
    keep_ratio: float
    steps: int
    score_batches: int
    score_batch_size: int
    bn_mode: str
    exclude: tuple[str, ...]
    dense_checkpoint: str
    acc_dense: float
    scored_leaves: tuple[str, ...]
    results: dict[str, MethodResult]
    # per method, how its scores became importance (`unstructured.MASK_FORMS`); empty in reports written before
    mask_forms: dict[str, str] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- score


@dataclasses.dataclass(frozen=True)
class ScoreReport:
    """`mode` "score": the importance scores of the dense model, written to `output`."""

    mode: str                 # "score"
    method: str
    dense_checkpoint: str
    dataset: str
    batches: int
    batch_size: int
    bn_mode: str
    dtype: str
    seconds: float
    output: str
    per_leaf_abs_mean: dict[str, float]
    layers: int | None = None              # OBA only: the connectivity map's layers and parallel products
    parallel_products: int | None = None


Report = Union[StructuredReport, UnstructuredReport, ScoreReport]
_BY_MODE: dict[str, type] = {"oneshot": StructuredReport, "iterative": StructuredReport,
                             "unstructured": UnstructuredReport, "score": ScoreReport}


# ----------------------------------------------------------------------------- reading and writing


def write_report(report: Report, workdir: str) -> str:
    """`workdir/report.json` from `asdict(report)`, written to a temporary file and renamed (a report on disk
    is always complete); the path."""
    path = os.path.join(workdir, REPORT_FILE)
    if not is_writer():   # (another process of this run writes it)
        return path
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(report), f, indent=2, default=float)
    os.replace(tmp, path)
    return path


def publish(report: Report, workdir: str, plot: Callable[[Report, str], list[str]], config: Any) -> Report:
    """What every pipeline ends with: the report written, then its plots (unless `config.plot.enabled` is
    false)."""
    write_report(report, workdir)
    if config.get("plot", {}).get("enabled", True):
        plot(report, workdir)
    return report


def _build(kind: Any, value: Any) -> Any:
    """`value` (parsed JSON) as an instance of the annotation `kind`."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        return _build(next(a for a in args if a is not type(None)), value)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        return kind(**{f.name: _build(hints[f.name], value[f.name]) for f in dataclasses.fields(kind)
                       if f.name in value})
    if origin is tuple:
        return tuple(_build(args[0], v) for v in value)
    if origin is dict:
        return {k: _build(args[1], v) for k, v in value.items()}
    return value


def report_from_dict(data: dict) -> Report:
    """The report record of a parsed `report.json` (its `mode` says which)."""
    mode = data.get("mode")
    if mode not in _BY_MODE:
        raise ValueError(f"not a prune.py report: mode {mode!r} is none of {sorted(_BY_MODE)}")
    return _build(_BY_MODE[mode], data)


def load_report(path: str) -> Report:
    """The report in `path` (a `report.json`, or the workdir holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, REPORT_FILE)
    with open(path) as f:
        return report_from_dict(json.load(f))
