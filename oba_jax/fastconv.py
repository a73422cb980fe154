"""A CPU fast path for convolutions: the kernel gradient as one matmul per kernel tap.

XLA:CPU computes most convolutions' forward pass and input gradient quickly but the *kernel* gradient
slowly (DESIGN.md, "Performance notes": a 3×3 64→64 conv at 32×32, batch 128 takes 0.17 s forward
and 2.9 s for the kernel gradient), and it is pathologically slow on convolutions whose output is
smaller than the kernel (a 3×3 512→512 conv on a 2×2 map at batch 64: 0.8 s forward against 0.01 s
as matmuls — VGG19's last stage).

`conv_general_dilated_fast` is the same function as `lax.conv_general_dilated`, written as a
`jax.custom_vjp`:

* forward: the native convolution, or `Σ_taps slice_tap(pad(lhs)) @ rhs[tap]` when an output
  extent is smaller than the (dilated) kernel;
* backward: the input gradient is the transpose of that forward (native transposed convolution or
  matmuls); the kernel gradient is `slice_tap(pad(lhs))ᵀ @ g`, one GEMM per tap. The slices are
  cut inside the backward pass, so only `lhs` and `rhs` are kept between the passes.

The backward pass is ordinary JAX, so forward-over-reverse HVPs (`jax.jvp(jax.grad(f))`,
`jax.hessian`) and reverse-over-reverse work. Forward mode applied to the function itself
(`jax.jvp(f)`) does not (a `custom_vjp` limitation): use `conv_general_dilated_forward`, the same
forward as plain operations, there.

Only `feature_group_count == batch_group_count == 1` and `lhs_dilation == 1` convolutions take the
fast path; anything else calls `lax.conv_general_dilated` unchanged. `use_fast_conv()` says whether
callers should use it (CPU backend only; `OBA_JAX_FAST_CONV=0/1` overrides). `cpu_compiler_options()`
are the XLA options the score functions compile with on CPU (the memory-optimising scheduler).
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
import numpy as np
from jax import lax

__all__ = ["conv_general_dilated_fast", "conv_general_dilated_forward", "cpu_compiler_options", "is_supported",
           "takes_matmul_forward", "use_fast_conv"]


def use_fast_conv() -> bool:
    """True when the default backend is CPU, unless the env var `OBA_JAX_FAST_CONV` is set to 0/1."""
    env = os.environ.get("OBA_JAX_FAST_CONV")
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    return jax.default_backend() == "cpu"


def cpu_compiler_options() -> dict[str, Any] | None:
    """XLA compile options for score functions: the memory-optimising scheduler on CPU, else None.

    XLA:CPU's default (concurrency-optimising) scheduler keeps every intermediate of an HVP alive at
    once: on a 4-conv chain (batch 128, 64 channels, 32×32) 2.1 GB of temporaries against 0.32 GB with
    the memory-optimising one, at the same speed (bench/score_speed.py reports `temp MB`).
    """
    if jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def is_supported(lhs_shape: Sequence[int], rhs_shape: Sequence[int], *, lhs_dilation=None,
                 feature_group_count: int = 1, batch_group_count: int = 1, **_: Any) -> bool:
    """Whether the fast path handles this convolution (otherwise it falls back to the native conv)."""
    if feature_group_count != 1 or batch_group_count != 1:
        return False
    if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
        return False
    return len(lhs_shape) == len(rhs_shape) >= 3


class _Static:
    """Hashable static configuration of one convolution (padding resolved to explicit pairs)."""

    def __init__(self, *, strides, pads, rhs_dilation, dn, precision, preferred_element_type):
        self.strides, self.pads, self.rhs_dilation, self.dn = strides, pads, rhs_dilation, dn
        self.precision, self.preferred_element_type = precision, preferred_element_type
        self._key = (strides, pads, rhs_dilation, tuple(map(tuple, dn)), str(precision),
                     str(preferred_element_type))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key


def _static_or_none(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                    feature_group_count, batch_group_count, precision, preferred_element_type,
                    out_sharding) -> _Static | None:
    """The fast path's static configuration, or None when the native conv must be used."""
    if out_sharding is not None or not is_supported(
            lhs.shape, rhs.shape, lhs_dilation=lhs_dilation, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count):
        return None
    nd = lhs.ndim - 2
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    rhs_dilation = tuple(int(r) for r in rhs_dilation) if rhs_dilation is not None else (1,) * nd
    if isinstance(padding, str):
        # Resolve SAME/VALID against the dilated kernel (as lax does).
        in_spatial = [lhs.shape[d] for d in dn.lhs_spec[2:]]
        k_spatial = [(rhs.shape[d] - 1) * r + 1 for d, r in zip(dn.rhs_spec[2:], rhs_dilation)]
        padding = lax.padtype_to_pads(in_spatial, k_spatial, tuple(window_strides), padding)
    return _Static(strides=tuple(int(s) for s in window_strides),
                   pads=tuple((int(lo), int(hi)) for lo, hi in padding), rhs_dilation=rhs_dilation,
                   dn=dn, precision=precision, preferred_element_type=preferred_element_type)


