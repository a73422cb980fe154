"""Tests for the models package: shapes, training, spec round-trips, parameter counts, BN modes."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models
from models import build_model, input_shape, make_spec, spec_from_dict, spec_to_dict

REFERENCE_VIT = "/work/shared/reference/vit_small.npz"

# Small, non-uniform ("pruned-looking") instances of every family: cheap on a 2-core CPU.
SMALL_SPECS = {
    "mlp": make_spec("mlp", image_shape=(8, 8, 1), hidden=(16, 7), num_classes=5),
    "vgg": make_spec("vgg", cfg=(8, "M", 12, 5, "M", 9), image_size=8, num_classes=5),
    "resnet_cifar": make_spec("resnet_cifar", stage_widths=(8, 12, 16), blocks_per_stage=(1, 2, 1),
                              block_widths=((5,), (7, 12), (3,)), image_size=8, num_classes=5),
    "resnet50": make_spec("resnet50", stem_width=8, stage_widths=(16, 24, 32, 40),
                          blocks_per_stage=(1, 1, 1, 1),  # identity blocks: see default counts
                          block_widths=(((4, 6),), ((8, 3),), ((6, 5),), ((9, 4),)),
                          image_size=32, num_classes=5),
    "vit": make_spec("vit", image_size=16, patch_size=4, hidden_dim=16, num_layers=2,
                     num_heads=(2, 1), head_dim=(4, 6), mlp_dim=(16, 9), num_classes=5),
}

# Default-size specs; their forward is only traced abstractly (jax.eval_shape) when large.
DEFAULT_SPECS = {
    "mlp": make_spec("mlp"),
    "vgg": make_spec("vgg", cfg_name="vgg19"),
    "resnet_cifar": make_spec("resnet_cifar", depth=32, width_multiplier=4, num_classes=100),
    "resnet50": make_spec("resnet50"),
    "vit": make_spec("vit", config_name="vit_b16"),
}


def _images(spec, batch: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, *input_shape(spec)), jnp.float32)


def _num_params(spec) -> int:
    abstract = nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_families_complete():
    assert set(models.FAMILIES) == set(SMALL_SPECS) == set(DEFAULT_SPECS)


@nnx.jit
def _forward(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x)


@pytest.mark.parametrize("family", sorted(DEFAULT_SPECS))
def test_default_forward_shape(family):
    spec = DEFAULT_SPECS[family]

    def forward(train: bool):
        model = build_model(spec, rngs=nnx.Rngs(0))
        if not train:
            model.eval()
        return model(jnp.zeros((2, *input_shape(spec))))

    for train in (True, False):
        out = jax.eval_shape(lambda: forward(train))
        assert out.shape == (2, spec.num_classes)


def test_default_forward_runs_mlp():
    spec = make_spec("mlp")
    model = build_model(spec, rngs=nnx.Rngs(1))
    assert _forward(model, _images(spec, 2)).shape == (2, 10)


@pytest.mark.parametrize("family", sorted(SMALL_SPECS))
def test_small_forward_and_sgd_reduces_loss(family):
    """Train-mode forward inside a jitted SGD step (loss must fall), then an eval-mode forward."""
    spec = SMALL_SPECS[family]
    model = build_model(spec, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.05, momentum=0.9), wrt=nnx.Param)
    x = _images(spec, 8, seed=1)
    y = jax.random.randint(jax.random.key(2), (8,), 0, spec.num_classes)

    def loss_fn(m):
        logits = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

    @nnx.jit
    def step(m, opt):
        (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(m)
        opt.update(m, grads)
        return loss, logits

    losses = []
    for _ in range(6):
        loss, logits = step(model, optimizer)
        assert logits.shape == (8, spec.num_classes) and logits.dtype == jnp.float32
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0], losses
    model.eval()
    out = _forward(model, x[:3])
    assert out.shape == (3, spec.num_classes) and bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize("spec", list(SMALL_SPECS.values()) + list(DEFAULT_SPECS.values()) + [
    make_spec("vgg", cfg_name="vgg16", num_classes=100),
    make_spec("resnet_cifar", depth=20),
    make_spec("vit", config_name="vit_small_cifar"),
    make_spec("vit", config_name="vit_tiny_test"),
], ids=lambda s: s.family)
def test_spec_json_round_trip(spec):
    d = json.loads(json.dumps(spec_to_dict(spec)))
    assert d["family"] == spec.family
    again = spec_from_dict(d)
    assert again == spec and type(again) is type(spec)
    assert hash(again) == hash(spec)


def test_parameter_counts():
    assert _num_params(make_spec("resnet50")) == 25_557_032  # torchvision resnet50
    assert _num_params(make_spec("vit", config_name="vit_b16")) == 86_567_656  # torchvision vit_b_16
    # CIFAR VGG19-BN, 10 classes, bias-free convs: 20,018,880 conv + 11,008 BN + 5,130 fc.
    # (20,040,522 = this + 5,504, i.e. the count when every conv also has a bias.)
    assert _num_params(make_spec("vgg", cfg_name="vgg19")) == 20_035_018
    # ResNet-20 (16/32/64, option-B shortcuts): 0.27M-class network.
    assert _num_params(make_spec("resnet_cifar", depth=20)) == 272_474


def test_named_configs():
    vgg19 = make_spec("vgg", cfg_name="vgg19").cfg
    assert vgg19[-1] == 512 and vgg19.count("M") == 4 and sum(v != "M" for v in vgg19) == 16
    r32 = make_spec("resnet_cifar", depth=32, width_multiplier=4)
    assert r32.stage_widths == (64, 128, 256) and r32.blocks_per_stage == (5, 5, 5)
    tiny = make_spec("vit", config_name="vit_tiny_test")
    assert (tiny.image_size, tiny.patch_size, tiny.num_layers, tiny.hidden_dim) == (32, 8, 2, 64)
    assert tiny.num_heads == (4, 4) and tiny.head_dim == (16, 16) and tiny.mlp_dim == (128, 128)
    assert input_shape(make_spec("mlp")) == (28, 28, 1)
    assert input_shape(make_spec("resnet50")) == (224, 224, 3)


def test_param_paths_are_per_layer():
    model = build_model(SMALL_SPECS["resnet_cifar"], rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    paths = {"/".join(map(str, k)) for k, _ in nnx.to_flat_state(params)}
    assert {"conv1/kernel", "bn1/scale", "fc/kernel", "fc/bias", "stages/1/blocks/1/conv1/kernel",
            "stages/1/blocks/0/downsample/conv/kernel", "stages/1/blocks/0/downsample/bn/bias"} <= paths
    assert not any(p.startswith("stages/0/blocks/0/downsample") for p in paths)  # identity shortcut
    assert model.stages[1].blocks[1].conv1.kernel.shape == (3, 3, 12, 12)
    assert model.stages[2].blocks[0].conv1.kernel.shape == (3, 3, 12, 3)


def test_batch_norm_stats_update_only_in_train_mode():
    spec = SMALL_SPECS["vgg"]
    model = build_model(spec, rngs=nnx.Rngs(0))
    x = _images(spec, 4) * 3.0 + 1.0
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    _forward(model, x)
    after_train = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.allclose(a, b), before, after_train))
    assert all(changed)
    # momentum 0.9: running_mean = 0.9 * 0 + 0.1 * batch_mean for the stem BN.
    h = model.layers[0].conv(x)
    np.testing.assert_allclose(model.layers[0].bn.mean[...], 0.1 * np.asarray(h.mean(axis=(0, 1, 2))),
                               rtol=1e-4, atol=1e-6)
    model.eval()
    _forward(model, x)
    after_eval = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, after_train, after_eval)
    model.train()
    assert model.layers[0].bn.use_running_average is False


@pytest.mark.parametrize("family, fields, bad_field", [
    ("mlp", dict(hidden=(16, 0)), "hidden"),
    ("mlp", dict(in_features=10), "in_features"),
    ("vgg", dict(cfg=(8, "X", 8)), "cfg"),
    ("vgg", dict(cfg_name="vgg7"), "cfg_name"),
    ("vgg", dict(num_classes=0), "num_classes"),
    ("resnet_cifar", dict(depth=21), "depth"),
    ("resnet_cifar", dict(stage_widths=(8, 8, 8), blocks_per_stage=(1, 1, 1),
                          block_widths=((8,), (8, 8), (8,))), "block_widths[1]"),
    ("resnet_cifar", dict(stage_widths=(8, -1, 8)), "stage_widths"),
    ("resnet50", dict(blocks_per_stage=(3, 4, 6)), "blocks_per_stage"),
    ("resnet50", dict(stem_width=0), "stem_width"),
    ("vit", dict(config_name="vit_tiny_test", patch_size=5), "image_size"),
    ("vit", dict(config_name="vit_tiny_test", mlp_dim=(128,)), "mlp_dim"),
    ("vit", dict(config_name="vit_tiny_test", head_dim=(16, 0)), "head_dim"),
    ("vit", dict(config_name="vit_b17"), "config_name"),
    ("vit", dict(config_name="vit_tiny_test", widht=3), "widht"),
])
def test_bad_specs_raise(family, fields, bad_field):
    with pytest.raises(ValueError, match=bad_field.replace("[", r"\[").replace("]", r"\]")):
        make_spec(family, **fields)


def test_spec_from_dict_errors():
    with pytest.raises(ValueError, match="family"):
        spec_from_dict({"hidden": [3]})
    with pytest.raises(ValueError, match="family"):
        spec_from_dict({"family": "lenet"})
    d = spec_to_dict(make_spec("mlp"))
    d["depth"] = 3
    with pytest.raises(ValueError, match="depth"):
        spec_from_dict(d)
    with pytest.raises(ValueError, match="family"):
        make_spec("lenet")


@pytest.mark.skipif(not os.path.exists(REFERENCE_VIT), reason="reference fixture not available")
def test_vit_matches_torchvision_reference():
    """Loads the torchvision-layout fixture (fused in_proj split into q/k/v) and compares logits."""
    ref = np.load(REFERENCE_VIT)
    model = build_model(make_spec("vit", config_name="vit_tiny_test"), rngs=nnx.Rngs(0))
    d = 64
    model.conv_proj.kernel[...] = ref["p/conv_proj/weight"]
    model.conv_proj.bias[...] = ref["p/conv_proj/bias"]
    model.class_token[...] = ref["p/_root/class_token"]
    model.pos_embedding[...] = ref["p/encoder/pos_embedding"]
    for i, layer in enumerate(model.layers):
        pre = f"p/encoder.layers.encoder_layer_{i}."
        for ln in ("ln_1", "ln_2"):
            getattr(layer, ln).scale[...] = ref[pre + ln + "/weight"]
            getattr(layer, ln).bias[...] = ref[pre + ln + "/bias"]
        w, b = ref[pre + "self_attention/in_proj_weight"], ref[pre + "self_attention/in_proj_bias"]
        for j, name in enumerate(("query", "key", "value")):
            getattr(layer.attention, name).kernel[...] = w[:, j * d:(j + 1) * d]
            getattr(layer.attention, name).bias[...] = b[j * d:(j + 1) * d]
        layer.attention.out.kernel[...] = ref[pre + "self_attention.out_proj/weight"]
        layer.attention.out.bias[...] = ref[pre + "self_attention.out_proj/bias"]
        layer.mlp_in.kernel[...] = ref[pre + "mlp.0/weight"]
        layer.mlp_in.bias[...] = ref[pre + "mlp.0/bias"]
        layer.mlp_out.kernel[...] = ref[pre + "mlp.3/weight"]
        layer.mlp_out.bias[...] = ref[pre + "mlp.3/bias"]
    model.ln.scale[...] = ref["p/encoder.ln/weight"]
    model.ln.bias[...] = ref["p/encoder.ln/bias"]
    model.head.kernel[...] = ref["p/heads.head/weight"]
    model.head.bias[...] = ref["p/heads.head/bias"]
    with jax.default_matmul_precision("highest"):
        logits = _forward(model, jnp.asarray(ref["input"]))
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=1e-4, atol=1e-4)
