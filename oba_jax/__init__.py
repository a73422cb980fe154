"""oba-jax: Optimal Brain Apoptosis (ICLR 2025) in JAX/Flax."""
from oba_jax.graph import (ChannelGroup, Connectivity, GroupMember, Layer, MacCount, ParallelProduct, channel_groups,
                           connectivity, count_macs, count_params)
from oba_jax.losses import softmax_cross_entropy
from oba_jax.paths import leaf_paths
from oba_jax.scores import (IMPORTANCE, METHODS, LayerChannelScores, ScoreResult, Scorer, channel_scores,
                            model_apply, model_connectivity, model_scorer, score, score_model, scorer)
from oba_jax.structured import (ShrinkMismatchError, mask_model, mask_params, model_channel_groups, shrink_model,
                                shrink_params, shrink_program)
from oba_jax.unstructured import (MaskUpdater, apply_masks, mask_sparsity, masked_optimizer, progressive_masks,
                                  unstructured_masks)

__all__ = [
    "ChannelGroup", "Connectivity", "GroupMember", "IMPORTANCE", "Layer", "LayerChannelScores", "METHODS",
    "MacCount", "MaskUpdater", "ParallelProduct", "ScoreResult", "Scorer", "ShrinkMismatchError", "apply_masks", "channel_groups",
    "channel_scores", "connectivity", "count_macs", "count_params", "leaf_paths", "mask_model", "mask_params",
    "mask_sparsity", "masked_optimizer", "model_apply", "model_channel_groups", "model_connectivity",
    "model_scorer", "progressive_masks", "score", "score_model", "scorer", "shrink_model", "shrink_params", "shrink_program",
    "softmax_cross_entropy", "unstructured_masks",
]
