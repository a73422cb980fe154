"""Scores for Flax NNX models: the model split into parameters and state, scored functionally."""
from __future__ import annotations

from typing import Any

import dataclasses

import jax
from flax import nnx

from oba_jax.graph import Connectivity, connectivity
from oba_jax.hessian import ScoreResult, score

__all__ = ["model_apply", "model_connectivity", "score_model"]

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


def model_apply(model: nnx.Module, bn_mode: str = "train") -> tuple[Any, dict[str, Any]]:
    """`(apply_fn, variables)` with `apply_fn(variables, x) -> logits` a pure function.

    `variables = {"params": nnx.Param state, "rest": every other state}`. The BatchNorm statistics a
    train-mode forward would write are computed on a throw-away merge, so the caller's model (and
    `variables`) never change.
    """
    graphdef, params, rest = nnx.split(_scoring_copy(model, bn_mode), nnx.Param, ...)

    def apply_fn(variables: dict[str, Any], x: Any) -> jax.Array:
        return nnx.merge(graphdef, variables["params"], variables["rest"], copy=True)(x)

    return apply_fn, {"params": params, "rest": rest}


def _params_view(graph: Connectivity) -> Connectivity:
    """The map with paths relative to the `nnx.Param` state (drops the `params/` prefix and `rest/` leaves)."""
    strip = lambda p: p[len("params/"):] if p is not None and p.startswith("params/") else p
    layers = tuple(dataclasses.replace(l, name=strip(l.name), weight=strip(l.weight), bias=strip(l.bias))
                   for l in graph.layers)
    parallel = tuple(dataclasses.replace(p, operands=tuple(tuple(map(strip, side)) for side in p.operands))
                     for p in graph.parallel)
    return Connectivity(
        layers=layers,
        upstream={strip(k): tuple(map(strip, v)) for k, v in graph.upstream.items()},
        parallel=parallel,
        unscored=tuple(strip(p) for p in graph.unscored if p.startswith("params/")),
        leaf_paths=tuple(strip(p) for p in graph.leaf_paths if p.startswith("params/")))


def model_connectivity(model: nnx.Module, example_inputs: Any, bn_mode: str = "train") -> Connectivity:
    """The connectivity map of an NNX model, with paths relative to its `nnx.Param` state."""
    apply_fn, variables = model_apply(model, bn_mode)
    return _params_view(connectivity(apply_fn, variables, example_inputs))


def score_model(model: nnx.Module, batches: Any, method: str = "oba", *, bn_mode: str = "train",
                **kwargs: Any) -> ScoreResult:
    """`oba_jax.score` for an NNX model; the returned pytrees have the structure of `nnx.Param` state.

    `bn_mode="train"` scores with batch statistics (the authors' setting), `"eval"` with running
    statistics. Scoring never changes the model's BatchNorm running statistics.
    """
    apply_fn, variables = model_apply(model, bn_mode)
    result = score(apply_fn, variables, batches, method, **kwargs)
    parts = None if result.parts is None else {k: v["params"] for k, v in result.parts.items()}
    return ScoreResult(sum=result.sum["params"], count=result.count, method=result.method,
                       parts=parts, graph=_params_view(result.graph) if result.graph else None)
