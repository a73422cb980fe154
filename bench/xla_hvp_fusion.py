"""The fault behind wrong fastoba scores on trained BN + max-pool models, in plain JAX (README, fastoba).

    python bench/xla_hvp_fusion.py

prints, for a two-layer conv + train-mode BatchNorm + ReLU + 2×2 max-pool network (float64, BN affine away
from (1, 0) as after training), the relative difference of the Hessian-vector product `jvp(grad(loss))`
computed under `jax.jit` from the same product computed eagerly, for several ways of writing the pool, and
with XLA's fusion pass disabled. Eager equals finite differences. The zoo's pool (`models.layers.max_pool`)
is the last row: a `custom_jvp` that gathers the tangent at the argmax.
"""
import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)

from models.layers import max_pool  # noqa: E402  (after x64 is on)

KEYS = jax.random.split(jax.random.key(0), 8)
X = jax.random.normal(KEYS[0], (16, 8, 8, 2))
Y = jax.random.randint(KEYS[1], (16,), 0, 3)
PARAMS = {"k0": jax.random.normal(KEYS[2], (3, 3, 2, 6)) / 4, "k1": jax.random.normal(KEYS[3], (3, 3, 6, 8)) / 8,
          "g": 1 + 0.5 * jax.random.normal(KEYS[4], (2, 8)), "b": 0.5 * jax.random.normal(KEYS[5], (2, 8)),
          "fc": jax.random.normal(KEYS[6], (8, 3)) / 3}


def _windows(h):
    b, hh, ww, c = h.shape
    return h.reshape(b, hh // 2, 2, ww // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, hh // 2, ww // 2, c, 4)


@jax.custom_jvp
def _one_hot_pool(h):
    return _windows(h).max(-1)


@_one_hot_pool.defjvp
def _one_hot_pool_jvp(primals, tangents):
    (h,), (t,) = primals, tangents
    first = jax.nn.one_hot(jnp.argmax(_windows(h), -1), 4, dtype=t.dtype)
    return _windows(h).max(-1), jnp.sum(_windows(t) * first, -1)


POOLS = {
    "reshape + max": lambda h: h.reshape(h.shape[0], h.shape[1] // 2, 2, h.shape[2] // 2, 2, h.shape[3]).max((2, 4)),
    "one-hot at argmax": _one_hot_pool,
    "reduce_window": lambda h: jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
    "max of strided slices": lambda h: jnp.maximum(jnp.maximum(h[:, ::2, ::2], h[:, 1::2, ::2]),
                                                   jnp.maximum(h[:, ::2, 1::2], h[:, 1::2, 1::2])),
    "zoo (gather at argmax)": lambda h: max_pool(h, 2, 2),
}


def loss(p, pool):
    h = X
    for i, k in enumerate((p["k0"], p["k1"])):
        h = jax.lax.conv_general_dilated(h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        mu, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
        h = pool(jax.nn.relu((h - mu) * jax.lax.rsqrt(var + 1e-5) * p["g"][i, :k.shape[-1]] + p["b"][i, :k.shape[-1]]))
    logits = h.mean((1, 2)) @ p["fc"]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, Y[:, None], 1)[:, 0])


def _relative(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb)) / max(float(jnp.max(jnp.abs(y))) for y in lb)


def main() -> None:
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    print(f"{'pool':<24}{'jit vs eager':>14}{'jit, no fusion, vs eager':>26}")
    for name, pool in POOLS.items():
        def hv(p, pool=pool):
            return jax.jvp(jax.grad(lambda q: loss(q, pool)), (p,), (p,))[1]
        eager = hv(PARAMS)
        diffs = [_relative(jax.jit(hv, compiler_options=options)(PARAMS), eager)
                 for options in ({}, {"xla_disable_hlo_passes": "fusion"})]
        print(f"{name:<24}{diffs[0]:>14.2g}{diffs[1]:>26.2g}")


if __name__ == "__main__":
    main()
