"""Layer 4: structured pruning — plans (kept channels per group), smaller models, masks."""
from oba_jax.structured.nnx import mask_model, model_channel_groups, shrink_model
from oba_jax.structured.shrink import mask_params, shrink_params

__all__ = ["mask_model", "mask_params", "model_channel_groups", "shrink_model", "shrink_params"]
