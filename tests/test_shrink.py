"""Shrinking and masking: the physically smaller model computes what the masked one does."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import oba_jax
from nets import (ConcatNet, ResidualBNNet, mlp_apply, mlp_params, width_scaled_attention,
                  width_scaled_attention_params)

FAMILIES = {
    "mlp": lambda: models.make_spec("mlp", hidden=(9, 7)),
    "vgg": lambda: models.make_spec("vgg", cfg=(8, "M", 16, 12), image_size=16),
    "resnet_cifar": lambda: models.make_spec("resnet_cifar", depth=8, image_size=16),
    "resnet50": lambda: models.make_spec("resnet50", image_size=16, num_classes=10, stem_width=8,
                                         stage_widths=(16, 24, 32), blocks_per_stage=(1, 2, 1),
                                         block_widths=(((4, 6),), ((8, 8), (6, 6)), ((8, 8),))),
    "vit": lambda: models.make_spec("vit", config_name="vit_tiny_test"),
}


def _half(groups, kinds, seed=0):
    rng = np.random.default_rng(seed)
    return {g.name: np.sort(rng.choice(g.size, max(1, g.size // 2), replace=False))
            for g in groups if g.prunable and g.kind in kinds}


@nnx.jit
def _forward(model, x):   # one program per model instead of op-by-op compilation of every layer's shapes
    return model(x)


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("family,kinds", [
    ("mlp", ("hidden",)), ("vgg", ("channels",)), ("resnet_cifar", ("channels",)), ("resnet50", ("channels",)),
    ("vit", ("hidden",)), ("vit", ("heads",)), ("vit", ("head_dim",)), ("vit", ("heads", "head_dim", "hidden"))])
def test_shrunk_model_equals_masked_model(family, kinds):
    spec = FAMILIES[family]()
    model = models.build_model(spec, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, *models.input_shape(spec))), jnp.float32)
    groups = oba_jax.model_channel_groups(model, x)
    kept = _half(groups, kinds)
    assert kept
    small, masked = oba_jax.shrink_model(model, groups, kept, verify=x), oba_jax.mask_model(model, groups, kept)
    assert type(small) is type(model) and small.spec != spec
    # the smaller spec is the whole story: a model built from it alone, filled with the arrays, is the same
    rebuilt = models.build_model(small.spec, rngs=nnx.Rngs(5))
    nnx.update(rebuilt, nnx.state(small, nnx.Param), nnx.state(small, nnx.BatchStat))
    for mode in ("eval", "train"):   # (a train-mode call updates the running statistics: one call each)
        for m in (small, masked, rebuilt):
            getattr(m, mode)()
        out_small, out_masked, out_rebuilt = (_forward(m, x) for m in (small, masked, rebuilt))
        assert _rel(out_small, out_masked) < 1e-5, mode
        np.testing.assert_array_equal(out_rebuilt, out_small)
    sizes = {g.name: g.size for g in groups}
    n_params = lambda m: oba_jax.count_params(nnx.state(m, nnx.Param))
    assert n_params(small) < n_params(model)
    assert all(len(v) < sizes[k] for k, v in kept.items())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_shrunk_program_of_every_zoo_family_is_the_mask_and_costs_what_the_group_graph_says(family):
    """Issue 19: `shrink_program` on the zoo's pure apply function (no zoo-specific code): logits equal the
    masked model's, and `GroupGraph.macs(kept)` / `.params(kept)` equal what the shrunk program counts."""
    from oba_jax.graph import find_groups
    from oba_jax.program import trace_program
    spec = FAMILIES[family]()
    model = models.build_model(spec, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, *models.input_shape(spec))), jnp.float32)
    apply, state = oba_jax.model_apply(model, "eval")
    graph = find_groups(trace_program(apply, state, x))
    kept = _half([g for g in graph.groups if g.kind != "embed"], ("hidden", "channels", "heads", "head_dim"))
    small_apply, small = oba_jax.shrink_program(apply, state, x, graph.groups, kept)
    assert _rel(jax.jit(small_apply)(small, x), apply(oba_jax.mask_params(state, graph.groups, kept), x)) < 1e-5
    assert graph.macs(kept) == oba_jax.count_macs(small_apply, small, x) < graph.macs()
    assert graph.params(kept) == oba_jax.count_params(small) < graph.params()


