"""The authors' progressive unstructured schedule (OBA_SPEC.md §6).

Step k of `steps` (default 49) keeps the fraction `keep_ratio^((k+1)/steps)` of the scored entries. Every
step scores the *masked* model (pruned entries zero, the shapes never change, so one compiled scorer
serves all steps), adds the signed scores to a running sum with a count, and selects under one global
threshold from `u = normalize_max(|Σ s| / count) + |w|`. Masks are nested: an entry pruned at one step
stays pruned (its weight is zero, so its score stops growing; letting it back would keep a zero weight).

`report_ratios` (e.g. 0.9, 0.8, …): when a step passes one, the masks at exactly that ratio are taken
from the same importance within the previous step's kept entries, so accuracy can be reported at the
paper's keep ratios without changing the schedule.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from oba_jax.graph import Connectivity
from oba_jax.unstructured.masks import apply_masks, check_keep_ratio, global_masks, importance_of, masks_like

__all__ = ["Schedule", "keep_fractions", "progressive_masks"]

ScoreFn = Callable[[Any], Any]    # params -> ScoreResult of those params


def keep_fractions(keep_ratio: float, steps: int) -> list[float]:
    """`keep_ratio^((k+1)/steps)` for k = 0 … steps − 1 (the last is `keep_ratio`)."""
    keep_ratio = check_keep_ratio(keep_ratio)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return [keep_ratio ** ((k + 1) / steps) for k in range(steps)]


@dataclasses.dataclass
class Schedule:
    """What `progressive_masks` returns: the final masks, the masks at each report ratio, one record per step."""

    masks: Any
    reported: dict[float, Any]
    history: list[dict]


def _add(a: Any, b: Any) -> Any:
    return jax.tree_util.tree_map(jnp.add, a, b)


def progressive_masks(score_fn: ScoreFn, params: Any, keep_ratio: float, *, graph: Connectivity, steps: int = 49,
                      exclude: Sequence[str] = (), report_ratios: Sequence[float] = (),
                      on_step: Callable[[dict], None] | None = None, form: str | None = None) -> Schedule:
    """The progressive schedule down to `keep_ratio` (see the module docstring).

    `score_fn(masked params) -> ScoreResult` is called once per step (build one `oba_jax.scorer` and
    close over its batches, so every step runs the same compiled program). `form`: how the accumulated
    scores become importance (`importance_of`; None: the method's standard form).
    """
    fractions = keep_fractions(keep_ratio, steps)
    for r in report_ratios:
        check_keep_ratio(r)
    pending = sorted((float(r) for r in report_ratios if r >= keep_ratio), reverse=True)
    masks = masks_like(params, {})
    total, allowed, reported, history = None, None, {}, []
    for k, fraction in enumerate(fractions):
        masked = apply_masks(params, masks)
        result = score_fn(masked)
        total = result if total is None else dataclasses.replace(
            total, sum=_add(total.sum, result.sum), count=total.count + result.count, parts=None)
        importance = importance_of(total, masked, graph=graph, exclude=exclude, form=form)
        previous = allowed
        while pending and pending[0] >= fraction:
            r = pending.pop(0)
            reported[r] = masks_like(params, global_masks(importance, r, previous))
        allowed = global_masks(importance, fraction, previous)
        masks = masks_like(params, allowed)
        kept = sum(int(jnp.sum(v)) for v in allowed.values())
        size = sum(int(v.size) for v in allowed.values())
        record = {"step": k + 1, "target_keep_ratio": fraction, "keep_ratio": kept / size, "scored_batches": total.count}
        history.append(record)
        if on_step is not None:
            on_step(record)
    return Schedule(masks=masks, reported=reported, history=history)
