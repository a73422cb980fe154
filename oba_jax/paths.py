"""Leaf paths: the one spelling of "which array of a pytree" used everywhere in oba-jax.

A path is the '/'-joined keys from the root to the leaf (`"layers/0/conv/kernel"`); NNX's trailing
`.value` is dropped and a bare array is `"<root>"`. Scores (`ScoreResult.by_path`), the connectivity
map, `exclude=` patterns and checkpoints all name leaves this way.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax

__all__ = ["ROOT", "flat_by_path", "leaf_paths", "matches", "unflatten_by_path"]

ROOT = "<root>"


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path(keys: Sequence[Any]) -> str:
    names = [_key_name(k) for k in keys]
    if len(names) > 1 and names[-1] == "value":
        names = names[:-1]
    return "/".join(names) if names else ROOT


def leaf_paths(tree: Any) -> tuple[str, ...]:
    """The path of every leaf of `tree`, in flattening order."""
    return tuple(_path(keys) for keys, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def flat_by_path(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{path: leaf}` (each path after `prefix/` when a prefix is given)."""
    lead = f"{prefix}/" if prefix else ""
    return {lead + _path(keys): leaf for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_by_path(template: Any, flat: Mapping[str, Any], prefix: str = "") -> Any:
    """Inverse of `flat_by_path`: the leaves of `flat` in the structure of `template`."""
    names = list(flat_by_path(template, prefix))
    missing = [n for n in names if n not in flat]
    if missing:
        raise KeyError(f"{len(missing)} arrays are missing, e.g. {missing[:3]}")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), [flat[n] for n in names])


def matches(path: str, patterns: Sequence[str]) -> bool:
    """Whether `path` is one of `patterns` or lies under one of them (`"l1"` matches `"l1/kernel"`)."""
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in patterns)
