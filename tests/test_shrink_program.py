"""`shrink_program` (issue 19): the model's own traced program evaluated with smaller arrays — equal to the
masked model (float64, <= 1e-12), for plain functions and a Flax linen model with no module-specific code,
differentiable, and exported as StableHLO that runs in a fresh process without the model's code."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oba_jax
from nets import (EXPORTED_RUN, LinenNet, causal_lm_apply, causal_lm_params, width_scaled_attention,
                  width_scaled_attention_params)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _half(groups, rng, skip=("embed",)):
    return {g.name: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False))
            for g in groups if g.prunable and g.kind not in skip}


@pytest.fixture(scope="module")
def linen(x64_module):
    net = LinenNet()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 1)))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), net.init(jax.random.PRNGKey(0), x)["params"])
    apply = lambda p, x: net.apply({"params": p}, x)  # noqa: E731  (the contract's Flax linen apply_fn)
    groups = oba_jax.channel_groups(apply, params, x)
    kept = _half(groups, np.random.default_rng(2))
    small_apply, small = oba_jax.shrink_program(apply, params, x, groups, kept)
    return apply, params, x, groups, kept, small_apply, small


@pytest.fixture(scope="module")
def x64_module():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


def test_flax_linen_model_shrinks_with_no_module_specific_code(linen):
    apply, params, x, groups, kept, small_apply, small = linen
    assert {g.kind for g in groups if g.name in kept} == {"channels", "hidden", "heads", "head_dim"}
    masked = oba_jax.mask_params(params, groups, kept)
    x5 = jnp.asarray(np.random.default_rng(3).normal(size=(5, 8, 8, 1)))   # another batch size than traced
    jitted = jax.jit(small_apply)
    for inputs in (x, x5):
        assert _rel(jitted(small, inputs), apply(masked, inputs)) < 1e-12
    assert oba_jax.count_params(small) < oba_jax.count_params(params)
    with pytest.raises(Exception, match="ScopeParamShapeError|expected to generate shape"):
        apply(oba_jax.shrink_params(params, groups, kept), x)      # the smaller arrays alone do not run
    # differentiable: the gradient of the shrunk program is the masked model's gradient at the kept entries
    loss = lambda f, p: oba_jax.softmax_cross_entropy(f(p, x), jnp.array([0, 2]))  # noqa: E731
    g_small = jax.jit(jax.grad(lambda p: loss(small_apply, p)))(small)
    g_masked = oba_jax.shrink_params(jax.jit(jax.grad(lambda p: loss(apply, p)))(masked), groups, kept)
    for a, b in zip(jax.tree_util.tree_leaves(g_small), jax.tree_util.tree_leaves(g_masked)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_the_one_exception_a_layernorm_over_a_pruned_residual_stream(linen):
    """A LayerNorm that centres before squaring: masked channels are zero before it and −mean after the
    centring, so they count in its variance; removed channels do not, so the two functions differ.
    shrink_program computes the removal (sums over the kept channels, divided by the dense width, a
    trace-time constant). Norms that square without centring (RMSNorm, Flax's default fast variance
    E[x²] − E[x]²) have no such difference (the decoder test prunes its RMSNorm stream)."""
    apply, params, x, groups, _, _, _ = linen
    stream = next(g for g in groups if g.kind == "embed")
    kept = {stream.name: np.array([0, 2, 3, 5])}
    small_apply, small = oba_jax.shrink_program(apply, params, x, groups, kept)
    assert _rel(small_apply(small, x), apply(oba_jax.mask_params(params, groups, kept), x)) > 1e-6


def test_decoder_with_gqa_rope_swiglu_rmsnorm_equals_the_mask(x64_module):
    """Every group of the decoder pruned (kv groups, query heads in a group, RoPE pairs, v's head dim, MLP
    units, and the residual stream under RMSNorm, whose mean keeps the dense width as its divisor): the
    shrunk program computes the masked model; the smaller arrays in the same Python function do not."""
    params = causal_lm_params(head_dim=4)
    rng = np.random.default_rng(4)
    ids = jnp.asarray(rng.integers(0, 7, (3, 5)))
    groups = oba_jax.channel_groups(causal_lm_apply, params, ids)
    kept = _half(groups, rng, skip=())
    assert {g.kind for g in groups if g.name in kept} == {"embed", "hidden", "heads", "head_dim"}
    small_apply, small = oba_jax.shrink_program(causal_lm_apply, params, ids, groups, kept)
    masked = causal_lm_apply(oba_jax.mask_params(params, groups, kept), ids)
    assert _rel(jax.jit(small_apply)(small, ids), masked) < 1e-12
    assert small["q"]["kernel"].shape == (4, 1, 2) and small["gate"]["kernel"].shape == (4, 3)
    assert _rel(causal_lm_apply(oba_jax.shrink_params(params, groups, kept), ids), masked) > 1e-3


def test_width_derived_constants_stay_what_the_dense_model_computed(x64_module):
    p, x = width_scaled_attention_params()
    groups = oba_jax.channel_groups(width_scaled_attention, p, x)
    kept = {g.name: np.array([0, 2]) for g in groups if g.kind == "head_dim"}
    small_apply, small = oba_jax.shrink_program(width_scaled_attention, p, x, groups, kept)
    masked = width_scaled_attention(oba_jax.mask_params(p, groups, kept), x)
    assert _rel(small_apply(small, x), masked) < 1e-12
    assert _rel(width_scaled_attention(small, x), masked) > 1e-3   # the scale 1/sqrt(2) instead of 1/sqrt(4)


def test_exported_program_runs_in_a_fresh_process_without_the_model_code(linen, tmp_path):
    """`jax.export` with a symbolic batch size: StableHLO bytes, deserialised and run in a process that
    imports neither oba_jax nor flax, on a batch size the model was not traced with."""
    apply, params, _, groups, kept, small_apply, small = linen
    batch = jax.export.symbolic_shape("b")[0]
    spec = jax.ShapeDtypeStruct((batch, 8, 8, 1), jnp.float64)
    exported = jax.export.export(jax.jit(small_apply))(jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), small), spec)
    (tmp_path / "model.stablehlo").write_bytes(exported.serialize())
    x7 = np.random.default_rng(5).normal(size=(7, 8, 8, 1))
    leaves = jax.tree_util.tree_leaves(small)
    np.savez(tmp_path / "inputs.npz", n=len(leaves), x=x7, **{f"p{i}": np.asarray(a) for i, a in enumerate(leaves)})
    subprocess.run([sys.executable, "-c", EXPORTED_RUN, str(tmp_path / "inputs.npz"), str(tmp_path / "model.stablehlo"),
                    str(tmp_path / "out.npy")], check=True, cwd=str(tmp_path), timeout=300,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    expected = apply(oba_jax.mask_params(params, groups, kept), jnp.asarray(x7))
    assert _rel(jnp.asarray(np.load(tmp_path / "out.npy")), expected) < 1e-12


def test_bad_inputs_are_clear_errors(x64_module):
    p, x = width_scaled_attention_params()
    groups = oba_jax.channel_groups(width_scaled_attention, p, x)
    with pytest.raises(ValueError, match="batch axis of at least 2"):
        oba_jax.shrink_program(width_scaled_attention, p, x[:1], groups, {})
    with pytest.raises(KeyError, match="no channel group 'nope'"):
        oba_jax.shrink_program(width_scaled_attention, p, x, groups, {"nope": np.array([0])})
    small_apply, small = oba_jax.shrink_program(width_scaled_attention, p, x, groups, {})
    with pytest.raises(ValueError, match="structures shrink_program was given"):
        small_apply({"q": small["q"]}, x)


def _two_layers_with_a_shared_head_mask(p, x):
    """Two attention layers scaled per head by rows of one constant (as Hugging Face's Flax BERT applies its
    default `head_mask = ones((layers, heads))`), a ones((batch, tokens)) mask made from the input's shape,
    and a constant per-unit gain shared by both layers' MLPs."""
    head_mask = jnp.ones((2, 2)) * jnp.asarray([[1.0, 0.5], [0.25, 1.0]])
    gain = jnp.linspace(0.5, 1.5, 3)
    pad = jnp.ones(x.shape[:2])
    for i, layer in enumerate(("l0", "l1")):
        q = jnp.einsum("btd,dhe->bthe", x, p[layer]["q"])
        k = jnp.einsum("btd,dhe->bthe", x, p[layer]["k"])
        v = jnp.einsum("btd,dhe->bthe", x, p[layer]["v"])
        att = jax.nn.softmax(jnp.einsum("bqhe,bkhe->bhqk", q, k) + (1.0 - pad)[:, None, None, :] * -1e9, -1)
        att = jnp.einsum("bhqk,h->bhqk", att, head_mask[i])
        x = x + jnp.einsum("bhqk,bkhe,hed->bqd", att, v, p[layer]["o"])
        x = x + (jax.nn.relu(x @ p[layer]["up"]) * gain) @ p[layer]["down"]
    return x.mean(1) @ p["head"]


