"""oba-jax: Optimal Brain Apoptosis (ICLR 2025) in JAX/Flax.

The public names below are imported on first use (PEP 562), so that importing a light submodule (the streaming
input's worker processes import `oba_jax.experiment.streaming`) does not import JAX and Flax."""

import importlib

# public name -> the subpackage that defines it
_EXPORTS = {
    **dict.fromkeys(("ChannelGroup", "Connectivity", "GroupMember", "Layer", "MacCount", "ParallelProduct",
                     "channel_groups", "connectivity", "count_macs", "count_params"), "oba_jax.graph"),
    "softmax_cross_entropy": "oba_jax.losses",
    "leaf_paths": "oba_jax.paths",
    **dict.fromkeys(("IMPORTANCE", "METHODS", "LayerChannelScores", "ScoreResult", "Scorer", "channel_scores",
                     "model_apply", "model_connectivity", "model_scorer", "score", "score_model", "scorer"),
                    "oba_jax.scores"),
    **dict.fromkeys(("ShrinkMismatchError", "mask_model", "mask_params", "model_channel_groups", "shrink_model",
                     "shrink_params", "shrink_program"), "oba_jax.structured"),
    **dict.fromkeys(("MaskUpdater", "apply_masks", "mask_sparsity", "masked_optimizer", "progressive_masks",
                     "unstructured_masks"), "oba_jax.unstructured"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value   # looked up once
        return value
    raise AttributeError(f"module 'oba_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
