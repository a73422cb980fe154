"""The fault behind wrong fastoba scores on trained BN + max-pool models, in plain JAX (README, fastoba).

    python bench/xla_hvp_fusion.py

prints the largest difference between the Hessian-vector product θ ⊙ Hθ computed eagerly and under `jax.jit`
for a scale-and-shift (`x·w·g + b`) feeding a reshape + `max` pool, and for controls (a `reduce_window` pool;
`g` or `b` alone; the same program compiled without XLA's fusion pass). Eager equals finite differences.
"""
import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)
KEYS = jax.random.split(jax.random.key(0), 5)
X = jax.random.normal(KEYS[0], (8, 4, 4, 3))
PARAMS = {"w": jax.random.normal(KEYS[1], (3, 5)), "g": 1 + 0.1 * jax.random.normal(KEYS[2], (5,)),
          "b": 0.1 * jax.random.normal(KEYS[3], (5,)), "v": jax.random.normal(KEYS[4], (5, 2))}
POOLS = {"reshape+max": lambda h: h.reshape(8, 2, 2, 2, 2, 5).max(axis=(2, 4)),
         "reduce_window": lambda h: jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")}
AFFINE = {"*g+b": lambda h, p: h * p["g"] + p["b"], "*g": lambda h, p: h * p["g"], "+b": lambda h, p: h + p["b"]}


def loss(p, pool, affine):
    h = affine(X @ p["w"], p)
    return jnp.sum(jnp.sin(pool(h).mean((1, 2)) @ p["v"]))


def main() -> None:
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}")
    print(f"{'pool':<14}{'affine':<7}{'|eager - jit|':>16}{'|eager - jit, no fusion|':>26}")
    for pool_name, pool in POOLS.items():
        for affine_name, affine in AFFINE.items():
            def hv(p, pool=pool, affine=affine):
                return jax.jvp(jax.grad(lambda q: loss(q, pool, affine)), (p,), (p,))[1]
            eager = hv(PARAMS)
            diffs = []
            for options in ({}, {"xla_disable_hlo_passes": "fusion"}):
                jitted = jax.jit(hv, compiler_options=options)(PARAMS)
                diffs.append(max(float(jnp.max(jnp.abs(a - b)))
                                 for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted))))
            print(f"{pool_name:<14}{affine_name:<7}{diffs[0]:>16.3g}{diffs[1]:>26.3g}")


if __name__ == "__main__":
    main()
