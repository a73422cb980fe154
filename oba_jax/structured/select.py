"""Which channels to keep: global or local selection from group scores (OBA_SPEC.md §4.5), and the
step schedule that prunes to a target ops ratio (§5), compiled-once scoring left to the caller."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from oba_jax.graph import KINDS, ChannelGroup, GroupGraph

__all__ = ["OutOfReachError", "Selection", "prune_to_ops", "select_channels", "step_ratios"]


class OutOfReachError(ValueError):
    """No plan the selection allows reaches the target ops ratio (every group at its floor is above it)."""


Plan = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Selection:
    """How channels are chosen.

    `global_pruning`: one threshold over all selectable groups' normalised scores (else each group
    prunes the same fraction); `max_pruning_ratio`: a group is not touched once it is down to this
    fraction removed (at least one channel always stays); `round_to`: kept counts are multiples of it
    (or the whole group); `kinds`: which kinds of groups may shrink (the authors prune channels and
    MLP hidden units)."""

    global_pruning: bool = True
    max_pruning_ratio: float = 0.95
    round_to: int = 1
    kinds: tuple[str, ...] = ("channels", "hidden")

    def __post_init__(self) -> None:
        if not 0 < self.max_pruning_ratio < 1:
            raise ValueError(f"max_pruning_ratio must lie in (0, 1), got {self.max_pruning_ratio}")
        if int(self.round_to) != self.round_to or self.round_to < 1:
            raise ValueError(f"round_to must be a positive int, got {self.round_to}")
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")

    def selectable(self, groups: Sequence[ChannelGroup]) -> list[ChannelGroup]:
        chosen = [g for g in groups if g.prunable and g.kind in self.kinds]
        if not chosen:
            kinds = sorted({g.kind for g in groups if g.prunable})
            raise ValueError(f"nothing to prune: no prunable group of the kinds {self.kinds} (prunable kinds here: "
                             f"{kinds or 'none'}; not prunable: "
                             f"{sorted({g.reason for g in groups if not g.prunable})[:3]})")
        return chosen

    def floor(self, group: ChannelGroup) -> int:
        """The fewest channels the group may keep."""
        keep = max(1, math.ceil(group.size * (1 - self.max_pruning_ratio) - 1e-9))
        return min(group.size, self._round(keep, group.size))

    def _round(self, n: int, size: int) -> int:
        return min(size, int(math.ceil(n / self.round_to)) * self.round_to)


def select_channels(groups: Sequence[ChannelGroup], scores: Mapping[str, np.ndarray], alive: Mapping[str, np.ndarray],
                    ratio: float, selection: Selection) -> Plan:
    """The channels to keep when a fraction `ratio` of the selectable groups' initial channels is gone.

    Only `alive` channels (the ones kept so far) can be kept; the lowest scores go first."""
    chosen = selection.selectable(groups)
    by_name = {g.name: g for g in chosen}
    alive = {g.name: np.asarray(alive.get(g.name, np.arange(g.size))) for g in chosen}
    if selection.global_pruning:
        total = sum(g.size for g in chosen)
        remove = sum(len(a) for a in alive.values()) - math.ceil(total * (1 - ratio) - 1e-9)
        order = sorted(((float(scores[name][i]), k, int(i)) for k, (name, idx) in enumerate(alive.items()) for i in idx))
        counts = {name: len(idx) for name, idx in alive.items()}
        dropped: dict[str, set[int]] = {name: set() for name in alive}
        names = list(alive)
        for _, k, i in order:
            if remove <= 0:
                break
            name = names[k]
            if counts[name] > selection.floor(by_name[name]):
                dropped[name].add(i)
                counts[name] -= 1
                remove -= 1
        keep_n = {name: counts[name] for name in alive}
    else:
        keep_n = {name: max(selection.floor(by_name[name]), min(len(idx), math.ceil(by_name[name].size * (1 - ratio) - 1e-9)))
                  for name, idx in alive.items()}
    plan = {}
    for name, idx in alive.items():
        n = min(len(idx), selection._round(keep_n[name], by_name[name].size))
        best = idx[np.argsort(-np.asarray(scores[name])[idx], kind="stable")[:n]]
        plan[name] = np.sort(best)
    return plan


def step_ratios(final_ratio: float, steps: int) -> list[float]:
    """`r_t = 1 − (1 − R)^(t/T)`, t = 1…T (OBA_SPEC.md §5): channel ratios removed after each step."""
    if not 0 < final_ratio < 1 or steps < 1:
        raise ValueError(f"the schedule needs 0 < R < 1 and steps >= 1, got R={final_ratio}, steps={steps}")
    return [1 - (1 - final_ratio) ** (t / steps) for t in range(1, steps + 1)]


def prune_to_ops(graph: GroupGraph, score_fn: Callable[[Plan], Mapping[str, np.ndarray]], target_ops_ratio: float,
                 *, final_ratio: float, steps: int = 50, selection: Selection = Selection(), attention: bool = True,
                 tolerance: float = 0.01, start: Plan | None = None, params: Callable[[str], bool] | None = None,
                 on_step: Callable[[dict], None] | None = None) -> tuple[Plan, list[dict]]:
    """Prunes step by step until the ops ratio is ≤ the target, then refines the last step so that it lands
    within `tolerance` below the target (the authors' schedule overshoots).

    `score_fn(plan)` returns the group scores of the model with only `plan`'s channels (the caller scores a
    masked model of fixed shapes, so one compiled scorer serves every step); `start`: channels kept so far
    (iterative pruning continues from a previous target); `params`: which leaf paths count in the records'
    `params_ratio` (default all). Returns the plan and one record per step.
    """
    if not 0 < target_ops_ratio < 1:
        raise ValueError(f"the target ops ratio must lie in (0, 1), got {target_ops_ratio}")
    chosen = selection.selectable(graph.groups)
    dense = graph.macs(attention=attention)
    ratio_of = lambda plan: graph.macs(plan, attention=attention) / dense
    params_of = lambda plan: graph.params(plan, include=params) / graph.params(include=params)
    alive: Plan = {g.name: np.arange(g.size) for g in chosen}
    alive.update({k: np.asarray(v) for k, v in (start or {}).items() if k in alive})
    total = sum(g.size for g in chosen)
    done = 1 - sum(len(a) for a in alive.values()) / total
    history: list[dict] = []
    previous = done
    for t, r in enumerate((r for r in step_ratios(final_ratio, steps) if r > done), start=1):
        scores = score_fn(alive)
        plan = select_channels(graph.groups, scores, alive, r, selection)
        ops = ratio_of(plan)
        record = {"step": t, "channel_ratio": r, "ops_ratio": ops, "params_ratio": params_of(plan)}
        if ops <= target_ops_ratio:
            plan, record["channel_ratio"] = _refine(graph, scores, alive, previous, r, target_ops_ratio, selection,
                                                    ratio_of, tolerance)
            record.update(ops_ratio=ratio_of(plan), params_ratio=params_of(plan), refined=True)
            history.append(record)
            if on_step:
                on_step(record)
            return plan, history
        history.append(record)
        if on_step:
            on_step(record)
        alive, previous = plan, r
    # the schedule ended above the target: one more search on the last scores, up to the floors
    plan, r = _refine(graph, score_fn(alive), alive, previous, 1.0, target_ops_ratio, selection, ratio_of, tolerance)
    ops = ratio_of(plan)
    if ops > target_ops_ratio + tolerance:
        raise OutOfReachError(f"ops ratio {target_ops_ratio} is out of reach: with every group at its floor "
                         f"(max_pruning_ratio={selection.max_pruning_ratio}, kinds={selection.kinds}) the ops ratio is "
                         f"{ops:.3f}; allow more kinds or a higher max_pruning_ratio, or aim higher")
    history.append({"step": len(history) + 1, "channel_ratio": r, "ops_ratio": ops,
                    "params_ratio": params_of(plan), "refined": True})
    return plan, history


def _refine(graph, scores, alive, lo, hi, target, selection, ratio_of, tolerance) -> tuple[Plan, float]:
    """The plan (and its channel ratio) in [lo, hi] whose ops ratio lands in [target − tolerance, target].

    Bisection on the channel ratio finds the step's smallest removal that reaches the target. One channel
    of an expensive layer can move the ratio by more than the tolerance, so the step is then redone a
    channel at a time, lowest score first, skipping a channel whose removal would land below the window
    (with `round_to` > 1 the bisection's plan is kept)."""
    best = select_channels(graph.groups, scores, alive, hi, selection), hi
    above = None
    for _ in range(40):
        mid = (lo + hi) / 2
        plan = select_channels(graph.groups, scores, alive, mid, selection)
        if ratio_of(plan) <= target:
            best, hi = (plan, mid), mid
        else:
            above, lo = plan, mid
        if hi - lo < 1e-6:
            break
    plan, ratio = best
    if ratio_of(plan) >= target - tolerance or selection.round_to > 1:
        return plan, ratio
    current = {k: np.asarray(v) for k, v in (above if above is not None else alive).items()}
    floors = {g.name: selection.floor(g) for g in graph.groups if g.name in current}
    order = sorted((float(scores[name][i]), name, int(i)) for name, idx in current.items() for i in idx)
    for _, name, i in order:
        if len(current[name]) <= floors[name]:
            continue
        trial = {**current, name: current[name][current[name] != i]}
        ops = ratio_of(trial)
        if ops < target - tolerance:
            continue          # this channel costs too much: the next one may land in the window
        current = trial
        if ops <= target:
            return current, ratio
    return plan, ratio