def test_a_constant_used_by_several_layers_does_not_tie_their_channels(x64_module):
    """A constant meets each layer where it is used: each use is gathered at that layer's kept channels, so
    layers keep different heads and units (the landed code tied them through the constant and refused)."""
    rng = np.random.default_rng(9)
    w = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(s[0]))  # noqa: E731
    layer = lambda: {"q": w(4, 2, 3), "k": w(4, 2, 3), "v": w(4, 2, 3), "o": w(2, 3, 4),  # noqa: E731
                     "up": w(4, 3), "down": w(3, 4)}
    p, x = {"l0": layer(), "l1": layer(), "head": w(4, 3)}, jnp.asarray(rng.normal(size=(2, 5, 4)))
    groups = oba_jax.channel_groups(_two_layers_with_a_shared_head_mask, p, x)
    by_kind = {(g.name.split("/")[0], g.kind): g.name for g in groups if g.prunable}
    assert {("l0", "heads"), ("l1", "heads"), ("l0", "hidden"), ("l1", "hidden")} <= set(by_kind)
    kept = {by_kind["l0", "heads"]: np.array([0]), by_kind["l1", "heads"]: np.array([1]),
            by_kind["l0", "hidden"]: np.array([0, 2]), by_kind["l1", "hidden"]: np.array([1])}
    small_apply, small = oba_jax.shrink_program(_two_layers_with_a_shared_head_mask, p, x, groups, kept)
    x3 = jnp.asarray(rng.normal(size=(3, 5, 4)))
    shrunk, dense = jax.jit(small_apply), jax.jit(_two_layers_with_a_shared_head_mask)
    for inputs in (x, x3):
        assert _rel(shrunk(small, inputs), dense(oba_jax.mask_params(p, groups, kept), inputs)) < 1e-12
    assert small["l0"]["q"].shape == (4, 1, 3) and small["l1"]["up"].shape == (4, 1)