def test_vit_value_head_dims_shrink_on_their_own():
    spec = FAMILIES["vit"]()
    model = models.build_model(spec, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
    groups = oba_jax.model_channel_groups(model, x)
    kept = {g.name: np.arange(5) for g in groups if g.kind == "head_dim" and "value" in g.name}
    small = oba_jax.shrink_model(model, groups, kept)
    assert small.spec.value_head_dim == (5, 5) and small.spec.head_dim == (16, 16) and small.spec.score_dim is None
    assert _rel(small(x), oba_jax.mask_model(model, groups, kept)(x)) < 1e-5


class HeadsBlock(nnx.Module):
    """A user's attention module that keeps its head count and head width as attributes."""

    def __init__(self, rngs, d=8, num_heads=4, head_dim=3):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q, self.k, self.v = (nnx.Linear(d, num_heads * head_dim, rngs=rngs) for _ in range(3))
        self.out = nnx.Linear(num_heads * head_dim, d, rngs=rngs)
        self.head = nnx.Linear(d, 3, rngs=rngs)

    def __call__(self, x):
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.num_heads, self.head_dim)
        s = jnp.einsum("bqhd,bkhd->bhqk", split(self.q(x)), split(self.k(x))) / np.sqrt(3.0)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), split(self.v(x)))
        return self.head(self.out(o.reshape(b, n, -1)).mean(axis=1))


@pytest.mark.parametrize("net,shape,kinds", [(ResidualBNNet, (8, 8, 3), ("channels",)),
                                             (ConcatNet, (6, 6, 3), ("channels",)),
                                             (HeadsBlock, (5, 8), ("heads",)),
                                             (HeadsBlock, (5, 8), ("head_dim",))])
def test_any_nnx_module_is_sliced_and_its_attributes_updated(net, shape, kinds):
    model = net(nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(3, *shape)), jnp.float32)
    groups = oba_jax.model_channel_groups(model, x)
    kept = _half(groups, kinds)
    assert kept
    small = oba_jax.shrink_model(model, groups, kept)
    assert _rel(small(x), oba_jax.mask_model(model, groups, kept)(x)) < 1e-5
    for _, m in nnx.iter_modules(small):
        if isinstance(m, (nnx.Conv, nnx.Linear)):
            assert (m.in_features, m.out_features) == tuple(m.kernel.shape[-2:])
        if isinstance(m, nnx.BatchNorm):
            assert m.num_features == m.scale.shape[0] == m.mean.shape[0]
    if kinds == ("heads",):
        assert small.num_heads == 2 and small.head_dim == 3


def test_shrink_params_of_a_pure_jax_model():
    params = mlp_params((6, 5, 4, 3))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(7, 6)), jnp.float32)
    groups = oba_jax.channel_groups(mlp_apply, params, x)
    kept = {"l0": np.array([0, 3]), "l1": np.array([1, 2, 3])}
    small = oba_jax.shrink_params(params, groups, kept)
    assert small["l0"]["kernel"].shape == (6, 2) and small["l1"]["kernel"].shape == (2, 3)
    np.testing.assert_array_equal(small["l1"]["kernel"], params["l1"]["kernel"][np.ix_([0, 3], [1, 2, 3])])
    masked = oba_jax.mask_params(params, groups, kept)
    assert float(jnp.abs(masked["l0"]["bias"][np.array([1, 2, 4])]).max()) == 0.0
    np.testing.assert_allclose(mlp_apply(small, x), mlp_apply(masked, x), rtol=1e-6, atol=1e-6)


