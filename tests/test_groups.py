"""Channel dependency groups read from the program: one test per construct with the exact member sets,
every zoo family, user models outside `models/`, and the memberships of the authors' fixture."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import oba_jax
import torchlike as T
from conftest import REFERENCE_DIR
from nets import AttentionBlock, ConcatNet, ResidualBNNet, causal_lm_apply, causal_lm_params, mlp_apply, mlp_params


def _members(group):
    return {(m.path, m.axis) for m in group.members}


def _by_name(groups):
    return {g.name: g for g in groups}


def _model_groups(model, shape):
    return oba_jax.model_channel_groups(model, jnp.ones((2,) + shape))


def _prunable(groups):
    return [g for g in groups if g.prunable]


def test_mlp_hidden_units():
    groups = _by_name(oba_jax.channel_groups(mlp_apply, mlp_params((6, 5, 4, 3)), jnp.ones((2, 6))))
    assert set(groups) == {"inputs", "l0", "l1", "l2"}
    assert _members(groups["l0"]) == {("l0/kernel", 1), ("l0/bias", 0), ("l1/kernel", 0)}
    assert groups["l0"].kind == "hidden" and groups["l0"].size == 5 and groups["l0"].prunable
    assert not groups["inputs"].prunable and "input" in groups["inputs"].reason
    assert not groups["l2"].prunable and "logits" in groups["l2"].reason
    np.testing.assert_array_equal(groups["l1"].member("l2/kernel").indices, np.arange(4)[:, None])


def test_residual_stream_is_one_group_with_norms_and_statistics():
    groups = _by_name(_model_groups(ResidualBNNet(nnx.Rngs(0)), (8, 8, 3)))
    stream = groups["b"]   # the block's output, the projection shortcut and the classifier input
    assert _members(stream) == {
        ("b/kernel", 3), ("bn_b/scale", 0), ("bn_b/bias", 0), ("batch_stats/bn_b/mean", 0),
        ("batch_stats/bn_b/var", 0), ("proj/kernel", 3), ("fc/kernel", 0)}
    assert stream.kind == "channels" and stream.producers == ("b/kernel", "proj/kernel")
    assert _members(groups["stem"]) == {
        ("stem/kernel", 3), ("bn0/scale", 0), ("bn0/bias", 0), ("batch_stats/bn0/mean", 0),
        ("batch_stats/bn0/var", 0), ("a/kernel", 2), ("proj/kernel", 2)}
    assert _members(groups["a"]) == {("a/kernel", 3), ("bn_a/scale", 0), ("bn_a/bias", 0),
                                     ("batch_stats/bn_a/mean", 0), ("batch_stats/bn_a/var", 0), ("b/kernel", 2)}


def test_concatenated_branches_map_to_their_slices_of_the_consumer():
    groups = _by_name(_model_groups(ConcatNet(nnx.Rngs(1)), (6, 6, 3)))
    left, right = groups["left"], groups["right"]
    assert _members(left) == {("left/kernel", 3), ("left/bias", 0), ("merge/kernel", 2)}
    assert _members(right) == {("right/kernel", 3), ("right/bias", 0), ("merge/kernel", 2)}
    np.testing.assert_array_equal(left.member("merge/kernel").indices[:, 0], np.arange(4))
    np.testing.assert_array_equal(right.member("merge/kernel").indices[:, 0], 4 + np.arange(6))


def test_flatten_before_dense_maps_a_channel_to_its_block_of_inputs():
    rng = np.random.default_rng(0)
    params = {"conv": jnp.asarray(rng.normal(size=(3, 3, 2, 5)), jnp.float32),
              "fc": jnp.asarray(rng.normal(size=(4 * 4 * 5, 3)), jnp.float32)}

    def apply(p, x):
        h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["conv"], (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
        return h.reshape(x.shape[0], -1) @ p["fc"]

    groups = _by_name(oba_jax.channel_groups(apply, params, jnp.ones((2, 4, 4, 2))))
    conv = groups["conv"]
    assert _members(conv) == {("conv", 3), ("fc", 0)}
    # NHWC flatten: channel c is every 5th input of the dense layer, 16 positions
    np.testing.assert_array_equal(conv.member("fc").indices[2], 2 + 5 * np.arange(16))


def test_attention_heads_and_head_dims():
    groups = _model_groups(AttentionBlock(nnx.Rngs(2)), (5, 8))
    kinds = {g.kind for g in groups}
    assert {"heads", "head_dim", "embed"} <= kinds
    heads = [g for g in groups if g.kind == "heads"]
    assert len(heads) == 1 and heads[0].size == 2
    assert _members(heads[0]) == {(f"{p}/kernel", 1) for p in "qkv"} | {(f"{p}/bias", 0) for p in "qkv"} | {
        ("out/kernel", 0)}
    np.testing.assert_array_equal(heads[0].member("q/kernel").indices[1], np.arange(4, 8))   # head 1 = dims 4..7
    head_dims = sorted((g for g in groups if g.kind == "head_dim"), key=lambda g: g.name)
    qk, v = head_dims if "q" in head_dims[0].name else head_dims[::-1]
    assert _members(qk) == {("q/kernel", 1), ("q/bias", 0), ("k/kernel", 1), ("k/bias", 0)}
    assert _members(v) == {("v/kernel", 1), ("v/bias", 0), ("out/kernel", 0)}
    np.testing.assert_array_equal(qk.member("q/kernel").indices[3], [3, 7])   # dim 3 of both heads
    embed = next(g for g in groups if g.kind == "embed")
    assert {("pos", 2), ("ln/scale", 0), ("ln/bias", 0), ("q/kernel", 0), ("k/kernel", 0), ("v/kernel", 0),
            ("out/kernel", 1), ("out/bias", 0), ("head/kernel", 0)} == _members(embed)
    assert not embed.prunable and "input" in embed.reason   # this block's stream is its input


def test_depthwise_conv_ties_input_and_output_channels_and_grouped_conv_is_not_prunable():
    rng = np.random.default_rng(1)

    def net(groups):
        params = {"pw": jnp.asarray(rng.normal(size=(1, 1, 2, 6)), jnp.float32),
                  "dw": jnp.asarray(rng.normal(size=(3, 3, 6 // groups, 6)), jnp.float32),
                  "fc": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}

        def apply(p, x):
            conv = lambda h, w, g: jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", feature_group_count=g,
                                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(conv(x, p["pw"], 1))
            return jax.nn.relu(conv(h, p["dw"], groups)).mean(axis=(1, 2)) @ p["fc"]
        return oba_jax.channel_groups(apply, params, jnp.ones((2, 5, 5, 2)))

    depthwise = _by_name(net(6))
    assert _members(depthwise["pw"]) == {("pw", 3), ("dw", 3), ("fc", 0)} and depthwise["pw"].prunable
    grouped = _by_name(net(2))
    assert not grouped["pw"].prunable and "grouped convolution (2 groups)" in grouped["pw"].reason
    assert not grouped["dw"].prunable


def test_a_primitive_without_a_rule_names_itself():
    params = mlp_params((6, 5, 4, 3))

    def apply(p, x):
        h = jax.nn.relu(x @ p["l0"]["kernel"] + p["l0"]["bias"])
        h = jnp.sort(h, axis=-1)                 # mixes the positions of l0's channels
        return jax.nn.relu(h @ p["l1"]["kernel"]) @ p["l2"]["kernel"]

    groups = _by_name(oba_jax.channel_groups(apply, params, jnp.ones((2, 6))))
    assert not groups["l0"].prunable and "`sort` mixes the positions" in groups["l0"].reason
    assert groups["l1"].prunable


def test_rows_looked_up_by_index_are_not_a_channel_group_but_the_embedding_width_is():
    """Issue 19 item 3: shrinking a table's rows would leave ids pointing at removed rows (NaN logits)."""
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    params = {"emb": jax.random.normal(k[0], (10, 4)), "head": {"kernel": jax.random.normal(k[1], (4, 3)),
                                                                "bias": jnp.zeros(3)}}

    def apply(p, ids):
        return jnp.take(p["emb"], ids, 0).mean(1) @ p["head"]["kernel"] + p["head"]["bias"]

    groups = oba_jax.channel_groups(apply, params, jnp.array([[1, 7, 9], [0, 3, 8]]))
    rows = next(g for g in groups if _members(g) == {("emb", 0)})
    width = next(g for g in groups if ("emb", 1) in _members(g))
    assert not rows.prunable and "looked up by index" in rows.reason and "gather" in rows.reason
    assert width.prunable and _members(width) == {("emb", 1), ("head/kernel", 0)}


