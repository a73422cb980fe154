"""Chain networks (`oba_jax.chain`): which programs qualify, and their OBA scores (which skip the primal
activations' reverse chain) against the forward-over-reverse construction in float64."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nets import (AttentionBlock, ConcatNet, ResidualBNNet, SmallVGG, gated_apply, gated_params, mlp_apply,
                  mlp_params)
from oba_jax import model_apply, score
from oba_jax.graph import analyse
from oba_jax.program import trace_program
from oba_jax.scores.chain import layer_depths


def _depths_by_layer(apply_fn, params, x, exclude=()):
    """`{weight or bias path: k}` (None if not a chain)."""
    analysis = analyse(trace_program(apply_fn, params, x), exclude)
    depths = layer_depths(analysis, analysis.theta)
    if depths is None:
        return None
    paths, found = analysis.program.paths, analysis.found
    out = {}
    for key, k in depths.items():
        if key in found.uses:
            out[paths[found.uses[key].weight_leaf]] = k
        else:
            out[paths[found.bias_leaves[found.bias_adds[key]]]] = k
    return out


def test_mlp_depths_count_the_perturbed_layers_below():
    params = mlp_params()
    depths = _depths_by_layer(mlp_apply, params, jnp.ones((2, 6)))
    assert depths == {"l0/kernel": 2, "l0/bias": 2, "l1/kernel": 1, "l1/bias": 1, "l2/kernel": 0, "l2/bias": 0}


def test_a_layer_held_fixed_is_not_counted():
    params = mlp_params()
    depths = _depths_by_layer(mlp_apply, params, jnp.ones((2, 6)), exclude=("l1",))
    # l1 is still counted from above (l2 is perturbed) but not from below: l0 sees one perturbed layer.
    assert depths == {"l0/kernel": 1, "l0/bias": 1, "l1/kernel": 1, "l1/bias": 1, "l2/kernel": 0, "l2/bias": 0}


def test_branches_of_equal_depth_are_a_chain():
    apply_fn, variables = model_apply(ConcatNet(nnx.Rngs(1)))
    depths = _depths_by_layer(apply_fn, variables, jnp.ones((2, 6, 6, 3)))
    assert {p: k for p, k in depths.items() if p.endswith("kernel")} == {
        "params/left/kernel": 2, "params/right/kernel": 2, "params/merge/kernel": 1, "params/fc/kernel": 0}


@pytest.mark.parametrize("case", ["residual", "attention", "gated", "tied"])
def test_not_a_chain(case):
    if case == "residual":  # the block (2 layers) and the shortcut (1 layer) meet at the add
        apply_fn, params = model_apply(ResidualBNNet(nnx.Rngs(0)))
        x = jnp.ones((2, 6, 6, 3))
    elif case == "attention":
        apply_fn, params = model_apply(AttentionBlock(nnx.Rngs(2)))
        x = jnp.ones((2, 5, 8))
    elif case == "gated":
        apply_fn, params, x = gated_apply, gated_params(), jnp.ones((2, 6))
    else:  # a layer's weight also scales an activation elementwise
        params = mlp_params()
        apply_fn = lambda p, x: mlp_apply(p, x) * p["l2"]["kernel"][0]
        x = jnp.ones((2, 6))
    assert _depths_by_layer(apply_fn, params, x) is None


@pytest.mark.parametrize("exclude", [(), ("params/c3",)])
def test_chain_scores_equal_the_forward_over_reverse_construction(x64, exclude):
    """The default score of a chain network (no primal reverse chain) against `parts=True`, whose total
    is a forward-over-reverse HVP of the surrogate (checked against dense Hessians in test_oba.py)."""
    model = SmallVGG(nnx.Rngs(4))
    apply_fn, variables = model_apply(model)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    rng = np.random.default_rng(5)
    variables.params["c2"]["bias"] = jnp.asarray(0.1 * rng.normal(size=6))  # nnx initialises biases to 0
    x = jnp.asarray(rng.normal(size=(2, 6, 8, 8, 3)))
    y = jnp.asarray(rng.integers(0, 5, size=(2, 6)), jnp.int32)
    assert _depths_by_layer(apply_fn, variables, x[0], exclude) is not None
    default = score(apply_fn, variables, (x, y), exclude=exclude).by_path()
    reference = score(apply_fn, variables, (x, y), parts=True, exclude=exclude).by_path()
    scale = max(np.abs(v).max() for v in reference.values())
    assert scale > 0
    for path, ref in reference.items():
        np.testing.assert_allclose(default[path], ref, rtol=0, atol=1e-10 * scale, err_msg=path)
    nonzero = [p for p in ("params/c1/kernel", "params/c2/kernel", "params/c2/bias", "params/fc/kernel")]
    assert all(np.abs(reference[p]).max() > 1e-6 * scale for p in nonzero)
