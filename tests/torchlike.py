"""Pure-JAX replicas of the PyTorch reference networks in ../shared/reference (dicts of arrays).

Written the way a user would write a model by hand: parameters in a dict keyed by PyTorch module
name, JAX layouts (HWIO convs, (in, out) linears).
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

REFERENCE = "../shared/reference"


def load_params(d: np.lib.npyio.NpzFile, dtype=np.float64) -> dict[str, dict[str, np.ndarray]]:
    params: dict[str, dict[str, np.ndarray]] = {}
    for key in d.files:
        if key.startswith("p/"):
            _, module, name = key.split("/")
            params.setdefault(module, {})[name] = np.asarray(d[key], dtype=dtype)
    return params


def mlp(p, x):
    h = jax.nn.relu(x @ p["0"]["weight"] + p["0"]["bias"])
    h = jax.nn.relu(h @ p["2"]["weight"] + p["2"]["bias"])
    return h @ p["4"]["weight"] + p["4"]["bias"]


def _conv(x, w, stride, padding):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), [(padding, padding)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _bn_train(x, p, eps=1e-5):
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["weight"] + p["bias"]


def resnet20(p, x):
    """CIFAR ResNet-20 in train-mode BN (batch statistics, biased variance)."""
    h = jax.nn.relu(_bn_train(_conv(x, p["conv1"]["weight"], 1, 1), p["bn1"]))
    for stage in (1, 2, 3):
        for block in range(3):
            n = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            out = jax.nn.relu(_bn_train(_conv(h, p[f"{n}.conv1"]["weight"], stride, 1), p[f"{n}.bn1"]))
            out = _bn_train(_conv(out, p[f"{n}.conv2"]["weight"], 1, 1), p[f"{n}.bn2"])
            if f"{n}.downsample.0" in p:
                h = _bn_train(_conv(h, p[f"{n}.downsample.0"]["weight"], stride, 0), p[f"{n}.downsample.1"])
            h = jax.nn.relu(out + h)
    h = h.mean(axis=(1, 2))
    return h @ p["fc"]["weight"] + p["fc"]["bias"]


def _layer_norm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["weight"] + p["bias"]


def vit(p, x, heads=4, layers=2, patch=8):
    """torchvision VisionTransformer with nn.MultiheadAttention (in_proj q|k|v), exact GELU."""
    h = _conv(x, p["conv_proj"]["weight"], patch, 0) + p["conv_proj"]["bias"]
    b, gh, gw, d = h.shape
    h = h.reshape(b, gh * gw, d)
    cls = jnp.broadcast_to(p["_root"]["class_token"], (b, 1, d))
    h = jnp.concatenate([cls, h], axis=1) + p["encoder"]["pos_embedding"]
    for i in range(layers):
        n = f"encoder.layers.encoder_layer_{i}"
        a = _layer_norm(h, p[f"{n}.ln_1"])
        att = p[f"{n}.self_attention"]
        qkv = a @ att["in_proj_weight"] + att["in_proj_bias"]
        q, k, v = jnp.split(qkv, 3, axis=-1)
        split = lambda t: t.reshape(b, -1, heads, d // heads).transpose(0, 2, 1, 3)
        q, k, v = split(q), split(k), split(v)
        s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
        o = jax.nn.softmax(s, axis=-1) @ v
        o = o.transpose(0, 2, 1, 3).reshape(b, -1, d)
        o = o @ p[f"{n}.self_attention.out_proj"]["weight"] + p[f"{n}.self_attention.out_proj"]["bias"]
        h = h + o
        m = _layer_norm(h, p[f"{n}.ln_2"])
        m = jax.nn.gelu(m @ p[f"{n}.mlp.0"]["weight"] + p[f"{n}.mlp.0"]["bias"], approximate=False)
        h = h + m @ p[f"{n}.mlp.3"]["weight"] + p[f"{n}.mlp.3"]["bias"]
    h = _layer_norm(h, p["encoder.ln"])
    return h[:, 0] @ p["heads.head"]["weight"] + p["heads.head"]["bias"]


def config(d) -> dict:
    return json.loads(str(d["config"]))
