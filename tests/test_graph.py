"""The connectivity map on models written the way users write them (plain NNX modules, pure functions)."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import oba_jax
from nets import AttentionBlock, ConcatNet, ResidualBNNet, gated_apply, gated_params, mlp_apply, mlp_params


def test_mlp_layers_biases_and_series_chain():
    g = oba_jax.connectivity(mlp_apply, mlp_params(), jnp.ones((4, 6)))
    assert [l.name for l in g.layers] == ["l0", "l1", "l2"]
    assert [l.bias for l in g.layers] == ["l0/bias", "l1/bias", "l2/bias"]
    assert all(l.kind == "dense" and l.in_axes == (0,) and l.out_axes == (1,) for l in g.layers)
    assert g.upstream == {"l0": (), "l1": ("l0",), "l2": ("l0", "l1")}
    assert g.parallel == () and g.unscored == ()
    assert set(g.scored_leaves) == set(g.leaf_paths)


def test_cnn_with_bn_and_residual_add():
    model = ResidualBNNet(nnx.Rngs(0))
    g = oba_jax.model_connectivity(model, jnp.ones((2, 8, 8, 3)))
    names = [l.name for l in g.layers]
    assert names == ["stem", "a", "b", "proj", "fc"]
    assert all(l.kind == "conv" and l.in_axes == (2,) and l.out_axes == (3,) for l in g.layers[:4])
    assert g.upstream["b"] == ("stem", "a") and g.upstream["proj"] == ("stem",)
    assert set(g.upstream["fc"]) == {"stem", "a", "b", "proj"}
    # b and proj are joined by an add: not coupled; BatchNorm products are nonlinearities, not parallel.
    assert not g.coupled("b", "proj") and g.coupled("stem", "b")
    assert g.parallel == ()
    assert {"bn0/scale", "bn0/bias", "bn_a/scale", "bn_b/bias"} <= set(g.unscored)
    assert g.layer("fc").bias == "fc/bias"


def test_cnn_with_concat():
    g = oba_jax.model_connectivity(ConcatNet(nnx.Rngs(1)), jnp.ones((2, 6, 6, 3)))
    assert g.upstream["merge"] == ("left", "right")
    assert not g.coupled("left", "right")
    assert g.layer("left").bias == "left/bias"


def test_attention_block_parallel_products():
    model = AttentionBlock(nnx.Rngs(2))
    g = oba_jax.model_connectivity(model, jnp.ones((2, 5, 8)))
    assert [l.name for l in g.layers] == ["q", "k", "v", "out", "head"]
    # einsum may put either operand first
    assert [set(p.operands) for p in g.parallel] == [{("q",), ("k",)}, {("k", "q"), ("v",)}]
    assert g.coupled("q", "k") and g.coupled("q", "v") and g.coupled("k", "v")
    assert g.upstream["out"] == ("q", "k", "v")
    assert {"pos", "ln/scale", "ln/bias"} <= set(g.unscored)


def test_gated_mlp_is_a_parallel_product():
    g = oba_jax.connectivity(gated_apply, gated_params(), jnp.ones((3, 6)))
    assert [p.operands for p in g.parallel] == [(("gate",), ("up",))]
    assert g.parallel[0].primitive == "mul"


def test_summary_and_dot_export():
    g = oba_jax.model_connectivity(AttentionBlock(nnx.Rngs(2)), jnp.ones((2, 5, 8)))
    text = g.summary()
    assert "5 parameter layers, 2 parallel products" in text and "not scored by OBA: " in text
    dot = g.to_dot()
    assert dot.startswith("digraph") and '"q" -> "out";' in dot and "style=dashed" in dot


def test_jitted_helper_called_twice_keeps_layers_apart():
    @jax.jit
    def dense(p, x):
        return jax.nn.relu(x @ p["kernel"] + p["bias"])

    params = mlp_params((4, 4, 4))
    g = oba_jax.connectivity(lambda p, x: dense(p["l1"], dense(p["l0"], x)), params, jnp.ones((2, 4)))
    assert [l.name for l in g.layers] == ["l0", "l1"] and g.upstream["l1"] == ("l0",)


def test_errors():
    with pytest.raises(ValueError, match="no parameter layers"):
        oba_jax.connectivity(lambda p, x: x * p["scale"], {"scale": jnp.ones(3)}, jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="not an array"):
        oba_jax.connectivity(mlp_apply, {"l0": {"kernel": [[1.0]], "bias": jnp.ones(1)}}, jnp.ones((2, 1)))

    # (lax.scan over stacked layers is unrolled and supported now: tests/test_constructs.py)
    def looped(p, x):
        body = lambda c: (c[0] + 1, jax.nn.relu(c[1] @ p["w"]))
        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]
    with pytest.raises(NotImplementedError, match="lax.while_loop"):
        oba_jax.connectivity(looped, {"w": jnp.ones((4, 4))}, jnp.ones((2, 4)))
