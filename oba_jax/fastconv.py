"""A CPU fast path for convolutions: the kernel tangent as a sum of shifted-slice matmuls.

XLA:CPU computes a convolution's forward pass and input gradient quickly but its *kernel* gradient
slowly (DESIGN.md, "Performance notes": a 3×3 64→64 conv at 32×32, batch 128 takes 0.17 s forward
and 2.9 s for the kernel gradient). `conv_general_dilated_fast` is the same function as
`lax.conv_general_dilated`, written as a `jax.custom_jvp` whose tangent in the kernel is

    Σ_taps  slice_tap(pad(lhs)) @ rhs_dot[tap]        (one matmul per kernel tap)

so that its transpose, the kernel gradient, is one matmul per tap. The tangent in the input is the
native convolution (its transpose, the input gradient, is fast in XLA). All of it is ordinary JAX, so
it is correct under any order of differentiation, in particular forward-over-reverse HVPs.

Only `feature_group_count == batch_group_count == 1` and `lhs_dilation == 1` convolutions take the
fast path; anything else calls `lax.conv_general_dilated` unchanged. `use_fast_conv()` says whether
callers should use it (CPU backend only; `OBA_JAX_FAST_CONV=0/1` overrides).
"""
from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jcore

__all__ = ["bind_conv_eqn", "eval_jaxpr", "conv_general_dilated_fast", "eqn_supported", "is_supported", "use_fast_conv"]


def use_fast_conv() -> bool:
    """True when the default backend is CPU, unless the env var `OBA_JAX_FAST_CONV` is set to 0/1."""
    env = os.environ.get("OBA_JAX_FAST_CONV")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    return jax.default_backend() == "cpu"


_CONV_KWARGS = ("window_strides", "padding", "lhs_dilation", "rhs_dilation", "dimension_numbers",
                "feature_group_count", "batch_group_count", "precision", "preferred_element_type")


def eqn_supported(eqn: Any) -> bool:
    """Whether a traced `conv_general_dilated` equation takes the fast path."""
    if eqn.primitive.name != "conv_general_dilated" or eqn.params.get("out_sharding") is not None:
        return False
    lhs, rhs = (v.aval for v in eqn.invars)
    return is_supported(lhs.shape, rhs.shape, **{k: eqn.params[k] for k in _CONV_KWARGS})


def bind_conv_eqn(eqn: Any, args: Sequence[Any]) -> list[Any]:
    """Evaluates a `conv_general_dilated` equation (see `eqn_supported`) with the fast conv."""
    with eqn.ctx.manager:
        return [conv_general_dilated_fast(*args, **{k: eqn.params[k] for k in _CONV_KWARGS})]


def eval_jaxpr(jaxpr: Any, consts: Sequence[Any], *args: Any) -> list[Any]:
    """`jax.core.eval_jaxpr` with every supported convolution evaluated by the fast conv.

    Recurses into `jit`/`pjit`/`closed_call` bodies; other equations are bound as they are.
    """
    env: dict[Any, Any] = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if eqn_supported(eqn):
            outs = bind_conv_eqn(eqn, ins)
        elif eqn.primitive.name in ("pjit", "jit", "closed_call") and (
                "jaxpr" in eqn.params or "call_jaxpr" in eqn.params):
            sub = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            inner, inner_consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
            with eqn.ctx.manager:
                outs = eval_jaxpr(inner, inner_consts, *ins)
        else:
            bind_params = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = bind_params if isinstance(bind_params, tuple) else ([], bind_params)
            with eqn.ctx.manager:
                out = eqn.primitive.bind(*subfuns, *ins, **params)
            outs = list(out) if eqn.primitive.multiple_results else [out]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _dim_numbers(lhs_shape, rhs_shape, dimension_numbers) -> lax.ConvDimensionNumbers:
    return lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)


def is_supported(lhs_shape: Sequence[int], rhs_shape: Sequence[int], *, lhs_dilation=None,
                 feature_group_count: int = 1, batch_group_count: int = 1, **_: Any) -> bool:
    """Whether the fast path handles this convolution (otherwise it falls back to the native conv)."""
    if feature_group_count != 1 or batch_group_count != 1:
        return False
    if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
        return False
    return len(lhs_shape) == len(rhs_shape) >= 3


