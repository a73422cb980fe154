"""Layer 4: structured pruning — group scores, plans (kept channels per group), smaller models, masks."""
from oba_jax.structured.group_scores import NORMALIZERS, group_scores
from oba_jax.structured.nnx import mask_model, model_channel_groups, model_group_graph, shrink_model
from oba_jax.structured.program import shrink_program
from oba_jax.structured.shrink import ShrinkMismatchError, mask_params, shrink_params

__all__ = ["NORMALIZERS", "ShrinkMismatchError", "group_scores", "mask_model", "mask_params", "model_channel_groups", "model_group_graph",
           "shrink_model", "shrink_params", "shrink_program"]
