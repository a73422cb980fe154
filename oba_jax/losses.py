"""Cross-entropy: the one loss oba-jax trains and scores with."""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cross_entropy", "softmax_cross_entropy"]


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy of integer labels; `label_smoothing` s as PyTorch's: the target is
    `(1 − s)·onehot + s/C`, i.e. `(1 − s)·nll − s·mean(log p)`."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    return nll


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Batch-mean cross-entropy of integer labels (the loss the authors score with)."""
    return jnp.mean(cross_entropy(logits, labels))
