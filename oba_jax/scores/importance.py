"""The importance methods: one registry, looked up once (`IMPORTANCE`, `METHODS`).

Each `Method` says what it needs (data, the OBA analysis), which options it takes (with defaults) and
how its per-batch function is built. `score` / `scorer` validate a call's options against the entry,
so an option of one method passed to another is an error, not silently ignored.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax

from oba_jax.graph import Analysis
from oba_jax.paths import matches
from oba_jax.program import Program
from oba_jax.scores.baselines import fastoba_batch, taylor_batch
from oba_jax.scores.oba import ObaSetup, oba_batch

__all__ = ["IMPORTANCE", "METHODS", "Method", "MethodContext", "get_method"]

BatchFn = Callable[[Sequence[Any], Sequence[Any], jax.Array], dict[str, list]]


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """What a per-batch function is built from."""

    program: Program
    analysis: Analysis | None
    float_idx: tuple[int, ...]
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # the method's own options and their defaults
    options: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    needs_data: bool = True
    needs_analysis: bool = False
    build: Callable[[MethodContext], BatchFn] | None = None
    # how unstructured masks turn the method's summed scores into per-weight importance
    # (`oba_jax.unstructured.MASK_FORMS`): "oba", the authors' per-leaf normalised score plus |w|,
    # or "global", the method's own |score| under one global threshold (global |w|, global |θ·g|)
    mask_form: str = "global"
    # whether one leaf's score depends on every leaf of θ (fastoba's Hθ): model state that is not a
    # parameter (BatchNorm statistics) must then be held out of θ (`score_model` does, through `exclude`)
    mixes_leaves: bool = False

    def scored(self, ctx: MethodContext) -> tuple[int, ...]:
        """The leaves this method scores (the rest get zeros)."""
        return ctx.analysis.theta if self.needs_analysis else _varied(ctx)

    def resolve(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The method's options with defaults filled in; a clear error for one it does not take."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            owners = sorted(m.name for m in IMPORTANCE.values() if set(unknown) & set(m.options))
            hint = f" (an option of {', '.join(owners)})" if owners else ""
            raise ValueError(f"method {self.name!r} takes no option {', '.join(map(repr, unknown))}{hint}; "
                             f"its options: {sorted(self.options) or 'none'}")
        resolved = {**self.options, **options}
        if "exclude" in resolved:
            exclude = resolved["exclude"]
            resolved["exclude"] = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        for name in ("upward_delta", "downward_delta", "parallel_delta"):
            if name in resolved:
                resolved[name] = float(resolved[name])
        for name in ("parts", "first_order"):
            if name in resolved:
                resolved[name] = bool(resolved[name])
        if "seed" in resolved:
            resolved["seed"] = int(resolved["seed"])
        return resolved


def _oba(ctx: MethodContext) -> BatchFn:
    o = ctx.options
    setup = ObaSetup(analysis=ctx.analysis, loss=ctx.loss, parts=o["parts"], first_order=o["first_order"],
                     deltas=(o["upward_delta"], o["downward_delta"], o["parallel_delta"]))
    return functools.partial(oba_batch, setup)


def _baseline(batch: Callable) -> Callable[[MethodContext], BatchFn]:
    return lambda ctx: functools.partial(batch, ctx.program, ctx.loss, _varied(ctx))


def _varied(ctx: MethodContext) -> tuple[int, ...]:
    """The float leaves a baseline differentiates in: all but the `exclude`d ones (held fixed, scored 0).
    For fastoba this is the direction of Hθ, so a leaf in it changes every other leaf's score."""
    exclude = ctx.options.get("exclude", ())
    return tuple(i for i in ctx.float_idx if not matches(ctx.program.paths[i], exclude))


IMPORTANCE: Mapping[str, Method] = MappingProxyType({
    "oba": Method(
        "oba", "θ ⊙ H̃θ with OBA's Hessian (series and parallel products only), θ = layer weights and biases",
        options=MappingProxyType({"parts": False, "first_order": False, "upward_delta": 1.0,
                                  "downward_delta": 1.0, "parallel_delta": 1.0, "exclude": ()}),
        needs_analysis=True, build=_oba, mask_form="oba"),
    "fastoba": Method("fastoba", "θ ⊙ Hθ with the full Hessian over all parameters (not OBA); `exclude`: leaves "
                                 "held fixed (not in θ)",
                      options=MappingProxyType({"exclude": ()}), build=_baseline(fastoba_batch), mask_form="oba",
                      mixes_leaves=True),
    "taylor": Method("taylor", "θ ⊙ ∂L/∂θ", build=_baseline(taylor_batch)),
    "magnitude": Method("magnitude", "|θ|", needs_data=False),
    "random": Method("random", "seeded uniform numbers", options=MappingProxyType({"seed": 0}), needs_data=False),
})
METHODS: tuple[str, ...] = tuple(IMPORTANCE)


def get_method(name: str) -> Method:
    if name not in IMPORTANCE:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
    return IMPORTANCE[name]
