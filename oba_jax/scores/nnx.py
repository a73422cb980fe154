"""Scores for Flax NNX models: the model split into parameters and state, scored functionally."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from oba_jax.graph import Connectivity, connectivity
from oba_jax.nnx_model import ModelState, merge, split
from oba_jax.scores.importance import get_method
from oba_jax.scores.scoring import ScoreResult, score, scorer

__all__ = ["BN_MODES", "model_apply", "model_connectivity", "model_scorer", "score_model"]

BN_MODES = ("train", "eval")


def _scoring_copy(model: nnx.Module, bn_mode: str) -> nnx.Module:
    """A copy of `model` with BatchNorm in the requested mode and dropout off."""
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    copy = nnx.clone(model)
    for _, module in nnx.iter_modules(copy):
        if isinstance(module, nnx.BatchNorm):
            module.use_running_average = bn_mode == "eval"
        elif isinstance(module, nnx.Dropout):
            module.deterministic = True
    return copy


@functools.lru_cache(maxsize=64)
def _apply_of(graphdef: nnx.GraphDef):
    """One apply function per graph definition, so repeated scores of a model reuse compiled programs."""
    def apply_fn(state: ModelState, x: Any) -> jax.Array:
        return merge(graphdef, state)(x)
    return apply_fn


def model_apply(model: nnx.Module, bn_mode: str = "train") -> tuple[Any, ModelState]:
    """`(apply_fn, state)` with `apply_fn(state, x) -> logits` a pure function of the model's split
    (`oba_jax.nnx_model.ModelState`: params, batch_stats, rest).

    The BatchNorm statistics a train-mode forward would write go to a throw-away merge, so the
    caller's model (and `state`) never change.
    """
    graphdef, state = split(_scoring_copy(model, bn_mode))
    return _apply_of(graphdef), state


def model_connectivity(model: nnx.Module, example_inputs: Any, bn_mode: str = "train") -> Connectivity:
    """The connectivity map of an NNX model, with paths relative to its `nnx.Param` state."""
    apply_fn, state = model_apply(model, bn_mode)
    return connectivity(apply_fn, state, example_inputs).relative_to("params")


# Model state that is not a parameter: held fixed by methods whose direction spans leaves (fastoba's Hθ)
_NOT_PARAMETERS = ("batch_stats", "rest")


def _parameters_only(method: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """θ is the model's parameters: for a method whose scores mix leaves (fastoba's Hθ), BatchNorm running
    statistics (eval mode reads them) and other state are held out of the direction (they were not, and
    eval-mode fastoba was off by 22% of the largest score)."""
    if not get_method(method).mixes_leaves:
        return kwargs
    exclude = kwargs.get("exclude", ())
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    return {**kwargs, "exclude": _NOT_PARAMETERS + exclude}


def score_model(model: nnx.Module, batches: Any, method: str = "oba", *, bn_mode: str = "train",
                **kwargs: Any) -> ScoreResult:
    """`oba_jax.score` for an NNX model; the returned pytrees have the structure of `nnx.Param` state.

    `bn_mode="train"` scores with batch statistics (the authors' setting), `"eval"` with running
    statistics. Scoring never changes the model's BatchNorm running statistics. Only `nnx.Param` leaves
    are parameters: fastoba's direction θ holds no BatchNorm statistics (an `exclude` names leaves of the
    model state, as OBA's does: `"params/fc"`).
    """
    apply_fn, state = model_apply(model, bn_mode)
    return _of_params(score(apply_fn, state, batches, method, **_parameters_only(method, kwargs)))


def _of_params(result: ScoreResult) -> ScoreResult:
    """A result over the whole `ModelState` as one over its `nnx.Param` leaves."""
    parts = None if result.parts is None else {k: v.params for k, v in result.parts.items()}
    return ScoreResult(sum=result.sum.params, count=result.count, method=result.method,
                       parts=parts, graph=result.graph.relative_to("params") if result.graph else None)


def model_scorer(model: nnx.Module, example_inputs: Any, method: str = "oba", *, bn_mode: str = "train",
                 **kwargs: Any) -> Callable[[Any, Any], ScoreResult]:
    """`fn(params, batches) -> ScoreResult` scoring `model` with other values of its `nnx.Param` state
    (e.g. masked ones) through one `Scorer`: every call with params of the same shapes runs the same
    compiled programs. BatchNorm statistics and other state are the model's."""
    apply_fn, state = model_apply(model, bn_mode)
    compiled = scorer(apply_fn, state, example_inputs, method, **_parameters_only(method, kwargs))

    def score_params(params: Any, batches: Any = None) -> ScoreResult:
        return _of_params(compiled(state._replace(params=params), batches))
    return score_params
