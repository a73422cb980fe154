"""Layer 3: importance scores as pytrees like params — OBA and baselines, compile-once scorers."""
from oba_jax.scores.channels import LayerChannelScores, channel_scores, layer_channel_sums
from oba_jax.scores.importance import IMPORTANCE, METHODS, Method, get_method
from oba_jax.scores.nnx import BN_MODES, model_apply, model_connectivity, model_scorer, score_model
from oba_jax.scores.scoring import ScoreResult, Scorer, score, scorer

__all__ = ["BN_MODES", "IMPORTANCE", "METHODS", "LayerChannelScores", "Method", "ScoreResult", "Scorer",
           "channel_scores", "get_method", "layer_channel_sums", "model_apply", "model_connectivity", "model_scorer", "score",
           "score_model", "scorer"]