def test_verify_refuses_a_shrink_that_changes_the_function():
    """Issue 19, measured item 3: shrinking head dims of a model that computes 1/sqrt(head_dim) from the
    width silently changed its logits; `verify` makes it an error. A shape-agnostic MLP passes."""
    p, x = width_scaled_attention_params(dtype=jnp.float32)
    rng = np.random.default_rng(9)
    groups = oba_jax.channel_groups(width_scaled_attention, p, x)
    qk = next(g for g in groups if g.kind == "head_dim" and ("q/kernel", 1) in {(m.path, m.axis) for m in g.members})
    kept = {qk.name: np.array([0, 2])}
    silent = oba_jax.shrink_params(p, groups, kept)
    masked = oba_jax.mask_params(p, groups, kept)
    assert _rel(width_scaled_attention(silent, x), width_scaled_attention(masked, x)) > 1e-3
    with pytest.raises(oba_jax.ShrinkMismatchError, match="relative to the largest output"):
        oba_jax.shrink_params(p, groups, kept, verify=(width_scaled_attention, x))
    with pytest.raises(TypeError, match="pair"):
        oba_jax.shrink_params(p, groups, kept, verify=width_scaled_attention)
    params = mlp_params((6, 5, 4, 3))
    xm = jnp.asarray(rng.normal(size=(7, 6)), jnp.float32)
    mlp_groups = oba_jax.channel_groups(mlp_apply, params, xm)
    small = oba_jax.shrink_params(params, mlp_groups, {"l0": np.array([0, 3])}, verify=(mlp_apply, xm))
    assert small["l0"]["kernel"].shape == (6, 2)


def test_bad_plans_are_clear_errors():
    params = mlp_params((6, 5, 4, 3))
    groups = oba_jax.channel_groups(mlp_apply, params, jnp.ones((2, 6)))
    cases = [({"nope": [0]}, KeyError, "no channel group 'nope'"),
             ({"l0": [0, 9]}, ValueError, r"outside \[0, 5\)"),
             ({"l0": [3, 1]}, ValueError, "sorted and unique"),
             ({"l0": [1, 1]}, ValueError, "sorted and unique"),
             ({"l0": []}, ValueError, "is empty"),
             ({"l0": [[0, 1]]}, ValueError, "1-D"),
             ({"l2": [0, 1]}, ValueError, "not prunable")]
    for kept, error, match in cases:
        with pytest.raises(error, match=match):
            oba_jax.shrink_params(params, groups, kept)
    with pytest.raises(KeyError, match="these parameters do not have"):
        oba_jax.shrink_params({"l0": params["l0"]}, groups, {"l0": [0]})


@pytest.mark.parametrize("method", ["oba", "taylor", "magnitude"])
def test_scores_of_the_masked_model_equal_the_shrunk_models_on_kept_parameters(method):
    """Why the schedule may score a masked model of fixed shapes (one compiled program) instead of
    shrinking at every step: on the parameters that stay, the scores are the same."""
    spec = FAMILIES["resnet_cifar"]()
    model = models.build_model(spec, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(6)
    batches = (jnp.asarray(rng.normal(size=(2, 4, 16, 16, 3)), jnp.float32),
               jnp.asarray(rng.integers(0, 10, (2, 4)), jnp.int32))
    groups = oba_jax.model_channel_groups(model, batches[0][0])
    kept = _half(groups, ("channels",), seed=7)
    masked = oba_jax.score_model(oba_jax.mask_model(model, groups, kept), batches, method)
    shrunk = oba_jax.score_model(oba_jax.shrink_model(model, groups, kept), batches, method)
    # the scores are a tree like the parameters: no BatchNorm statistics
    params_groups = [dataclasses.replace(g, members=tuple(m for m in g.members if not m.path.startswith("batch_stats/")))
                     for g in groups]
    on_kept = oba_jax.shrink_params(masked.sum, params_groups, kept)
    ref, got = jax.tree_util.tree_leaves(shrunk.sum), jax.tree_util.tree_leaves(on_kept)
    scale = max(float(jnp.abs(r).max()) for r in ref)
    assert scale > 0
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-5 * scale)
