"""User-style networks the tests share: plain NNX modules and pure functions over dicts of arrays,
written the way users write them (no test module imports another)."""
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import nnx


# Test data comes from numpy: on XLA:CPU compiling jax.random's samplers costs seconds per shape.
def dense_params(rng, n_in, n_out):
    return {"kernel": jnp.asarray(rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)),
            "bias": jnp.asarray(0.1 * rng.normal(size=(n_out,)))}


def mlp_params(sizes=(6, 5, 4, 3), seed=0):
    rng = np.random.default_rng(seed)
    return {f"l{i}": dense_params(rng, a, b) for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


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
    return {"gate": dense_params(rng, d, hidden), "up": dense_params(rng, d, hidden), "down": dense_params(rng, hidden, classes)}


def gated_apply(p, x):
    h = jax.nn.silu(x @ p["gate"]["kernel"] + p["gate"]["bias"]) * (x @ p["up"]["kernel"] + p["up"]["bias"])
    return h @ p["down"]["kernel"] + p["down"]["bias"]



class SmallVGG(nnx.Module):
    """conv-BN-ReLU-maxpool, conv(+bias)-ReLU-maxpool, conv-BN-ReLU, global mean, dense: a chain with every
    kind of equation a CIFAR VGG has, and a bias that BatchNorm does not cancel."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(4, rngs=rngs)
        self.c2 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
        self.c3 = nnx.Conv(6, 6, (3, 3), use_bias=False, rngs=rngs)
        self.bn3 = nnx.BatchNorm(6, rngs=rngs)
        self.fc = nnx.Linear(6, 5, rngs=rngs)

    def __call__(self, x):
        h = nnx.max_pool(nnx.relu(self.bn1(self.c1(x))), (2, 2), (2, 2))
        h = nnx.max_pool(nnx.relu(self.c2(h)), (2, 2), (2, 2))
        h = nnx.relu(self.bn3(self.c3(h)))
        return self.fc(h.mean(axis=(1, 2)))


def causal_lm_params(seed=0, vocab=7, d=8, q_heads=4, kv_heads=2, head_dim=2, hidden=6):
    """A one-block decoder: token embedding, RMSNorm, GQA attention (2 query heads per key/value head) with
    RoPE, SwiGLU MLP, RMSNorm, untied vocabulary head. Plain-function parameters (float64 under x64)."""
    rng = np.random.default_rng(seed)
    w = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[0]))
    return {"embed": jnp.asarray(rng.normal(size=(vocab, d))),
            "norm1": {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=d))},
            "q": {"kernel": w(d, q_heads, head_dim)}, "k": {"kernel": w(d, kv_heads, head_dim)},
            "v": {"kernel": w(d, kv_heads, head_dim)}, "o": {"kernel": w(q_heads, head_dim, d)},
            "norm2": {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=d))},
            "gate": {"kernel": w(d, hidden)}, "up": {"kernel": w(d, hidden)}, "down": {"kernel": w(hidden, d)},
            "norm_f": {"scale": jnp.asarray(1 + 0.1 * rng.normal(size=d))},
            "lm_head": {"kernel": w(d, vocab), "bias": jnp.asarray(0.1 * rng.normal(size=vocab))}}


def causal_lm_apply(p, ids, lin=lambda f, u: f(u)):
    """Logits `(batch, tokens, vocab)`; `lin(f, u)` wraps every nonlinearity (the oracle linearises them)."""
    def rms(h, scale):
        return lin(lambda u: u * jax.lax.rsqrt((u * u).mean(-1, keepdims=True) + 1e-6), h) * scale

    def rope(t):                      # (batch, tokens, heads, head_dim), pairs (2i, 2i+1) rotated
        n, hd = t.shape[1], t.shape[-1]
        freq = 1.0 / (100.0 ** (np.arange(0, hd, 2) / hd))
        angle = np.arange(n)[:, None] * freq[None, :]
        cos, sin = np.repeat(np.cos(angle), 2, -1)[None, :, None, :], np.repeat(np.sin(angle), 2, -1)[None, :, None, :]
        pairs = t.reshape(*t.shape[:-1], hd // 2, 2)
        rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(t.shape)
        return t * cos + rotated * sin

    x = jnp.take(p["embed"], ids, axis=0)
    a = rms(x, p["norm1"]["scale"])
    q = rope(jnp.einsum("btd,dhe->bthe", a, p["q"]["kernel"]))
    k = rope(jnp.einsum("btd,dhe->bthe", a, p["k"]["kernel"]))
    v = jnp.einsum("btd,dhe->bthe", a, p["v"]["kernel"])
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    s = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(q.shape[-1])
    n = ids.shape[1]
    s = jnp.where(np.tril(np.ones((n, n), bool)), s, -1e9)
    att = lin(lambda u: jax.nn.softmax(u, axis=-1), s)
    h = x + jnp.einsum("bhqk,bkhe,hed->bqd", att, v, p["o"]["kernel"])
    m = rms(h, p["norm2"]["scale"])
    gate = lin(jax.nn.silu, m @ p["gate"]["kernel"])
    h = h + (gate * (m @ p["up"]["kernel"])) @ p["down"]["kernel"]
    return rms(h, p["norm_f"]["scale"]) @ p["lm_head"]["kernel"] + p["lm_head"]["bias"]


def width_scaled_attention_params(seed=8, dtype=None):
    """`(params, inputs (2, 6, 5))` of `width_scaled_attention`: model width 5, head dim 4, 3 classes."""
    rng = np.random.default_rng(seed)
    params = {n: {"kernel": jnp.asarray(rng.normal(size=s), dtype)}
              for n, s in (("q", (5, 4)), ("k", (5, 4)), ("v", (5, 4)), ("head", (4, 3)))}
    return params, jnp.asarray(rng.normal(size=(2, 6, 5)), dtype)


def width_scaled_attention(p, x):
    """One-head attention whose scale 1/sqrt(head_dim) is computed from the width at trace time, as most
    model code does; `p`: q, k, v (d, head_dim) and head (head_dim, classes) kernels."""
    q, k, v = (x @ p[n]["kernel"] for n in ("q", "k", "v"))          # (batch, tokens, head_dim)
    att = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]), axis=-1)
    return (att @ v).mean(1) @ p["head"]["kernel"]


class LinenNet(nn.Module):
    """Convs, a max-pool, a flatten into tokens, LayerNorm, Flax's multi-head attention (which takes its
    scale from the head dim), dense layers: what a user writes with flax.linen."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(6, (3, 3))(x))
        b, h, w, c = x.shape
        t = x.reshape(b, h * w, c)
        norm = nn.LayerNorm(use_fast_variance=False)        # centres, then squares
        t = t + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(norm(t))
        return nn.Dense(3)(nn.gelu(nn.Dense(5)(t.mean(1))))


# A fresh process that runs a serialised `jax.export` on saved leaves and inputs, importing neither oba_jax
# nor the model code: argv = inputs.npz (n, p0.., x), model.stablehlo, out.npy
EXPORTED_RUN = """
import sys, numpy as np, jax
jax.config.update("jax_enable_x64", True)
from jax import export
data = np.load(sys.argv[1], allow_pickle=False)
exported = export.deserialize(bytearray(open(sys.argv[2], "rb").read()))
leaves = [data[f"p{i}"] for i in range(int(data["n"]))]
args, kwargs = jax.tree_util.tree_unflatten(exported.in_tree, leaves + [data["x"]])
out = exported.call(*args, **kwargs)
np.save(sys.argv[3], np.asarray(out))
"""