def conv_general_dilated_fast(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                              padding: str | Sequence[tuple[int, int]], lhs_dilation=None, rhs_dilation=None,
                              dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
                              precision=None, preferred_element_type=None, out_sharding=None) -> jax.Array:
    """`lax.conv_general_dilated` with a matmul kernel-tangent (same arguments, same result)."""
    nd = lhs.ndim - 2
    kw = dict(window_strides=tuple(window_strides), lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
              dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
              batch_group_count=batch_group_count, precision=precision,
              preferred_element_type=preferred_element_type)
    if out_sharding is not None or not is_supported(lhs.shape, rhs.shape, **kw):
        if out_sharding is not None:
            kw["out_sharding"] = out_sharding
        return lax.conv_general_dilated(lhs, rhs, padding=padding, **kw)
    dn = _dim_numbers(lhs.shape, rhs.shape, dimension_numbers)
    rhs_dilation = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * nd
    if isinstance(padding, str):
        # Resolve SAME/VALID against the dilated kernel (as lax does).
        in_spatial = [lhs.shape[d] for d in dn.lhs_spec[2:]]
        k_spatial = [(rhs.shape[d] - 1) * r + 1 for d, r in zip(dn.rhs_spec[2:], rhs_dilation)]
        padding = lax.padtype_to_pads(in_spatial, k_spatial, tuple(window_strides), padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    static = _Static(strides=tuple(int(s) for s in window_strides), pads=pads, rhs_dilation=rhs_dilation,
                     dn=dn, precision=precision, preferred_element_type=preferred_element_type)
    return _fast_conv(static, lhs, rhs)


class _Static:
    """Hashable static configuration of one convolution."""

    def __init__(self, *, strides, pads, rhs_dilation, dn, precision, preferred_element_type):
        self.strides, self.pads, self.rhs_dilation, self.dn = strides, pads, rhs_dilation, dn
        self.precision, self.preferred_element_type = precision, preferred_element_type
        self._key = (strides, pads, rhs_dilation, tuple(map(tuple, dn)), str(precision),
                     str(preferred_element_type))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key


def _native(s: _Static, lhs, rhs):
    return lax.conv_general_dilated(lhs, rhs, s.strides, s.pads, rhs_dilation=s.rhs_dilation,
                                    dimension_numbers=s.dn, precision=s.precision,
                                    preferred_element_type=s.preferred_element_type)


def _shifted_matmul(s: _Static, lhs, rhs):
    """The convolution as Σ_taps slice(pad(lhs)) · rhs[tap]: bilinear, built from slices and dot_generals."""
    dn, nd = s.dn, lhs.ndim - 2
    # Canonical layouts: lhs (N, spatial..., C), rhs (spatial..., I, O).
    x = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
    w = jnp.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in s.pads), (0, 0, 0)))
    ksize = w.shape[:nd]
    out_sp = [(x.shape[1 + i] - (ksize[i] - 1) * s.rhs_dilation[i] - 1) // s.strides[i] + 1 for i in range(nd)]
    rows = x.shape[0] * math.prod(max(o, 0) for o in out_sp)
    out_dtype = s.preferred_element_type or jnp.result_type(lhs, rhs)
    out = jnp.zeros((rows, w.shape[-1]), out_dtype)  # stays zero when the output is empty
    if rows and x.shape[-1]:
        for i, tap in enumerate(itertools.product(*(range(k) for k in ksize))):
            start = [t * r for t, r in zip(tap, s.rhs_dilation)]
            limit = [st + (o - 1) * sd + 1 for st, o, sd in zip(start, out_sp, s.strides)]
            xs = lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *s.strides, 1))
            # A 2-D matmul (rows = batch × output positions): its transpose is one plain GEMM, which
            # XLA:CPU runs several times faster than a dot_general contracting over several axes.
            term = lax.dot_general(xs.reshape(rows, x.shape[-1]), w[tap], (((1,), (0,)), ((), ())),
                                   precision=s.precision, preferred_element_type=s.preferred_element_type)
            out = term if i == 0 else out + term
    out = out.reshape(x.shape[0], *(max(o, 0) for o in out_sp), w.shape[-1])
    # out is (N, spatial..., O): back to the conv's output layout.
    perm = [0] * (nd + 2)
    perm[dn.out_spec[0]] = 0
    perm[dn.out_spec[1]] = nd + 1
    for i, d in enumerate(dn.out_spec[2:]):
        perm[d] = 1 + i
    return jnp.transpose(out, perm)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _fast_conv(s: _Static, lhs, rhs):
    return _native(s, lhs, rhs)


@functools.partial(_fast_conv.defjvp, symbolic_zeros=True)
def _fast_conv_jvp(s: _Static, primals, tangents):
    lhs, rhs = primals
    lhs_dot, rhs_dot = tangents
    # The primal through the custom function again, so higher-order derivatives also take the fast path.
    out = _fast_conv(s, lhs, rhs)
    tangent = None
    if not isinstance(lhs_dot, jax.custom_derivatives.SymbolicZero):
        tangent = _native(s, lhs_dot, rhs)
    if not isinstance(rhs_dot, jax.custom_derivatives.SymbolicZero):
        t = _shifted_matmul(s, lhs, rhs_dot)
        tangent = t if tangent is None else tangent + t
    if tangent is None:
        tangent = jnp.zeros_like(out)
    return out, tangent
