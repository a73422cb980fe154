"""Shrinking the program itself: the model's own traced function, evaluated with smaller arrays.

`shrink_params` returns smaller arrays, which only shape-agnostic code can run: real model classes check
parameter shapes against their attributes, reshape to configured head counts, or derive constants (an
attention scale, RoPE frequencies) from widths. `shrink_program` instead traces `apply_fn` once and returns
a function that evaluates that trace equation by equation with every shape that runs along a pruned group
rewritten, from the program's `AxisLayout` (the channel-groups pass with its per-equation axis records):

- parameters come in shrunk (`shrink_params` of the plan); a constant that runs along a pruned axis (a RoPE
  table, a mask) is gathered at its kept positions where it meets the program;
- an equation computed from constants only (an `iota`, `jnp.ones(width)`, a scale derived from a width) is
  evaluated at the dense widths and then gathered: it stays what the dense model computed, as under the mask;
- shape parameters (`reshape`'s sizes, `broadcast_in_dim`'s shape, slice bounds, split sizes, gather and
  dynamic-slice windows, a depthwise conv's feature groups) are recomputed from the kept channels, and the
  batch axis from the inputs given, so the function runs for any batch size (and exports with a symbolic one).

The result computes what the masked model computes (`mask_params`), except on a residual stream under a
norm that centres or averages over the width (LayerNorm, RMSNorm): there removing channels changes the
mean/RMS the norm divides by, while masking keeps dividing by the dense width; `shrink_program` computes
the removal (the norm over the kept channels).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oba_jax.graph import AxisLayout, ChannelGroup, axis_layout
from oba_jax.paths import leaf_paths
from oba_jax.program import Equation, EqnKey, bind, check_param_leaves, run, trace_program
from oba_jax.program.primitives import product_axes
from oba_jax.structured.shrink import kept_positions, shrink_params

__all__ = ["shrink_program"]


@dataclasses.dataclass(frozen=True)
class _Value:
    array: Any
    constant: bool     # computed from literals and closed-over constants only


class _Sizes:
    """Node sizes and kept positions under one plan and one batch size."""

    def __init__(self, layout: AxisLayout, kept: Mapping[int, np.ndarray], batch: Any):
        self.layout, self.kept, self.batch = layout, kept, batch

    def shape(self, axes: Sequence[int | None], traced: Sequence[int], dense: bool = False) -> tuple:
        kept = {} if dense else self.kept
        return tuple(self.layout.size(n, kept, self.batch, full) for n, full in zip(axes, traced))

    def positions(self, n: int | None) -> np.ndarray | None:
        return self.layout.positions(n, self.kept)


def _take(array: Any, axes: Sequence[int | None], sizes: _Sizes) -> Any:
    """`array` (dense along its channel axes) at the kept positions of every pruned axis."""
    for d, n in enumerate(axes):
        pos = sizes.positions(n)
        if pos is not None and np.shape(array)[d] != len(pos):
            array = jnp.take(array, jnp.asarray(pos), axis=d)
    return array


def _bounds(pos: np.ndarray | None, lo: int, hi: int) -> tuple[int, int]:
    """`[lo, hi)` of a traced axis as bounds on its kept positions."""
    if pos is None:
        return lo, hi
    return int(np.searchsorted(pos, lo)), int(np.searchsorted(pos, hi))


def _rewritten(eqn: Equation, ins: Sequence[tuple], outs: Sequence[tuple], sizes: _Sizes, dense: bool) -> dict:
    """The equation's parameters for the new shapes (`dense`: channels at full width, the batch as given)."""
    name, params = eqn.primitive.name, dict(eqn.params)
    out_shapes = [sizes.shape(axes, var.aval.shape, dense) for axes, var in zip(outs, eqn.outvars)]
    in_shapes = [sizes.shape(axes, var.aval.shape, dense) if hasattr(var, "aval") else ()
                 for axes, var in zip(ins, eqn.invars)]
    pos = (lambda n: None) if dense else sizes.positions
    if name == "reshape":
        params["new_sizes"] = out_shapes[0]
    elif name in ("broadcast_in_dim", "iota") or ("shape" in params and isinstance(params["shape"], tuple)):
        params["shape"] = out_shapes[0]
    elif name == "slice":
        starts, limits = list(params["start_indices"]), list(params["limit_indices"])
        for d, n in enumerate(ins[0]):
            traced = eqn.invars[0].aval.shape[d]
            if sizes.layout.is_batch(n) and (starts[d], limits[d]) == (0, traced):
                limits[d] = in_shapes[0][d]
            else:
                starts[d], limits[d] = _bounds(pos(n), starts[d], limits[d])
        params["start_indices"], params["limit_indices"] = tuple(starts), tuple(limits)
    elif name == "split":
        d, cuts = params["axis"], np.cumsum((0,) + tuple(params["sizes"]))
        p = pos(ins[0][d])
        if p is not None:
            new = [_bounds(p, int(lo), int(hi)) for lo, hi in zip(cuts[:-1], cuts[1:])]
            params["sizes"] = tuple(hi - lo for lo, hi in new)
    elif name in ("gather", "dynamic_slice"):
        traced = eqn.invars[0].aval.shape
        params["slice_sizes"] = tuple(in_shapes[0][d] if s == traced[d] else s
                                      for d, s in enumerate(params["slice_sizes"]))
    elif name == "conv_general_dilated" and params["feature_group_count"] > 1:
        (c_in,), _ = product_axes(eqn).contracted
        if in_shapes[0][c_in] != eqn.invars[0].aval.shape[c_in]:   # depthwise: one group per kept channel
            params["feature_group_count"] = in_shapes[0][c_in]
    return params


