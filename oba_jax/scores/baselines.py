"""The baselines the authors compare OBA with (OBA_SPEC.md §7), on the same pipeline.

* ``fastoba``: `θ ⊙ Hθ` with the full Hessian of the loss over all float parameters (not OBA);
* ``taylor``: `θ ⊙ ∂L/∂θ`;
* ``magnitude``: `|θ|`;  ``random``: seeded uniform numbers (both need no data).

The data methods differentiate the traced program replayed as it is (`replay`): on CPU with the fast
conv, the same function with faster kernel gradients, as OBA's surrogate uses.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from oba_jax import fastconv
from oba_jax.program import PLAIN_CALLS, Equation, EqnKey, Program, bind, run
from oba_jax.scores.convs import bind_conv_eqn, eqn_supported

__all__ = ["data_free_scores", "fastoba_batch", "replay", "taylor_batch"]

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


class _Replay:
    """Rules: the program as it is, every supported convolution through the fast conv. Only plain calls
    are walked into (a `checkpoint` keeps its rematerialisation, a custom-derivative call its rule)."""

    def constant(self, value: Any) -> Any:
        return value

    def enter(self, eqn: Equation, key: EqnKey, ins: list[Any]) -> bool:
        return eqn.primitive.name in PLAIN_CALLS

    def equation(self, eqn: Equation, key: EqnKey, ins: list[Any]) -> list[Any]:
        return bind_conv_eqn(eqn, ins) if eqn_supported(eqn) else bind(eqn, ins)


class _AsIs:
    """Rules: the program exactly as traced (`jax.core.eval_jaxpr`)."""

    def constant(self, value: Any) -> Any:
        return value

    def enter(self, eqn: Equation, key: EqnKey, ins: list[Any]) -> bool:
        return False

    def equation(self, eqn: Equation, key: EqnKey, ins: list[Any]) -> list[Any]:
        return bind(eqn, ins)


def replay(program: Program, flat: Sequence[Any], x: Sequence[Any]) -> Any:
    """The program's logits at `flat` (all parameter leaves) on `x` (input leaves)."""
    rules = _Replay() if fastconv.use_fast_conv() else _AsIs()
    return run(program.jaxpr, program.consts, [*flat, *x], rules)[0]


def _loss_of(program: Program, loss: LossFn, flat: Sequence[Any], float_idx: Sequence[int], x, y):
    def f(params):
        full = list(flat)
        for i, p in zip(float_idx, params):
            full[i] = p
        return loss(replay(program, full, x), y)
    return f, [flat[i] for i in float_idx]


def taylor_batch(program: Program, loss: LossFn, float_idx: Sequence[int], flat, x, y) -> dict[str, list]:
    f, params = _loss_of(program, loss, flat, float_idx, x, y)
    g = jax.grad(f)(params)
    return {"total": [p * gi for p, gi in zip(params, g)]}


def fastoba_batch(program: Program, loss: LossFn, float_idx: Sequence[int], flat, x, y) -> dict[str, list]:
    f, params = _loss_of(program, loss, flat, float_idx, x, y)
    _, hv = jax.jvp(jax.grad(f), (params,), (params,))
    return {"total": [p * h for p, h in zip(params, hv)]}


def data_free_scores(method: str, leaves: Sequence[jax.Array], float_idx: Sequence[int], seed: int) -> list[jax.Array]:
    """`|θ|` or seeded uniform numbers on the float leaves (zeros elsewhere)."""
    out = [jnp.zeros_like(x) for x in leaves]
    keys = jax.random.split(jax.random.PRNGKey(seed), max(len(leaves), 1))
    for i in float_idx:
        x = leaves[i]
        out[i] = jnp.abs(x) if method == "magnitude" else jax.random.uniform(keys[i], x.shape, x.dtype)
    return out
