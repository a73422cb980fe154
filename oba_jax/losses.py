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


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of integer labels over every label (the loss the authors score with; for a
    language model the mean token cross-entropy).

    `weights` (the labels' shape, ≥ 0, e.g. a 0/1 padding mask): the weighted mean `Σ w·nll / Σ w`.
    A label whose weight is 0 is never read (it may be a padding value such as -100).
    """
    if weights is None:
        return jnp.mean(cross_entropy(logits, labels))
    used = weights > 0
    nll = cross_entropy(logits, jnp.where(used, labels, 0))
    w = weights.astype(nll.dtype)
    return jnp.sum(jnp.where(used, w * nll, 0.0)) / jnp.sum(w)