class _Shrunk:
    """Rules of `run`: values are arrays, evaluated with the program's shapes rewritten."""

    def __init__(self, layout: AxisLayout, sizes: _Sizes):
        self.layout, self.sizes = layout, sizes

    def constant(self, value: Any) -> _Value:
        return _Value(value, True)

    def enter(self, eqn: Equation, key: EqnKey, ins: list[_Value]) -> bool:
        return key in self.layout.entered

    def index(self, value: _Value, i: int) -> _Value:
        return _Value(value.array[i], value.constant)

    def stack(self, values: list[_Value]) -> _Value:
        return _Value(jnp.stack([v.array for v in values]), all(v.constant for v in values))

    def equation(self, eqn: Equation, key: EqnKey, ins: list[_Value]) -> list[_Value]:
        record = self.layout.equations.get(key)
        if record is None:   # the groups pass did not see it (cannot happen for a program it walked)
            raise RuntimeError(f"`{eqn.primitive.name}` was not recorded by the layout pass")
        in_axes, out_axes = record
        constant = all(v.constant for v in ins)
        params = _rewritten(eqn, in_axes, out_axes, self.sizes, dense=constant)
        args = [v.array if constant else _take(v.array, axes, self.sizes) for v, axes in zip(ins, in_axes)]
        outs = _bind(eqn, params, args)
        if constant:   # what the dense model computed, at the kept positions
            outs = [_take(o, axes, self.sizes) for o, axes in zip(outs, out_axes)]
        return [_Value(o, constant) for o in outs]


def _bind(eqn: Equation, params: Mapping[str, Any], args: Sequence[Any]) -> list[Any]:
    return bind(eqn.replace(params=dict(params)), args)


def shrink_program(apply_fn: Callable[[Any, Any], Any], params: Any, example_inputs: Any,
                   groups: Sequence[ChannelGroup], kept: Mapping[str, Any]) -> tuple[Callable[[Any, Any], Any], Any]:
    """`(small_apply_fn, small_params)`: `apply_fn`'s own traced program with every shape that runs along a
    pruned group rewritten (see the module docstring), and the shrunk parameters it takes.

    `groups`: `channel_groups(apply_fn, params, example_inputs)` (or a subset); `kept`: `{group name: sorted
    channel indices to keep}`. `small_apply_fn(small_params, inputs)` is jittable, differentiable and
    exportable (`jax.export`, with a symbolic batch size); it computes the masked model's function."""
    leaves = check_param_leaves(params)
    x_leaves = jax.tree_util.tree_leaves(example_inputs)
    if not x_leaves or any(np.ndim(a) == 0 or np.shape(a)[0] < 2 for a in x_leaves):
        raise ValueError("shrink_program needs example inputs with a batch axis of at least 2 examples (a batch "
                         "of 1 cannot be told apart from a broadcast axis, and the program must run for any batch); "
                         f"got shapes {[np.shape(a) for a in x_leaves]}")
    program = trace_program(apply_fn, params, example_inputs)
    layout = axis_layout(program)
    shapes = {p: np.shape(x) for p, x in zip(leaf_paths(params), leaves)}
    atoms = layout.kept_channels(kept_positions(groups, kept, shapes))
    small_params = shrink_params(params, groups, kept)
    treedef = jax.tree_util.tree_structure(params)
    in_treedef = jax.tree_util.tree_structure(example_inputs)
    consts = list(program.consts)

    def small_apply_fn(small: Any, inputs: Any) -> Any:
        p_leaves, p_def = jax.tree_util.tree_flatten(small)
        x_leaves, x_def = jax.tree_util.tree_flatten(inputs)
        if p_def != treedef or x_def != in_treedef:
            raise ValueError("small_apply_fn takes the parameter and input structures shrink_program was given")
        batch = np.shape(x_leaves[0])[0]
        rules = _Shrunk(layout, _Sizes(layout, atoms, batch))
        args = [_Value(a, False) for a in (*p_leaves, *x_leaves)]
        (out,) = run(program.jaxpr, [rules.constant(c) for c in consts], args, rules)
        return out.array

    return small_apply_fn, small_params
