"""The one split of a Flax NNX model: `(graphdef, ModelState(params, batch_stats, rest))`.

Training, scoring, checkpoints and shrinking all see a model as this split: `params` are the
`nnx.Param` leaves (what is trained, scored and pruned), `batch_stats` the `nnx.BatchStat` leaves
(BatchNorm running statistics: updated by train-mode forwards, sliced with their channels) and `rest`
everything else (kept as it is).
"""
from __future__ import annotations

from typing import Any, NamedTuple

from flax import nnx

__all__ = ["ModelState", "merge", "split"]


class ModelState(NamedTuple):
    params: Any
    batch_stats: Any
    rest: Any


def split(model: nnx.Module) -> tuple[nnx.GraphDef, ModelState]:
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return graphdef, ModelState(params, batch_stats, rest)


def merge(graphdef: nnx.GraphDef, state: ModelState) -> nnx.Module:
    """The module back from its split. Fresh Variables (`copy=True`), so that inside a transformation
    (`jax.grad`, `jax.jit`) a train-mode forward may update statistics created at that trace level,
    and the caller's arrays are never written to."""
    return nnx.merge(graphdef, state.params, state.batch_stats, state.rest, copy=True)
