"""The connectivity map on models written the way users write them (plain NNX modules, pure functions)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oba_jax


# Test data comes from numpy: on XLA:CPU compiling jax.random's samplers costs seconds per shape.
def _dense(rng, n_in, n_out):
    return {"kernel": jnp.asarray(rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)),
            "bias": jnp.asarray(0.1 * rng.normal(size=(n_out,)))}


def mlp_params(sizes=(6, 5, 4, 3), seed=0):
    rng = np.random.default_rng(seed)
    return {f"l{i}": _dense(rng, a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def mlp_apply(p, x, act=jax.nn.relu):
    n = len(p)
    for i in range(n):
        x = x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"]
        if i < n - 1:
            x = act(x)
    return x


class ResidualBNNet(nnx.Module):
    """conv-BN-ReLU, a residual block with a 1×1 projection shortcut, GAP, dense."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
        self.bn0 = nnx.BatchNorm(8, rngs=rngs)
        self.a = nnx.Conv(8, 16, (3, 3), use_bias=False, rngs=rngs)
        self.bn_a = nnx.BatchNorm(16, rngs=rngs)
        self.b = nnx.Conv(16, 16, (3, 3), use_bias=False, rngs=rngs)
        self.bn_b = nnx.BatchNorm(16, rngs=rngs)
        self.proj = nnx.Conv(8, 16, (1, 1), use_bias=False, rngs=rngs)
        self.fc = nnx.Linear(16, 5, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.bn0(self.stem(x)))
        out = self.bn_b(self.b(nnx.relu(self.bn_a(self.a(h)))))
        h = nnx.relu(out + self.proj(h))
        return self.fc(h.mean(axis=(1, 2)))


class ConcatNet(nnx.Module):
    def __init__(self, rngs):
        self.left = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.right = nnx.Conv(3, 6, (1, 1), rngs=rngs)
        self.merge = nnx.Conv(10, 8, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        h = jnp.concatenate([nnx.relu(self.left(x)), nnx.relu(self.right(x))], axis=-1)
        return self.fc(nnx.relu(self.merge(h)).mean(axis=(1, 2)))


class AttentionBlock(nnx.Module):
    """Pre-norm single-head-group attention with separate q/k/v/out projections and a class head."""

    def __init__(self, rngs, d=8, heads=2, tokens=5):
        self.heads = heads
        self.pos = nnx.Param(jnp.asarray(0.02 * np.random.default_rng(3).normal(size=(1, tokens, d)), jnp.float32))
        self.ln = nnx.LayerNorm(d, rngs=rngs)
        self.q = nnx.Linear(d, d, rngs=rngs)
        self.k = nnx.Linear(d, d, rngs=rngs)
        self.v = nnx.Linear(d, d, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)
        self.head = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, x):
        b, n, d = x.shape
        h = x + self.pos[...]
        a = self.ln(h)
        split = lambda t: t.reshape(b, n, self.heads, d // self.heads)
        q, k, v = split(self.q(a)), split(self.k(a)), split(self.v(a))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, n, d)
        h = h + self.out(o)
        return self.head(h.mean(axis=1))


def gated_params(seed=0, d=6, hidden=7, classes=3):
    rng = np.random.default_rng(seed)
    return {"gate": _dense(rng, d, hidden), "up": _dense(rng, d, hidden), "down": _dense(rng, hidden, classes)}


def gated_apply(p, x):
    h = jax.nn.silu(x @ p["gate"]["kernel"] + p["gate"]["bias"]) * (x @ p["up"]["kernel"] + p["up"]["bias"])
    return h @ p["down"]["kernel"] + p["down"]["bias"]


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

    def scanned(p, x):
        def body(h, w):
            return jax.nn.relu(h @ w), None
        return jax.lax.scan(body, x, p["stack"])[0]
    with pytest.raises(NotImplementedError, match="lax.scan"):
        oba_jax.connectivity(scanned, {"stack": jnp.ones((3, 4, 4))}, jnp.ones((2, 4)))