def test_causal_lm_groups_gqa_rope_swiglu():
    """Issue 19 item 4: a decoder with (batch, tokens, vocab) logits. Query heads within a key/value group,
    key/value groups, RoPE pairs of the q·k head dim (the position inside a pair is picked by slices: not
    prunable), v's head dim, MLP units, the residual stream; embedding rows and the vocabulary are not."""
    params = causal_lm_params(head_dim=4)
    groups = oba_jax.channel_groups(causal_lm_apply, params, jnp.asarray(np.arange(15).reshape(3, 5) % 7))
    by_members = {frozenset((m.path, m.axis, m.indices.shape[1]) for m in g.members): g for g in groups}
    expect = {
        "embed": {("embed", 1, 1), ("norm1/scale", 0, 1), ("norm2/scale", 0, 1), ("norm_f/scale", 0, 1),
                  ("q/kernel", 0, 1), ("k/kernel", 0, 1), ("v/kernel", 0, 1), ("o/kernel", 2, 1),
                  ("gate/kernel", 0, 1), ("up/kernel", 0, 1), ("down/kernel", 1, 1), ("lm_head/kernel", 0, 1)},
        "hidden": {("gate/kernel", 1, 1), ("up/kernel", 1, 1), ("down/kernel", 0, 1)},
        "heads": {("k/kernel", 1, 1), ("v/kernel", 1, 1), ("q/kernel", 1, 2), ("o/kernel", 0, 2)},  # kv groups
        "heads/within": {("q/kernel", 1, 2), ("o/kernel", 0, 2)},                  # query heads in a kv group
        "head_dim/v": {("v/kernel", 2, 1), ("o/kernel", 1, 1)},
    }
    for label, members in expect.items():
        g = by_members[frozenset(members)]
        assert g.kind == label.split("/")[0] and g.prunable, (label, g)
    kv = by_members[frozenset(expect["heads"])]
    np.testing.assert_array_equal(kv.member("q/kernel", 1).indices, [[0, 1], [2, 3]])   # q head h = 2·g + j
    # the q·k head dim: RoPE pairs (2i, 2i+1) are channels; the position inside a pair is picked by slices
    qk = {tuple(map(tuple, g.member("q/kernel", 2).indices)): g for g in groups
          if {(m.path, m.axis) for m in g.members} == {("q/kernel", 2), ("k/kernel", 2)}}
    assert set(qk) == {((0, 1), (2, 3)), ((0, 2), (1, 3))}
    pairs, inside = qk[((0, 1), (2, 3))], qk[((0, 2), (1, 3))]
    assert pairs.kind == "head_dim" and pairs.prunable
    np.testing.assert_array_equal(pairs.member("k/kernel", 2).indices, [[0, 1], [2, 3]])
    assert not inside.prunable and "picks single channels" in inside.reason
    rows = [g for g in groups if {(m.path, m.axis) for m in g.members} == {("embed", 0)}]
    vocab = [g for g in groups if ("lm_head/bias", 0) in {(m.path, m.axis) for m in g.members}]
    assert not rows[0].prunable and not vocab[0].prunable and "logits" in vocab[0].reason
    assert len(groups) == 9


