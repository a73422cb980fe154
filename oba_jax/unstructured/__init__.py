"""Layer 4: unstructured and N:M pruning — masks from scores, the progressive schedule, masked training."""
from oba_jax.unstructured.masked_training import MaskedState, MaskUpdater, masked_optimizer
from oba_jax.unstructured.masks import (MASK_FORMS, apply_masks, check_masks, global_masks, importance_of, mask_sparsity, masks_like,
                                        n_m_masks, scored_leaves, unstructured_masks)
from oba_jax.unstructured.schedule import Schedule, keep_fractions, progressive_masks

__all__ = ["MASK_FORMS", "MaskUpdater", "MaskedState", "Schedule", "apply_masks", "check_masks", "global_masks", "importance_of",
           "keep_fractions", "mask_sparsity", "masked_optimizer", "masks_like", "n_m_masks", "progressive_masks",
           "scored_leaves", "unstructured_masks"]
