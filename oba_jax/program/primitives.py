"""Classes of primitives, by how the OBA analyses treat them: the one table the layer search, the channel
groups, the MAC counter and the connectivity read (a new primitive is taught here)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp

__all__ = ["ELEMENTWISE", "IDENTITY_LIKE", "LAYER_PRODUCTS", "PRODUCTS", "SHAPE_OPS", "UNARY_VIEWS", "ProductAxes",
           "is_float", "is_linear", "moved_axes", "product_axes", "product_macs", "reshape_groups"]

# Every output is its operand, entry for entry and axis for axis (a cast or a copy at most): sharding and
# layout annotations, barriers, names. Values, views, layers and channels pass through unchanged.
IDENTITY_LIKE = frozenset({
    "sharding_constraint", "optimization_barrier", "device_put", "pjit_sharding", "name", "copy", "copy_p",
    "convert_element_type", "reduce_precision",
})
# One operand, only moves / copies / casts entries: a view of a parameter stays a view of it.
UNARY_VIEWS = IDENTITY_LIKE | frozenset({"reshape", "transpose", "broadcast_in_dim", "squeeze", "expand_dims", "rev",
                                         "slice"})
# Reshape-like: change the shape, not the order of entries.
SHAPE_OPS = frozenset({"reshape", "squeeze", "expand_dims"})
# Linear in every operand that depends on the parameters (given `is_linear`'s conditions).
_LINEAR = UNARY_VIEWS | frozenset({
    "add", "add_any", "sub", "neg", "concatenate", "stack", "pad", "reduce_sum", "dynamic_slice",
    "dynamic_update_slice", "gather", "select_n", "split", "cumsum", "real", "imag", "complex", "conj",
    "mul", "div", "dot_general", "conv_general_dilated", "reduce_window_sum", "scatter-add", "scatter_add", "psum",
})
# Entry i of the output depends on entry i of every operand (after broadcasting): axes map to themselves.
ELEMENTWISE = IDENTITY_LIKE | frozenset({
    "add", "add_any", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem", "nextafter", "and", "or",
    "xor", "eq", "ne", "lt", "le", "gt", "ge", "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh",
    "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "asinh", "acosh", "atanh",
    "abs", "sign", "floor", "ceil", "round", "sqrt", "rsqrt", "cbrt", "square", "integer_pow", "erf",
    "erfc", "erf_inv", "lgamma", "digamma", "is_finite", "not", "stop_gradient", "real", "imag", "conj",
    "complex", "clamp", "population_count", "shift_left", "shift_right_logical", "shift_right_arithmetic",
    "select_n",
})
# Bilinear: linear in each operand separately.
PRODUCTS = frozenset({"mul", "dot_general", "conv_general_dilated"})
# The products a Conv/Dense layer is made of (a weight operand and an activation operand).
LAYER_PRODUCTS = frozenset({"dot_general", "conv_general_dilated"})


def moved_axes(eqn: Any) -> tuple[int | None, ...]:
    """For a view that moves whole axes (transpose, broadcast_in_dim) or keeps them (IDENTITY_LIKE, rev,
    slice): for every output axis, the input axis it is (None: a new or broadcast axis). Reshapes regroup
    axes instead (`reshape_groups`)."""
    name = eqn.primitive.name
    if name == "transpose":
        return tuple(eqn.params["permutation"])
    in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
    if name == "broadcast_in_dim":
        source: list[int | None] = [None] * len(out_shape)
        for a, d in enumerate(eqn.params["broadcast_dimensions"]):
            if in_shape[a] == out_shape[d]:
                source[d] = a
        return tuple(source)
    if name in IDENTITY_LIKE or name in ("rev", "slice"):
        return tuple(range(len(out_shape)))
    raise ValueError(f"`{name}` does not move whole axes")


@dataclasses.dataclass(frozen=True)
class ProductAxes:
    """How a layer product moves axes, per operand (lhs, rhs): the axes it contracts (paired), its batch axes
    (a dot's, paired; shared with the output), its free axes and the output axes they become. A conv's
    spatial axes are neither (windows: `spatial` lists the lhs / rhs / output ones)."""

    contracted: tuple[tuple[int, ...], tuple[int, ...]]
    batch: tuple[tuple[int, ...], tuple[int, ...]]
    out_batch: tuple[int, ...]
    free: tuple[tuple[int, ...], tuple[int, ...]]
    out_free: tuple[tuple[int, ...], tuple[int, ...]]
    spatial: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] = ((), (), ())


def product_axes(eqn: Any) -> ProductAxes:
    """The `ProductAxes` of a `dot_general` (output: batch, lhs free, rhs free) or a `conv_general_dilated`
    (lhs batch → output batch; lhs in-channels · rhs in-channels contracted; rhs out-channels → output
    channels)."""
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        ranks = [len(v.aval.shape) for v in eqn.invars]
        free = tuple(tuple(d for d in range(r) if d not in c and d not in b)
                     for r, c, b in zip(ranks, (lc, rc), (lb, rb)))
        n_batch = len(lb)
        out_free = (tuple(range(n_batch, n_batch + len(free[0]))),
                    tuple(range(n_batch + len(free[0]), n_batch + len(free[0]) + len(free[1]))))
        return ProductAxes(contracted=(tuple(lc), tuple(rc)), batch=(tuple(lb), tuple(rb)),
                           out_batch=tuple(range(n_batch)), free=free, out_free=out_free)
    if name == "conv_general_dilated":
        dn = eqn.params["dimension_numbers"]
        return ProductAxes(contracted=((dn.lhs_spec[1],), (dn.rhs_spec[1],)), batch=((), ()), out_batch=(),
                           free=((dn.lhs_spec[0],), (dn.rhs_spec[0],)),
                           out_free=((dn.out_spec[0],), (dn.out_spec[1],)),
                           spatial=(tuple(dn.lhs_spec[2:]), tuple(dn.rhs_spec[2:]), tuple(dn.out_spec[2:])))
    raise ValueError(f"`{name}` is not a product of a layer (dot_general, conv_general_dilated)")


def product_macs(eqn: Any) -> int:
    """Multiply-accumulates of a `dot_general` / `conv_general_dilated` equation: output entries × the
    entries each one contracts (contracted dims; a conv's kernel taps × input channels per group)."""
    axes = product_axes(eqn)
    rhs = eqn.invars[1].aval.shape
    per_output = math.prod(rhs[d] for d in axes.contracted[1] + axes.spatial[1])
    return int(math.prod(eqn.outvars[0].aval.shape) * per_output)


def is_float(aval: Any) -> bool:
    return hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.inexact)


def is_linear(name: str, deps: Sequence[bool]) -> bool:
    """Whether an equation is linear in its operands flagged in `deps` (the others held fixed)."""
    if name not in _LINEAR:
        return False
    if name in PRODUCTS:
        return sum(deps) <= 1
    if name == "div":
        return not deps[1]
    if name == "select_n":
        return not deps[0]
    if name in ("dynamic_slice", "gather"):
        return not any(deps[1:])
    if name == "dynamic_update_slice":
        return not any(deps[2:])
    return True


def reshape_groups(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The axes of a reshape in matching groups: `(input axes, output axes)` whose sizes have equal
    products and which cover the same entries (row-major), e.g. (B, N, H·D) → (B, N, H, D) gives
    ((0,), (0,)), ((1,), (1,)), ((2,), (2, 3)). Size-1 axes join the group before them."""
    groups: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        gi, gj = [], []
        pi = pj = 1
        while True:
            if pi == pj and gi and gj:
                # absorb trailing size-1 axes into this group
                while i < len(in_shape) and in_shape[i] == 1:
                    gi.append(i); i += 1
                while j < len(out_shape) and out_shape[j] == 1:
                    gj.append(j); j += 1
                break
            if (pi <= pj or j >= len(out_shape)) and i < len(in_shape):
                gi.append(i); pi *= in_shape[i]; i += 1
            elif j < len(out_shape):
                gj.append(j); pj *= out_shape[j]; j += 1
            else:
                break
        groups.append((tuple(gi), tuple(gj)))
    return groups
