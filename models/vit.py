"""Vision Transformer (torchvision layout) with separate q/k/v/out projections.

Attention is written with plain einsums (no fused kernel), so every projection and both
attention matmuls appear as their own equations in the jaxpr, and heads / head dims / MLP units
can be sliced per layer.
"""

from __future__ import annotations

import math
import jax
import jax.numpy as jnp
from flax import nnx

from models.layers import linear, normal_init, torch_default_kernel, uniform_init, xavier_uniform
from models.cnn import SpecModel
from models.specs import Spec, ViTSpec, spec_from_shapes

LN_EPS = 1e-6


class SelfAttention(nnx.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(score_dim)) v, then ``out`` projection.

    Paths: query, key (D -> heads*head_dim), value (D -> heads*value_dim), all with bias, and out
    (heads*value_dim -> D). ``value_dim`` and ``score_dim`` default to ``head_dim``.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, *, value_dim: int | None = None,
                 score_dim: int | None = None, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = num_heads, head_dim
        self.value_dim = head_dim if value_dim is None else value_dim
        self.score_dim = head_dim if score_dim is None else score_dim
        inner, value_inner = num_heads * head_dim, num_heads * self.value_dim
        # torchvision initialises the fused (3*inner, D) in_proj with xavier_uniform; the fused
        # fans keep the separate q/k/v projections on the same distribution.
        qkv_init = uniform_init(math.sqrt(6.0 / (dim + 3 * inner)))
        zeros = jax.nn.initializers.zeros
        self.query = nnx.Linear(dim, inner, kernel_init=qkv_init, bias_init=zeros, rngs=rngs)
        self.key = nnx.Linear(dim, inner, kernel_init=qkv_init, bias_init=zeros, rngs=rngs)
        self.value = nnx.Linear(dim, value_inner, kernel_init=qkv_init, bias_init=zeros, rngs=rngs)
        self.out = nnx.Linear(value_inner, dim, kernel_init=torch_default_kernel, bias_init=zeros, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        heads = lambda t, d: t.reshape(b, n, self.num_heads, d)  # noqa: E731
        q, k = heads(self.query(x), self.head_dim), heads(self.key(x), self.head_dim)
        v = heads(self.value(x), self.value_dim)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.score_dim)
        weights = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        return self.out(y.reshape(b, n, self.num_heads * self.value_dim))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + attention(ln_1(x)); x + mlp_out(gelu(mlp_in(ln_2(x))))."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_dim: int, *, value_dim: int | None = None,
                 score_dim: int | None = None, rngs: nnx.Rngs):
        self.ln_1 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
        self.attention = SelfAttention(dim, num_heads, head_dim, value_dim=value_dim, score_dim=score_dim, rngs=rngs)
        self.ln_2 = nnx.LayerNorm(dim, epsilon=LN_EPS, rngs=rngs)
        mlp_kernel, mlp_bias = xavier_uniform, normal_init(1e-6)  # torchvision MLPBlock init
        self.mlp_in = nnx.Linear(dim, mlp_dim, kernel_init=mlp_kernel, bias_init=mlp_bias, rngs=rngs)
        self.mlp_out = nnx.Linear(mlp_dim, dim, kernel_init=mlp_kernel, bias_init=mlp_bias, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.ln_2(x)), approximate=False))


class ViT(SpecModel):
    """Patch conv -> tokens -> [class token] + pos_embedding -> encoder layers -> LN -> head.

    Paths: conv_proj, class_token (1, 1, D), pos_embedding (1, 1+N, D), layers/i/{ln_1,
    attention/{query,key,value,out}, ln_2, mlp_in, mlp_out}, ln, head.
    """

    def __init__(self, spec: ViTSpec, *, rngs: nnx.Rngs):
        self.spec = spec
        d, p = spec.hidden_dim, spec.patch_size
        fan_in = spec.in_channels * p * p
        self.conv_proj = nnx.Conv(
            spec.in_channels, d, (p, p), (p, p), padding="VALID",
            # torchvision: trunc_normal_(std=sqrt(1/fan_in)) truncates at +-2 absolute, i.e. never.
            kernel_init=normal_init(math.sqrt(1.0 / fan_in)), rngs=rngs)
        self.class_token = nnx.Param(jnp.zeros((1, 1, d)))
        self.pos_embedding = nnx.Param(normal_init(0.02)(rngs.params(), (1, 1 + spec.num_patches, d)))
        self.layers = nnx.List([
            EncoderLayer(d, h, hd, m, value_dim=vd, score_dim=sd, rngs=rngs)
            for h, hd, m, vd, sd in zip(spec.num_heads, spec.head_dim, spec.mlp_dim, spec.value_dims, spec.score_dims)])
        self.ln = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        # torchvision zero-initialises the head; a zero head would make every upstream gradient
        # (and hence every OBA score) exactly zero at initialisation, so use the Linear default.
        self.head = linear(d, spec.num_classes, rngs=rngs)

    def spec_from_shapes(self, shapes) -> Spec:
        return spec_from_shapes(self.spec, shapes, num_heads=[layer.attention.num_heads for layer in self.layers])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_proj(x)
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])  # row-major over (h, w), as torchvision's flatten
        cls = jnp.broadcast_to(self.class_token[...], (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...]
        for layer in self.layers:
            x = layer(x)
        return self.head(self.ln(x)[:, 0])
