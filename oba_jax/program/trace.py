"""Tracing `apply_fn(params, inputs) -> logits` into one program over the flattened leaves."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from oba_jax.paths import leaf_paths
from oba_jax.program.interpret import ClosedJaxpr, Jaxpr

__all__ = ["Program", "check_param_leaves", "trace_program"]


@dataclasses.dataclass(frozen=True)
class Program:
    """A traced `apply_fn(params, inputs)`: the jaxpr, whose first `n_params` inputs are the parameter
    leaves (named by `paths`, in flattening order) and the rest the input leaves."""

    closed: ClosedJaxpr
    paths: tuple[str, ...]
    params_treedef: Any
    out_shape: tuple[int, ...]

    @property
    def n_params(self) -> int:
        return len(self.paths)

    @property
    def jaxpr(self) -> Jaxpr:
        return self.closed.jaxpr

    @property
    def consts(self) -> list[Any]:
        return list(self.closed.consts)

    def param_aval(self, leaf: int) -> Any:
        return self.closed.jaxpr.invars[leaf].aval


def check_param_leaves(params: Any, *, abstract: bool = False) -> list[Any]:
    """The leaves of `params`; a `TypeError` naming the first leaf that is not an array
    (`abstract=True`: `jax.ShapeDtypeStruct`s, e.g. of `nnx.eval_shape`, are fine too — for analyses
    that need shapes only)."""
    kinds = (jax.Array, np.ndarray, jax.ShapeDtypeStruct) if abstract else (jax.Array, np.ndarray)
    leaves = jax.tree_util.tree_leaves(params)
    for path, leaf in zip(leaf_paths(params), leaves):
        if not isinstance(leaf, kinds) or not hasattr(leaf, "dtype"):
            raise TypeError(f"parameter leaf {path!r} is a {type(leaf).__name__}, not an array; "
                            "pass a pytree whose leaves are jax or numpy arrays")
    return leaves


def trace_program(apply_fn: Callable, params: Any, example_inputs: Any) -> Program:
    """`jax.make_jaxpr` of `apply_fn` over the flattened parameter leaves and inputs."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    in_leaves, in_treedef = jax.tree_util.tree_flatten(example_inputs)

    def flat_fn(*flat):
        p = jax.tree_util.tree_unflatten(treedef, flat[: len(leaves)])
        x = jax.tree_util.tree_unflatten(in_treedef, flat[len(leaves):])
        return apply_fn(p, x)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves, *in_leaves)
    out_leaves = jax.tree_util.tree_leaves(out_shape)
    if len(out_leaves) != 1:
        raise ValueError(f"apply_fn must return one array of logits (..., classes); it returned "
                         f"{len(out_leaves)} arrays")
    return Program(closed=closed, paths=tuple(leaf_paths(params)), params_treedef=treedef,
                   out_shape=tuple(out_leaves[0].shape))