def test_ignore_by_group_or_layer():
    params = mlp_params((6, 5, 4, 3))
    groups = _by_name(oba_jax.channel_groups(mlp_apply, params, jnp.ones((2, 6)), ignore=("l0",)))
    assert not groups["l0"].prunable and "ignore" in groups["l0"].reason and groups["l1"].prunable


@pytest.mark.parametrize("family", ["vgg19", "resnet20", "resnet32", "resnet56", "resnet50", "vit"])
def test_zoo_families(family):
    spec = {"vgg19": lambda: models.make_spec("vgg", cfg_name="vgg19"),
            "resnet20": lambda: models.make_spec("resnet_cifar", depth=20),
            "resnet32": lambda: models.make_spec("resnet_cifar", depth=32),
            "resnet56": lambda: models.make_spec("resnet_cifar", depth=56),
            "resnet50": lambda: models.make_spec("resnet50", image_size=32, num_classes=10,
                                                 stage_widths=(16, 32, 64, 128), stem_width=8,
                                                 block_widths=(((4, 4),) * 3, ((8, 8),) * 4, ((16, 16),) * 6,
                                                               ((32, 32),) * 3)),
            "vit": lambda: models.make_spec("vit", config_name="vit_tiny_test")}[family]()
    model = nnx.eval_shape(lambda: models.build_model(spec, rngs=nnx.Rngs(0)))
    groups = _model_groups(model, models.input_shape(spec))
    prunable = _prunable(groups)
    if family == "vgg19":
        assert len(prunable) == 16 and {g.kind for g in prunable} == {"channels"}
        last = _by_name(groups)["layers/15/conv"]
        assert ("fc/kernel", 0) in _members(last) and ("batch_stats/layers/15/bn/var", 0) in _members(last)
    elif family.startswith("resnet") and family != "resnet50":
        n = {"resnet20": 3, "resnet32": 5, "resnet56": 9}[family]
        assert len(prunable) == 3 + 3 * n            # a stream per stage + every block's inner width
        streams = [g for g in prunable if len([m for m in g.members if m.path.endswith("conv2/kernel")]) > 1]
        assert sorted(len([m for m in g.members if m.path.endswith("conv2/kernel") and m.axis == 3])
                      for g in streams) == [n, n, n]
    elif family == "resnet50":
        assert len(prunable) == 4 + 2 * 16 + 1       # streams, two inner widths per block, the stem
    else:
        kinds = sorted(g.kind for g in prunable)
        assert kinds.count("heads") == 2 and kinds.count("head_dim") == 4 and kinds.count("hidden") == 2
        embed = [g for g in groups if g.kind == "embed"]
        assert len(embed) == 1 and embed[0].prunable and {("class_token", 2), ("pos_embedding", 2),
                                                          ("conv_proj/kernel", 3), ("ln/scale", 0)} <= _members(embed[0])


