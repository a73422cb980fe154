"""Unstructured and N:M masks from importance scores (OBA_SPEC.md §6).

Per-weight importance of a layer leaf, with `a = |Σ s| / count`, in one of two forms (`MASK_FORMS`; each
method's registry entry names its standard one, `form=` picks either for any method):
- "oba" (OBA and fastoba, as the authors): `u = a / (max(a) + 1e-6) + |w|`, the per-leaf max normaliser of
  the authors' code (weights and biases separately), `|w|` a floor for weights whose OBA score is ≈ 0;
- "global" (taylor, magnitude, random): `a` itself, so magnitude is global |w| and taylor global |θ·g|.
  Through OBA's `u` a baseline is no longer itself (magnitude lost 30 points at keep 0.3 that way).
One global threshold over every Conv/Dense weight and bias (the
classifier included): the `keep_ratio · n` entries of largest `u` are kept, ties broken towards the
lower position in the flattening order of `params`, so the count is exact and the mask deterministic.
Leaves that are not layer weights or biases (norms, embeddings, class tokens) and excluded leaves are
fully kept.

N:M (`n_m=(2, 4)`): in every run of M consecutive weights along a layer's input axis (its input axes
flattened, last fastest), the N of largest `u` are kept — the 2:4 pattern sparse tensor cores run.
Biases stay dense under N:M.

Masks are pytrees of bool (True = kept) with the structure of `params`.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oba_jax.graph import Connectivity
from oba_jax.paths import leaf_paths, matches
from oba_jax.scores import get_method

__all__ = ["MASK_FORMS", "apply_masks", "check_masks", "global_masks", "importance_of", "mask_sparsity", "masks_like", "n_m_masks",
           "scored_leaves", "unstructured_masks"]

EPS = 1e-6


# ---------------------------------------------------------------------------------------------
# Checks


def check_keep_ratio(keep_ratio: Any) -> float:
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise ValueError(f"keep_ratio must be a number in (0, 1] (the kept fraction of the scored weights), "
                         f"got {keep_ratio!r}")
    return float(keep_ratio)


def check_n_m(n_m: Any) -> tuple[int, int]:
    ok = (isinstance(n_m, (tuple, list)) and len(n_m) == 2
          and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in n_m)
          and 0 < n_m[0] <= n_m[1])
    if not ok:
        raise ValueError(f"n_m must be a pair (N, M) of ints with 0 < N <= M (keep N of every M), got {n_m!r}")
    return int(n_m[0]), int(n_m[1])


def check_masks(masks: Any, params: Any) -> None:
    """A clear error unless `masks` is a bool pytree with exactly the structure and shapes of `params`."""
    mask_paths, param_paths = leaf_paths(masks), leaf_paths(params)
    if mask_paths != param_paths:
        extra = sorted(set(mask_paths) - set(param_paths))[:3]
        missing = sorted(set(param_paths) - set(mask_paths))[:3]
        raise ValueError(f"masks do not have the structure of params ({len(mask_paths)} leaves against "
                         f"{len(param_paths)}; only in masks: {extra}, only in params: {missing}): build the "
                         "masks from these params")
    if jax.tree_util.tree_structure(masks) != jax.tree_util.tree_structure(params):
        raise ValueError("masks and params have the same leaf paths but different pytree types (e.g. dict "
                         "against nnx.State): build the masks from these params")
    for path, m, p in zip(param_paths, jax.tree_util.tree_leaves(masks), jax.tree_util.tree_leaves(params)):
        if np.shape(m) != np.shape(p):
            raise ValueError(f"mask {path!r} has shape {np.shape(m)} but the parameter has {np.shape(p)}")
        if jnp.result_type(m) != jnp.bool_:
            raise ValueError(f"mask {path!r} has dtype {jnp.result_type(m)}; masks are bool (True = kept)")


def _check_result(result: Any, params: Any, graph: Connectivity) -> None:
    paths = leaf_paths(params)
    if leaf_paths(result.sum) != paths:
        raise ValueError(f"the score result is not of this model: its scores have leaves "
                         f"{list(leaf_paths(result.sum))[:3]}… ({len(leaf_paths(result.sum))}), params "
                         f"{list(paths)[:3]}… ({len(paths)}); score these params")
    for path, s, p in zip(paths, jax.tree_util.tree_leaves(result.sum), jax.tree_util.tree_leaves(params)):
        if np.shape(s) != np.shape(p):
            raise ValueError(f"the score result is not of this model: scores of {path!r} have shape "
                             f"{np.shape(s)}, the parameter {np.shape(p)}; score these params")
    if graph.leaf_paths != paths:
        raise ValueError(f"the connectivity map is not of this model: it names leaves {list(graph.leaf_paths)[:3]}…, "
                         f"params {list(paths)[:3]}…")


# ---------------------------------------------------------------------------------------------
# Importance


def scored_leaves(graph: Connectivity, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """The leaves a mask may prune: every Conv/Dense weight and bias not matched by `exclude`."""
    return tuple(p for p in graph.scored_leaves if not matches(p, exclude))


def _mean_abs(s: jax.Array, w: jax.Array, count: jax.Array) -> tuple[jax.Array, Any]:
    dtype = jnp.result_type(s, w, jnp.float32)   # float64 when either is (the authors compute u so)
    return jnp.abs(s.astype(dtype)) / count, dtype


@functools.partial(jax.jit, static_argnames="form")
def _importance(sums: list[jax.Array], count: jax.Array, weights: list[jax.Array], form: str) -> list[jax.Array]:
    out = []
    for s, w in zip(sums, weights):
        a, dtype = _mean_abs(s, w, count)
        out.append(a / (jnp.max(a) + EPS) + jnp.abs(w.astype(dtype)) if form == "oba" else a)
    return out


MASK_FORMS = ("oba", "global")


def importance_of(result: Any, params: Any, *, graph: Connectivity | None = None,
                  exclude: Sequence[str] = (), form: str | None = None) -> dict[str, jax.Array]:
    """`{leaf path: importance}` for the scored leaves of a `ScoreResult` of `params`, in `form` (one of
    `MASK_FORMS`; None: the standard form of the result's method, see the module docstring)."""
    form = get_method(result.method).mask_form if form is None else form
    if form not in MASK_FORMS:
        raise ValueError(f"form={form!r}: choose one of {MASK_FORMS} (None: the method's own)")
    graph = _graph_of(result, graph)
    _check_result(result, params, graph)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    unknown = [e for e in exclude if not any(matches(p, (e,)) for p in leaf_paths(params))]
    if unknown:
        raise ValueError(f"exclude: {unknown} match no leaf of params (leaves: {list(leaf_paths(params))[:6]}…)")
    keep = scored_leaves(graph, exclude)
    if not keep:
        raise ValueError("nothing to mask: every layer weight and bias is excluded")
    s_by = dict(zip(leaf_paths(result.sum), jax.tree_util.tree_leaves(result.sum)))
    w_by = dict(zip(leaf_paths(params), jax.tree_util.tree_leaves(params)))
    values = _importance([s_by[p] for p in keep], result.count, [w_by[p] for p in keep], form)
    finite = jax.device_get([jnp.all(jnp.isfinite(v)) for v in values])
    bad = [p for p, ok in zip(keep, finite) if not ok]
    if bad:
        raise FloatingPointError(f"non-finite importance (NaN or inf in the scores or weights) of {bad}")
    return dict(zip(keep, values))


def _graph_of(result: Any, graph: Connectivity | None) -> Connectivity:
    graph = graph if graph is not None else result.graph
    if graph is None:
        raise ValueError(f"the {result.method!r} score result carries no connectivity map, so the layer weights "
                         "and biases are not known: pass graph=oba_jax.connectivity(apply_fn, params, inputs) "
                         "(or oba_jax.model_connectivity(model, inputs))")
    return graph


# ---------------------------------------------------------------------------------------------
# Selection


def keep_count(n: int, keep_ratio: float) -> int:
    """How many of `n` entries a keep ratio keeps: the nearest integer, at least one."""
    return max(1, int(round(keep_ratio * n)))


@jax.jit
def _ranks(values: jax.Array) -> jax.Array:
    """Rank of every entry in decreasing order (0 = largest); ties: the lower position first."""
    order = jnp.argsort(-values, stable=True)
    return jnp.zeros(values.shape, jnp.int32).at[order].set(jnp.arange(values.size, dtype=jnp.int32))


def global_masks(importance: Mapping[str, jax.Array], keep_ratio: float,
                 allowed: Mapping[str, jax.Array] | None = None) -> dict[str, jax.Array]:
    """`{path: bool}`: the `keep_ratio` fraction of all entries of `importance` with the largest values,
    under one threshold. With `allowed` (`{path: bool}`), only allowed entries can be kept (the fraction
    is still of all entries): a schedule's masks stay nested."""
    keep_ratio = check_keep_ratio(keep_ratio)
    paths = list(importance)
    flat = jnp.concatenate([importance[p].reshape(-1) for p in paths])
    k = keep_count(int(flat.size), keep_ratio)
    if allowed is not None:
        ok = jnp.concatenate([allowed[p].reshape(-1) for p in paths])
        available = int(jnp.sum(ok))
        if k > available:
            raise ValueError(f"keep_ratio {keep_ratio} keeps {k} entries but only {available} are allowed")
        flat = jnp.where(ok, flat, -jnp.inf)
    kept = _ranks(flat) < k
    out, start = {}, 0
    for p in paths:
        size = int(importance[p].size)
        out[p] = kept[start:start + size].reshape(importance[p].shape)
        start += size
    return out


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _n_m_leaf(values: jax.Array, in_axes: tuple[int, ...], n: int, m: int) -> jax.Array:
    last = tuple(range(values.ndim - len(in_axes), values.ndim))
    moved = jnp.moveaxis(values, in_axes, last)
    groups = moved.reshape(-1, m)
    order = jnp.argsort(-groups, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1)
    return jnp.moveaxis((ranks < n).reshape(moved.shape), last, in_axes)


def _input_axes(graph: Connectivity, path: str) -> tuple[int, ...]:
    axes = {layer.in_axes for layer in graph.layers if layer.weight == path}
    if len(axes) != 1 or None in axes:
        raise ValueError(f"N:M: the input axis of {path!r} is not known ({sorted(map(str, axes))}); exclude it")
    return tuple(next(iter(axes)))


def n_m_masks(importance: Mapping[str, jax.Array], graph: Connectivity, n_m: tuple[int, int]) -> dict[str, jax.Array]:
    """`{path: bool}`: N of every M consecutive weights along each weight's input axes; biases kept."""
    n, m = check_n_m(n_m)
    weights = {layer.weight for layer in graph.layers}
    out = {}
    for path, values in importance.items():
        if path not in weights:
            out[path] = jnp.ones(values.shape, bool)
            continue
        axes = _input_axes(graph, path)
        length = int(np.prod([values.shape[a] for a in axes]))
        if length % m:
            raise ValueError(f"N:M {n}:{m}: the input axis of {path!r} has {length} weights (shape {values.shape}, "
                             f"input axes {axes}), not a multiple of {m}; exclude the layer "
                             f"(exclude=({path.rsplit('/', 1)[0]!r},)) or choose another M")
        out[path] = _n_m_leaf(values, axes, n, m)
    return out


# ---------------------------------------------------------------------------------------------
# The public entry point and helpers


def unstructured_masks(result: Any, params: Any, keep_ratio: float | None = 0.1, exclude: Sequence[str] = (),
                       n_m: tuple[int, int] | None = None, *, graph: Connectivity | None = None,
                       form: str | None = None) -> Any:
    """Masks (bool pytree like `params`, True = kept) from any importance method's `ScoreResult` of `params`.

    `keep_ratio`: the kept fraction of the scored entries (every Conv/Dense weight and bias, the classifier
    included, minus `exclude`: leaf paths or prefixes) under one global threshold. `n_m=(N, M)`: N:M
    masks instead (then `keep_ratio` must be None, its default, or N/M). `graph`: the connectivity map,
    needed only when the result carries none (data-free methods such as magnitude). `form`: how scores
    become importance (`importance_of`; None: the method's standard form).
    """
    if n_m is not None:
        n, m = check_n_m(n_m)
        if keep_ratio is not None and keep_ratio not in (0.1, n / m):
            raise ValueError(f"keep_ratio={keep_ratio!r} with n_m={n_m!r}: an N:M mask keeps {n}/{m} of each "
                             "weight; pass keep_ratio=None")
    else:
        keep_ratio = check_keep_ratio(keep_ratio)
    graph = _graph_of(result, graph)
    importance = importance_of(result, params, graph=graph, exclude=exclude, form=form)
    chosen = n_m_masks(importance, graph, n_m) if n_m is not None else global_masks(importance, keep_ratio)
    return masks_like(params, chosen)


def masks_like(params: Any, chosen: Mapping[str, jax.Array]) -> Any:
    """The full mask pytree: `chosen[path]` where given, all True elsewhere."""
    leaves = [chosen[p] if p in chosen else jnp.ones(np.shape(x), bool)
              for p, x in zip(leaf_paths(params), jax.tree_util.tree_leaves(params))]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)


@jax.jit
def _where(params: Any, masks: Any) -> Any:
    return jax.tree_util.tree_map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def apply_masks(params: Any, masks: Any) -> Any:
    """`params` with every pruned entry exactly zero (`where`, so NaN/inf of pruned entries do not leak)."""
    check_masks(masks, params)
    return _where(params, masks)


def mask_sparsity(masks: Any, leaves: Sequence[str]) -> dict[str, Any]:
    """Per leaf of `leaves` and over all of them: size, kept entries and sparsity (pruned fraction)."""
    by_path = dict(zip(leaf_paths(masks), jax.tree_util.tree_leaves(masks)))
    kept = jax.device_get({p: jnp.sum(by_path[p]) for p in leaves})
    layers = {p: {"size": int(by_path[p].size), "kept": int(kept[p]),
                  "sparsity": 1 - int(kept[p]) / max(int(by_path[p].size), 1)} for p in leaves}
    size = sum(v["size"] for v in layers.values())
    total_kept = sum(v["kept"] for v in layers.values())
    return {"layers": layers, "global": {"size": size, "kept": total_kept,
                                         "sparsity": 1 - total_kept / max(size, 1), "keep_ratio": total_kept / max(size, 1)}}
