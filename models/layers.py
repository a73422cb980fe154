"""Layer constructors shared by the model families (PyTorch-equivalent initialisation)."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Every initialiser samples a flat vector and reshapes it: on XLA:CPU (jax 0.10) compiling the
# threefry sampler for a 4-D shape such as (3, 3, 8, 12) took ~30 s, for the same number of
# elements as a 1-D shape well under 1 s. Fans follow the kernel layouts (..., in, out).


def _flat_sample(kind: str, key: jax.Array, shape: Sequence[int], dtype) -> jax.Array:
    """Standard normal or U(-1, 1) samples of ``shape``, drawn as one flat vector."""
    n = math.prod(shape)
    if kind == "normal":
        flat = jax.random.normal(key, (n,), dtype)
    else:
        flat = jax.random.uniform(key, (n,), dtype, -1.0, 1.0)
    return flat.reshape(tuple(shape))


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    """(fan_in, fan_out) of a kernel shaped (*receptive_field, in, out) (or (in, out))."""
    receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
    return receptive * shape[-2], receptive * shape[-1]


def normal_init(std: float) -> jax.nn.initializers.Initializer:
    """N(0, std^2) for every element."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return std * _flat_sample("normal", key, shape, dtype)

    return init


def uniform_init(bound: float) -> jax.nn.initializers.Initializer:
    """U(-bound, bound) for every element."""

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return bound * _flat_sample("uniform", key, shape, dtype)

    return init


def kaiming_normal_fan_out(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """PyTorch kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out)."""
    return normal_init(math.sqrt(2.0 / _fans(shape)[1]))(key, shape, dtype)


def torch_default_kernel(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """PyTorch nn.Linear / nn.Conv default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return uniform_init(1.0 / math.sqrt(_fans(shape)[0]))(key, shape, dtype)


def xavier_uniform(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """Glorot uniform: U(-b, b) with b = sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = _fans(shape)
    return uniform_init(math.sqrt(6.0 / (fan_in + fan_out)))(key, shape, dtype)


def torch_default_bias(fan_in: int) -> jax.nn.initializers.Initializer:
    """PyTorch default bias init for a layer with ``fan_in`` inputs: U(-1/sqrt(fan_in), +)."""
    return uniform_init(1.0 / math.sqrt(fan_in))


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, *, padding: int | None = None,
         rngs: nnx.Rngs) -> nnx.Conv:
    """Bias-free ``kernel``x``kernel`` conv with PyTorch-style symmetric padding (default k//2).

    Explicit symmetric padding, not "SAME": with stride 2 XLA's SAME pads (0, 1) while PyTorch
    pads (1, 1), which would shift every strided output by one pixel.
    """
    p = kernel // 2 if padding is None else padding
    return nnx.Conv(in_ch, out_ch, (kernel, kernel), (stride, stride), padding=((p, p), (p, p)),
                    use_bias=False, kernel_init=kaiming_normal_fan_out, rngs=rngs)


def batch_norm(features: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """BatchNorm with PyTorch defaults (momentum 0.1 in PyTorch's convention, eps 1e-5).

    ``use_fast_variance=False`` computes the variance as E[(x - mean)^2] rather than
    E[x^2] - mean^2, which loses precision that OBA's small score differences need.
    """
    return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=rngs)


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """Linear with PyTorch's default initialisation (weight and bias uniform in 1/sqrt(fan_in))."""
    return nnx.Linear(in_features, out_features, kernel_init=torch_default_kernel,
                      bias_init=torch_default_bias(in_features), rngs=rngs)


def _windows(x: jax.Array, window: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/k, W/k, C, k·k): each non-overlapping k×k window on the last axis."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c)
    return x.transpose(0, 1, 3, 5, 2, 4).reshape(b, h // window, w // window, c, window * window)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _tiled_max_pool(x: jax.Array, window: int) -> jax.Array:
    """Max over non-overlapping windows, differentiated by gathering the tangent at the argmax (the first
    maximum, as PyTorch).

    Why not `max`'s own derivative: under `jit`, XLA:CPU's second derivative (`jvp` of `grad`) of a BatchNorm
    followed by a reshape + `max` pool came out wrong on trained models (fastoba on the demo model: 20% of the
    largest score off; exact eagerly and with the fusion pass disabled). A one-hot product summed over the
    window axis was exactly as wrong, a gather at the argmax is exact (`bench/xla_hvp_fusion.py`), and it is
    as fast: the gradient within 5% of `max`'s on a copy of the demo network, the Hessian-vector product faster.
    """
    return _windows(x, window).max(axis=-1)


@_tiled_max_pool.defjvp
def _tiled_max_pool_jvp(window: int, primals, tangents):
    (x,), (t,) = primals, tangents
    windows = _windows(x, window)
    first_max = jnp.argmax(windows, axis=-1)[..., None]
    take = lambda a: jnp.take_along_axis(a, first_max, axis=-1)[..., 0]
    return take(windows), take(_windows(t, window))


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """Max-pool over H, W of an NHWC array (padding with -inf, as PyTorch does)."""
    b, h, w, c = x.shape
    if window == stride and padding == 0 and h % window == 0 and w % window == 0:
        # Non-overlapping windows as reshapes + max: same values, and its gradient is ~4x faster on
        # XLA:CPU than reduce_window's select-and-scatter.
        return _tiled_max_pool(x, window)
    return nnx.max_pool(x, (window, window), (stride, stride),
                        padding=((padding, padding), (padding, padding)))


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over H, W: (B, H, W, C) -> (B, C)."""
    return jnp.mean(x, axis=(1, 2))