@pytest.mark.skipif(not os.path.isdir(REFERENCE_DIR), reason="../shared/reference is not beside the repo")
def test_memberships_match_the_authors_groups():
    d = np.load(os.path.join(REFERENCE_DIR, "resnet20tiny_cifar.npz"))
    params = {m: {k: v for k, v in kv.items() if k not in ("running_mean", "running_var")}
              for m, kv in T.load_params(d, np.float32).items()}
    groups = [g for g in oba_jax.channel_groups(T.resnet20, params, jnp.ones((2, 32, 32, 3))) if g.prunable]
    ours = {frozenset(_members(g)) for g in groups}
    theirs = set()
    for key in (k for k in d.files if k.startswith("gidx/")):
        members = set()
        for line in str(d[key]).splitlines()[1:]:
            module, handler = line.split("\t")[:2]
            if module.startswith("_"):
                continue
            if d[f"kind/{module}"] == "bn":
                members |= {(f"{module}/weight", 0), (f"{module}/bias", 0)}
            elif d[f"kind/{module}"] == "linear":
                members.add((f"{module}/weight", 0))
            else:
                members.add((f"{module}/weight", 3 if handler == "prune_out_channels" else 2))
        theirs.add(frozenset(members))
    assert len(theirs) == 12 and ours == theirs
