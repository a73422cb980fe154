"""Plans applied to parameters: physically smaller trees (`shrink_params`) and masks (`mask_params`).

A plan `kept = {group name: sorted unique indices to keep}` (a group not named keeps everything)
becomes, for every (leaf, axis) a group runs along, the positions to keep on that axis; the arrays are
then gathered (or masked) in one jitted call whose index arrays are arguments.

The masked parameters compute what removing the channels means. The shrunk ones compute the same only
through an apply function that derives nothing from the widths: code that computes an attention scale
`1/sqrt(q.shape[-1])`, RoPE frequencies from the head dim, or reshapes to a configured number of heads
computes something else on smaller arrays (or fails). `verify` checks one batch and raises
`ShrinkMismatchError` instead of returning such a result.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oba_jax.graph import ChannelGroup
from oba_jax.paths import leaf_paths

__all__ = ["ShrinkMismatchError", "check_plan", "check_same_outputs", "kept_positions", "mask_params",
           "shrink_params"]

Plan = Mapping[str, Any]


class ShrinkMismatchError(ValueError):
    """The shrunk model's outputs differ from the masked model's on the verify batch."""


def check_same_outputs(masked: Any, shrunk: Any, what: str) -> float:
    """The largest difference of `shrunk` from `masked` relative to the largest |masked| (pytrees of
    arrays); `ShrinkMismatchError` above the tolerance of their dtype (float64: 1e-10, else 1e-4)."""
    a_leaves, b_leaves = jax.tree_util.tree_leaves(masked), jax.tree_util.tree_leaves(shrunk)
    shapes = [np.shape(x) for x in a_leaves], [np.shape(x) for x in b_leaves]
    if shapes[0] != shapes[1]:
        raise ShrinkMismatchError(f"{what}: the shrunk model returns shapes {shapes[1]}, the masked one {shapes[0]}")
    wide = all(jnp.result_type(x) == jnp.float64 for x in a_leaves)
    tol = 1e-10 if wide else 1e-4
    a = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in a_leaves])
    b = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in b_leaves])
    scale = max(float(np.max(np.abs(a), initial=0.0)), np.finfo(np.float64).tiny)
    err = float(np.max(np.abs(a - b), initial=0.0)) / scale
    if not err <= tol:   # NaN included
        raise ShrinkMismatchError(
            f"{what}: on the verify batch the shrunk model's outputs differ from the masked model's by {err:.3g} "
            f"relative to the largest output (tolerance {tol:g}). The model computes something from a pruned "
            "width (an attention scale 1/sqrt(head_dim), RoPE frequencies, a reshape to a configured number of "
            "heads, a mean over a pruned axis); use the masked parameters (mask_params / mask_model), or "
            "compute those constants from the dense widths")
    return err


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


def shrink_params(params: Any, groups: Sequence[ChannelGroup], kept: Plan, *,
                  verify: tuple[Callable[[Any, Any], Any], Any] | None = None) -> Any:
    """`params` with every removed channel cut out of every member axis: a physically smaller pytree.

    It computes what the masked parameters compute only through an apply function that derives nothing
    from the widths (see the module docstring). `verify=(apply_fn, inputs)` runs one batch through the
    masked and the shrunk parameters and raises `ShrinkMismatchError` when they differ."""
    small = _apply(params, groups, kept, masked=False)
    if verify is not None:
        if not (isinstance(verify, tuple) and len(verify) == 2 and callable(verify[0])):
            raise TypeError("verify must be a pair (apply_fn, inputs of one batch)")
        apply_fn, inputs = verify
        check_same_outputs(apply_fn(mask_params(params, groups, kept), inputs), apply_fn(small, inputs),
                           "shrink_params")
    return small


def mask_params(params: Any, groups: Sequence[ChannelGroup], kept: Plan) -> Any:
    """`params` of the same shapes with every removed channel zero on every member axis."""
    return _apply(params, groups, kept, masked=True)
