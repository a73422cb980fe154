"""Multiply-accumulates of a model, counted on the program (a rule set on the one interpreter).

A `conv_general_dilated` costs output positions × kernel taps × input channels per group × output
channels — padding positions included, as thop and Torch-Pruning count; a `dot_general` costs output
entries × contracted entries. Only products that depend on the inputs count (a product of two
parameters is not per-example work). Products of a parameter layer are `layers`; products of two
activations (`QKᵀ`, `AV`) are `attention` — the authors' counter gave those zero cost, so both sums are
reported. Scans are unrolled (each iteration counts); a product inside `lax.while_loop` is an error
(its trip count is unknown).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax.numpy as jnp

from oba_jax.graph.layers import FoundLayers
from oba_jax.program import Equation, EqnKey, Program, check_param_leaves, run, sub_programs, trace_program
from oba_jax.program.primitives import LAYER_PRODUCTS, product_macs

__all__ = ["MacCount", "count_macs", "count_params", "mac_count"]


@dataclasses.dataclass(frozen=True)
class MacCount:
    """MACs for the batch the program was traced with."""

    layers: int                       # Conv / Dense layers (an operand is a parameter)
    attention: int                    # products of two activations
    by_layer: Mapping[str, int]       # per parameter layer (its name in the connectivity map)

    @property
    def total(self) -> int:
        return self.layers + self.attention


class _Count:
    """Rules: a value is whether it depends on the inputs; products add to the counts."""

    def __init__(self, found: FoundLayers | None):
        self.found = found
        self.layers = 0
        self.attention = 0
        self.by_layer: dict[str, int] = {}

    def constant(self, value: Any) -> bool:
        return False

    def enter(self, eqn: Equation, key: EqnKey, ins: list[bool]) -> bool:
        return True

    def index(self, value: bool, i: int) -> bool:
        return value

    def stack(self, values: list[bool]) -> bool:
        return any(values)

    def equation(self, eqn: Equation, key: EqnKey, ins: list[bool]) -> list[bool]:
        name = eqn.primitive.name
        if name in LAYER_PRODUCTS and any(ins):
            macs = product_macs(eqn)
            if all(ins):
                self.attention += macs
            else:
                self.layers += macs
                use = None if self.found is None else self.found.uses.get(key)
                if use is not None:
                    self.by_layer[use.layer] = self.by_layer.get(use.layer, 0) + macs
        elif name == "while" and any(ins):
            inner = _Count(self.found)
            for jaxpr, consts in sub_programs(eqn):
                run(jaxpr, [False] * len(consts), [True] * len(jaxpr.invars), inner, key)
            if inner.layers or inner.attention:
                raise NotImplementedError("products inside lax.while_loop: their number is not known when the "
                                          "program is analysed; use lax.scan / fori_loop with static bounds")
        return [any(ins)] * len(eqn.outvars)


def mac_count(program: Program, found: FoundLayers | None = None) -> MacCount:
    """The MACs of a traced program; `by_layer` needs its layers (`find_layers`), else it is empty."""
    rules = _Count(found)
    n_params = program.n_params
    run(program.jaxpr, [False] * len(program.consts), [i >= n_params for i in range(len(program.jaxpr.invars))], rules)
    return MacCount(layers=rules.layers, attention=rules.attention, by_layer=MappingProxyType(dict(rules.by_layer)))


def count_macs(apply_fn: Callable, params: Any, example_inputs: Any, *, attention: bool = True) -> int:
    """Multiply-accumulates of `apply_fn(params, inputs)` for the batch given (`attention=False`: layers
    only, the authors' count)."""
    check_param_leaves(params, abstract=True)
    macs = mac_count(trace_program(apply_fn, params, example_inputs))
    return macs.total if attention else macs.layers


def count_params(params: Any) -> int:
    """Entries of the float leaves of `params` (arrays or `jax.ShapeDtypeStruct`s)."""
    return int(sum(math.prod(x.shape) for x in check_param_leaves(params, abstract=True)
                   if jnp.issubdtype(x.dtype, jnp.inexact)))
