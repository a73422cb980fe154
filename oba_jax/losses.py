"""Cross-entropy, the one loss oba-jax trains and scores with."""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["softmax_cross_entropy"]


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Batch-mean cross-entropy of integer labels (the loss the authors score with)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))
