"""Independent oracles the score tests compare with: dense float64 matrices built by `jax.hessian`."""
import jax
import jax.flatten_util
import numpy as np

from oba_jax import leaf_paths, softmax_cross_entropy


def h_minus_g(apply, params, x, y, scored=None):
    """`v ⊙ (H − G)v` from dense matrices (H the loss Hessian, G the Gauss–Newton matrix), v = θ on the
    leaves in `scored` (by path; all leaves when None) and zero elsewhere."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    paths = leaf_paths(params)
    if scored is not None:
        assert set(scored) <= set(paths), set(scored) - set(paths)
    mask = np.concatenate([np.full(np.size(l), 1.0 if scored is None or p in scored else 0.0)
                           for p, l in zip(paths, jax.tree_util.tree_leaves(params))])

    @jax.jit  # one compilation instead of op-by-op dispatch of the dense matrices
    def oracle(flat):
        logits_of = lambda f: apply(unravel(f), x)
        H = jax.hessian(lambda f: softmax_cross_entropy(logits_of(f), y))(flat)
        z = logits_of(flat)
        J = jax.jacobian(logits_of)(flat).reshape(-1, flat.size)
        Hz = jax.hessian(lambda zz: softmax_cross_entropy(zz.reshape(z.shape), y))(z.reshape(-1))
        v = flat * mask
        return v * ((H - J.T @ Hz @ J) @ v)
    return np.asarray(oracle(flat))
