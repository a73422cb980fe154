"""oba-jax: Optimal Brain Apoptosis (ICLR 2025) in JAX/Flax."""
from oba_jax.graph import (ChannelGroup, Connectivity, GroupMember, Layer, MacCount, ParallelProduct, channel_groups,
                           connectivity, count_macs, count_params)
from oba_jax.losses import softmax_cross_entropy
from oba_jax.paths import leaf_paths
from oba_jax.scores import (IMPORTANCE, METHODS, LayerChannelScores, ScoreResult, Scorer, channel_scores,
                            model_apply, model_connectivity, score, score_model, scorer)
from oba_jax.structured import model_channel_groups

__all__ = [
    "IMPORTANCE", "METHODS", "ChannelGroup", "Connectivity", "GroupMember", "Layer", "LayerChannelScores", "ParallelProduct", "ScoreResult",
    "MacCount", "Scorer", "channel_groups", "channel_scores", "connectivity", "count_macs", "count_params", "leaf_paths", "model_apply", "model_channel_groups", "model_connectivity", "score",
    "score_model", "scorer", "softmax_cross_entropy",
]
