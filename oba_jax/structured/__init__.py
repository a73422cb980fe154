"""Layer 4: structured pruning — plans (kept channels per group), smaller models, masks."""
from oba_jax.structured.nnx import model_channel_groups

__all__ = ["model_channel_groups"]
