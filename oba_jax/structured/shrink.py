"""Plans applied to parameters: physically smaller trees (`shrink_params`) and masks (`mask_params`).

A plan `kept = {group name: sorted unique indices to keep}` (a group not named keeps everything)
becomes, for every (leaf, axis) a group runs along, the positions to keep on that axis; the arrays are
then gathered (or masked) in one jitted call whose index arrays are arguments.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oba_jax.graph import ChannelGroup
from oba_jax.paths import leaf_paths

__all__ = ["check_plan", "kept_positions", "mask_params", "shrink_params"]

Plan = Mapping[str, Any]


def check_plan(groups: Sequence[ChannelGroup], kept: Plan) -> dict[str, np.ndarray]:
    """The plan as int arrays; a clear error for an unknown group, indices that are not sorted unique
    ints in range, an empty group, or a not-prunable group that would shrink."""
    by_name = {g.name: g for g in groups}
    out = {}
    for name, idx in kept.items():
        if name not in by_name:
            close = [g for g in by_name if name.split("/")[-1] in g][:5]
            raise KeyError(f"kept names no channel group {name!r}" + (f"; similar: {close}" if close else "") +
                           f" ({len(by_name)} groups, e.g. {list(by_name)[:4]})")
        g = by_name[name]
        arr = np.asarray(idx)
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise ValueError(f"kept[{name!r}] must be a 1-D array of integer channel indices, got shape "
                             f"{arr.shape} dtype {arr.dtype}")
        if arr.size == 0:
            raise ValueError(f"kept[{name!r}] is empty: a group keeps at least one channel")
        if arr.min() < 0 or arr.max() >= g.size:
            raise ValueError(f"kept[{name!r}] has indices outside [0, {g.size}) (from {arr.min()} to {arr.max()})")
        if np.any(np.diff(arr) <= 0):
            raise ValueError(f"kept[{name!r}] must be sorted and unique")
        if not g.prunable and arr.size != g.size:
            raise ValueError(f"group {name!r} is not prunable ({g.reason}); it must keep all {g.size} channels")
        out[name] = arr.astype(np.int64)
    return out


def kept_positions(groups: Sequence[ChannelGroup], kept: Plan,
                   shapes: Mapping[str, Sequence[int]]) -> dict[tuple[str, int], np.ndarray]:
    """`{(leaf path, axis): positions kept}` for every axis that loses entries under the plan."""
    plan = check_plan(groups, kept)
    removed: dict[tuple[str, int], list[np.ndarray]] = {}
    for g in groups:
        if g.name not in plan or plan[g.name].size == g.size:
            continue
        dropped = np.setdiff1d(np.arange(g.size), plan[g.name])
        for m in g.members:
            if m.path not in shapes:
                raise KeyError(f"group {g.name!r} runs along {m.path!r}, which these parameters do not have: "
                               "pass the pytree the groups were computed from")
            removed.setdefault((m.path, m.axis), []).append(m.indices[dropped].reshape(-1))
    return {key: np.setdiff1d(np.arange(shapes[key[0]][key[1]]), np.concatenate(parts))
            for key, parts in removed.items()}


@functools.partial(jax.jit, static_argnums=(2,))
def _gather(leaves, indices, axes):
    out = list(leaves)
    for (i, axis), idx in zip(axes, indices):
        out[i] = jnp.take(out[i], idx, axis=axis)
    return out


@functools.partial(jax.jit, static_argnums=(2,))
def _mask(leaves, keeps, axes):
    out = list(leaves)
    for (i, axis), keep in zip(axes, keeps):
        shape = [1] * out[i].ndim
        shape[axis] = -1
        out[i] = jnp.where(keep.reshape(shape), out[i], jnp.zeros((), out[i].dtype))
    return out


def _apply(params: Any, groups: Sequence[ChannelGroup], kept: Plan, masked: bool) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    paths = leaf_paths(params)
    index = {p: i for i, p in enumerate(paths)}
    positions = kept_positions(groups, kept, {p: np.shape(x) for p, x in zip(paths, leaves)})
    axes = tuple(sorted((index[p], a) for p, a in positions))
    if masked:
        arrays = []
        for i, a in axes:
            keep = np.zeros(np.shape(leaves[i])[a], bool)
            keep[positions[(paths[i], a)]] = True
            arrays.append(keep)
        out = _mask(leaves, arrays, axes)
    else:
        out = _gather(leaves, [jnp.asarray(positions[(paths[i], a)], jnp.int32) for i, a in axes], axes)
    return jax.tree_util.tree_unflatten(treedef, out)


def shrink_params(params: Any, groups: Sequence[ChannelGroup], kept: Plan) -> Any:
    """`params` with every removed channel cut out of every member axis: a physically smaller pytree
    (shape-agnostic apply functions run on it unchanged)."""
    return _apply(params, groups, kept, masked=False)


def mask_params(params: Any, groups: Sequence[ChannelGroup], kept: Plan) -> Any:
    """`params` of the same shapes with every removed channel zero on every member axis."""
    return _apply(params, groups, kept, masked=True)