def conv_general_dilated_fast(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                              padding: str | Sequence[tuple[int, int]], **kwargs: Any) -> jax.Array:
    """`lax.conv_general_dilated` with a matmul kernel gradient (same arguments, same result).

    Reverse mode and forward-over-reverse only (see the module docstring).
    """
    return _dispatch(_fast_conv, lhs, rhs, window_strides, padding, **kwargs)


def conv_general_dilated_forward(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                                 padding: str | Sequence[tuple[int, int]], **kwargs: Any) -> jax.Array:
    """The fast path's forward as plain operations: for forward mode (`jax.jvp`), where only
    convolutions (never kernel gradients) are evaluated. Same arguments as `lax.conv_general_dilated`."""
    return _dispatch(_forward, lhs, rhs, window_strides, padding, **kwargs)


def _dispatch(impl: Any, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count: int = 1, batch_group_count: int = 1,
              precision=None, preferred_element_type=None, out_sharding=None) -> jax.Array:
    """`impl(static, lhs, rhs)` for supported convolutions, the native conv for the rest."""
    s = _static_or_none(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                        feature_group_count, batch_group_count, precision, preferred_element_type, out_sharding)
    if s is not None:
        return impl(s, lhs, rhs)
    kw = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
              feature_group_count=feature_group_count, batch_group_count=batch_group_count,
              precision=precision, preferred_element_type=preferred_element_type)
    if out_sharding is not None:
        kw["out_sharding"] = out_sharding
    return lax.conv_general_dilated(lhs, rhs, tuple(window_strides), padding, **kw)


def _native(s: _Static, lhs, rhs):
    return lax.conv_general_dilated(lhs, rhs, s.strides, s.pads, rhs_dilation=s.rhs_dilation,
                                    dimension_numbers=s.dn, precision=s.precision,
                                    preferred_element_type=s.preferred_element_type)


class _Taps:
    """The conv in canonical layouts: padded lhs (N, spatial..., C), output spatial extents, and for each
    kernel tap the 2-D slice of the padded lhs (rows = batch × output positions) it multiplies."""

    def __init__(self, s: _Static, lhs: jax.Array, ksize: Sequence[int]):
        dn = s.dn
        x = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
        self.x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in s.pads), (0, 0, 0)))
        self.s, self.ksize = s, tuple(ksize)
        self.out_spatial = [max(_out_extent(s, i, self.x.shape[1 + i], k), 0) for i, k in enumerate(ksize)]
        self.rows = self.x.shape[0] * math.prod(self.out_spatial)
        self.channels = self.x.shape[-1]

    def taps(self):
        return itertools.product(*(range(k) for k in self.ksize))

    def slice2d(self, tap) -> jax.Array:
        s, x = self.s, self.x
        start = [t * r for t, r in zip(tap, s.rhs_dilation)]
        limit = [st + (o - 1) * sd + 1 for st, o, sd in zip(start, self.out_spatial, s.strides)]
        xs = lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *s.strides, 1))
        return xs.reshape(self.rows, self.channels)


def _canonical_kernel(s: _Static, rhs):
    """rhs as (spatial..., I, O)."""
    return jnp.transpose(rhs, (*s.dn.rhs_spec[2:], s.dn.rhs_spec[1], s.dn.rhs_spec[0]))


def _from_canonical_kernel(s: _Static, w):
    perm = (*s.dn.rhs_spec[2:], s.dn.rhs_spec[1], s.dn.rhs_spec[0])
    return jnp.transpose(w, tuple(int(i) for i in np.argsort(perm)))


def _to_out_layout(s: _Static, out):
    """(N, spatial..., O) → the conv's output layout."""
    nd = out.ndim - 2
    perm = [0] * (nd + 2)
    perm[s.dn.out_spec[0]] = 0
    perm[s.dn.out_spec[1]] = nd + 1
    for i, d in enumerate(s.dn.out_spec[2:]):
        perm[d] = 1 + i
    return jnp.transpose(out, perm)


def _from_out_layout(s: _Static, g):
    """The conv's output layout → (N, spatial..., O)."""
    return jnp.transpose(g, (s.dn.out_spec[0], *s.dn.out_spec[2:], s.dn.out_spec[1]))


