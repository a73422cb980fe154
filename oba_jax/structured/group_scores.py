"""Group importance from per-parameter scores (OBA_SPEC.md §4), for any importance method.

Per member layer of a group — a Conv/Dense weight whose output (with its bias) or input channels the
group is — the channel vector is the signed sum of the scores over that layer's entries of each channel,
averaged over batches, then its absolute value. Norm layers shrink with the group but contribute no
score. The group's score is the mean over its member layers whose vector is not identically zero,
divided by a normaliser.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from oba_jax.graph import ChannelGroup, GroupMember
from oba_jax.scores import ScoreResult

__all__ = ["NORMALIZERS", "group_scores"]

EPS = 1e-6
NORMALIZERS: Mapping[str, Callable[[np.ndarray], np.ndarray]] = {
    "max": lambda v: v / (v.max() + EPS),
    "mean": lambda v: v / (v.mean() + EPS),
    "sum": lambda v: v / (v.sum() + EPS),
    "none": lambda v: v,
}


def _channel_sums(scores: np.ndarray, member: GroupMember) -> np.ndarray:
    per_position = np.moveaxis(np.asarray(scores, np.float64), member.axis, 0).reshape(scores.shape[member.axis], -1)
    return per_position.sum(axis=1)[member.indices].sum(axis=1)


def group_scores(result: ScoreResult, groups: Sequence[ChannelGroup], normalizer: str = "max",
                 which: str = "mean") -> dict[str, np.ndarray]:
    """`{group name: channel scores}` for every group (`which="mean"`: batch-averaged scores).

    Paths of the groups must be those of the result (`channel_groups` with `score`, or
    `model_channel_groups` with `score_model`); a result of another model is a clear error.
    """
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; choose one of {tuple(NORMALIZERS)}")
    scores = result.by_path(which)
    out = {}
    for g in groups:
        layers: dict[tuple[str, str], np.ndarray] = {}
        for m in g.members:
            if m.role == "other":
                continue
            if m.path not in scores:
                raise ValueError(f"group {g.name!r} runs along {m.path!r}, which the score result does not have: "
                                 "the scores are of another model (score the model the groups were computed from)")
            s = scores[m.path]
            if s.ndim <= m.axis or m.indices.max() >= s.shape[m.axis]:
                raise ValueError(f"scores of {m.path!r} have shape {s.shape}, too small for group {g.name!r} "
                                 f"(axis {m.axis}): the scores are of another model")
            key = (m.layer, "in" if m.role == "in" else "out")
            layers[key] = layers.get(key, 0) + _channel_sums(s, m)
        vectors = [np.abs(v) for v in layers.values()]
        live = [v for v in vectors if np.any(v != 0)]
        score = np.mean(live, axis=0) if live else np.zeros(g.size)
        out[g.name] = NORMALIZERS[normalizer](score)
    return out
