"""oba-jax: Optimal Brain Apoptosis (ICLR 2025) in JAX/Flax."""
from oba_jax.channels import LayerChannelScores, channel_scores
from oba_jax.graph import Connectivity, Layer, ParallelProduct, connectivity
from oba_jax.hessian import METHODS, ScoreResult, score, softmax_cross_entropy
from oba_jax.nnx_scores import model_apply, model_connectivity, score_model

__all__ = [
    "METHODS", "Connectivity", "Layer", "LayerChannelScores", "ParallelProduct", "ScoreResult",
    "channel_scores", "connectivity", "model_apply", "model_connectivity", "score", "score_model",
    "softmax_cross_entropy",
]