def _shifted_matmul(s: _Static, lhs, rhs):
    """The convolution as Σ_taps slice(pad(lhs)) · rhs[tap]: built from slices and 2-D dot_generals."""
    w = _canonical_kernel(s, rhs)
    t = _Taps(s, lhs, w.shape[:-2])
    out_dtype = s.preferred_element_type or jnp.result_type(lhs, rhs)
    out = jnp.zeros((t.rows, w.shape[-1]), out_dtype)  # stays zero when the output is empty
    if t.rows and t.channels:
        for i, tap in enumerate(t.taps()):
            term = lax.dot_general(t.slice2d(tap), w[tap], (((1,), (0,)), ((), ())),
                                   precision=s.precision, preferred_element_type=s.preferred_element_type)
            out = term if i == 0 else out + term
    return _to_out_layout(s, out.reshape(t.x.shape[0], *t.out_spatial, w.shape[-1]))


def _matmul_forward(s: _Static, lhs_shape: Sequence[int], rhs_shape: Sequence[int]) -> bool:
    """Whether the forward runs as matmuls: when an output extent is smaller than the dilated kernel
    (XLA:CPU's native conv is ~70× slower than matmuls there; elsewhere it is as fast or faster)."""
    dn = s.dn
    for i, (ld, rd) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:])):
        if _out_extent(s, i, lhs_shape[ld] + sum(s.pads[i]), rhs_shape[rd]) < _dilated(s, i, rhs_shape[rd]):
            return True
    return False


def _dilated(s: _Static, dim: int, kernel_size: int) -> int:
    return (kernel_size - 1) * s.rhs_dilation[dim] + 1


def _out_extent(s: _Static, dim: int, padded_size: int, kernel_size: int) -> int:
    """Output length along spatial `dim` (may be ≤ 0 when the kernel does not fit)."""
    return (padded_size - _dilated(s, dim, kernel_size)) // s.strides[dim] + 1


def takes_matmul_forward(lhs_shape: Sequence[int], rhs_shape: Sequence[int], window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], **kwargs: Any) -> bool:
    """Whether the fast path computes this convolution's forward as matmuls (an output extent smaller
    than the dilated kernel); False when the fast path does not apply at all."""
    lhs, rhs = jax.ShapeDtypeStruct(tuple(lhs_shape), jnp.float32), jax.ShapeDtypeStruct(tuple(rhs_shape), jnp.float32)
    kw = {k: kwargs.get(k) for k in ("lhs_dilation", "rhs_dilation", "dimension_numbers", "precision",
                                     "preferred_element_type", "out_sharding")}
    s = _static_or_none(lhs, rhs, window_strides, padding, kw["lhs_dilation"], kw["rhs_dilation"],
                        kw["dimension_numbers"], kwargs.get("feature_group_count", 1),
                        kwargs.get("batch_group_count", 1), kw["precision"], kw["preferred_element_type"],
                        kw["out_sharding"])
    return s is not None and _matmul_forward(s, lhs_shape, rhs_shape)


def _forward(s: _Static, lhs, rhs):
    if _matmul_forward(s, lhs.shape, rhs.shape):
        return _shifted_matmul(s, lhs, rhs)
    return _native(s, lhs, rhs)


def _kernel_grad(s: _Static, lhs, rhs_shape: Sequence[int], rhs_dtype, g):
    """∂/∂rhs of `Σ g · conv(lhs, rhs)`: per tap, slice(pad(lhs))ᵀ @ g (one GEMM each)."""
    k_spatial = [rhs_shape[d] for d in s.dn.rhs_spec[2:]]
    c_in, c_out = rhs_shape[s.dn.rhs_spec[1]], rhs_shape[s.dn.rhs_spec[0]]
    t = _Taps(s, lhs, k_spatial)
    if not (t.rows and t.channels):
        return jnp.zeros(rhs_shape, rhs_dtype)
    g2 = _from_out_layout(s, g).reshape(t.rows, c_out)
    dtype = jnp.result_type(lhs, g)
    per_tap = [lax.dot_general(t.slice2d(tap).astype(dtype), g2.astype(dtype), (((0,), (0,)), ((), ())),
                               precision=s.precision) for tap in t.taps()]
    w = jnp.stack(per_tap).reshape(*k_spatial, c_in, c_out)
    return _from_canonical_kernel(s, w).astype(rhs_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fast_conv(s: _Static, lhs, rhs):
    return _forward(s, lhs, rhs)


def _fast_conv_fwd(s: _Static, lhs, rhs):
    return _forward(s, lhs, rhs), (lhs, rhs)


def _fast_conv_bwd(s: _Static, residuals, g):
    lhs, rhs = residuals
    # The input gradient is the transpose of the forward in lhs: XLA's transposed conv, which is fast
    # on CPU, or the matmuls' transposes. The kernel gradient never goes through XLA's conv.
    (d_lhs,) = jax.vjp(lambda a: _forward(s, a, rhs), lhs)[1](g)
    d_rhs = _kernel_grad(s, lhs, rhs.shape, rhs.dtype, g)
    return d_lhs.astype(lhs.dtype), d_rhs


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)
