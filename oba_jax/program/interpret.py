"""THE jaxpr interpreter: one walk over a program's equations, with the analysis or evaluation given
as a rule set.

`run(jaxpr, consts, args, rules)` owns everything every walk needs: the environment, literals and
closed-over constants (`rules.constant`), equation keys, entering calls and binding. A rule set says
what a value is (an array, an abstract fact, a (primal, tangent) pair) and what one equation does to
values (`rules.equation`); it is asked only whether to enter a sub-program (`rules.enter`), never
how.

Entered in place (decided here, once): the bodies of `jit`/`pjit`/`closed_call`/`core_call`,
`checkpoint`/`remat`, `custom_jvp_call` and `custom_vjp_call`; a `cond`/`switch` whose branch index
is a literal (its one branch); and a `scan`, unrolled into its iterations (`rules.index` slices the
scanned-over inputs, `rules.stack` stacks the per-iteration outputs). Everything else is one equation.

Equation keys: the key of an equation is `ctx + (id(eqn),)` where `ctx` is the key of the call that
contains it (plus the iteration number inside an unrolled scan). One jitted function called at two
sites shares its jaxpr object, so the key, not the equation, names a place in the program.

This module is the only one that touches JAX's internal jaxpr API (`jax.extend.core`,
`get_bind_params`, equation contexts): a JAX upgrade that moves them breaks this file only.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from jax.extend import core as jcore

__all__ = [
    "CALLS", "ClosedJaxpr", "PLAIN_CALLS", "Equation", "EqnKey", "Jaxpr", "Rules", "bind", "bind_with", "call_kind",
    "equation_context", "open_jaxpr", "run", "sub_programs", "walk_into",
]

V = TypeVar("V")
Equation = jcore.JaxprEqn
Jaxpr = jcore.Jaxpr
ClosedJaxpr = jcore.ClosedJaxpr
EqnKey = tuple[int, ...]

CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat", "remat2",
                   "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
# Calls whose body is the function itself (no custom derivative rule, no rematerialisation).
PLAIN_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call"})


class Rules(Protocol[V]):
    """What a walk computes. Values of type V flow along the program's variables."""

    def constant(self, value: Any) -> V:
        """The value of a literal or a closed-over constant."""

    def enter(self, eqn: Equation, key: EqnKey, ins: list[V]) -> bool:
        """Whether to walk into this call / literal cond / scan (asked only for those: `call_kind`)."""

    def equation(self, eqn: Equation, key: EqnKey, ins: list[V]) -> list[V]:
        """The outputs of one equation (not entered) from its inputs."""

    def index(self, value: V, i: int) -> V:
        """`value[i]` along the leading axis (the i-th iteration's slice of a scanned-over input)."""

    def stack(self, values: list[V]) -> V:
        """The per-iteration outputs of an unrolled scan stacked along a new leading axis."""


def call_kind(eqn: Equation) -> str | None:
    """"call", "cond" (literal branch index), "scan" or None: how `run` may enter this equation."""
    name = eqn.primitive.name
    if name in CALLS and _call_body(eqn) is not None:
        return "call"
    if name == "cond" and isinstance(eqn.invars[0], jcore.Literal):
        return "cond"
    if name == "scan" and eqn.params["length"] > 0:
        return "scan"
    return None


def run(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[V], rules: Rules[V], ctx: EqnKey = ()) -> list[V]:
    """Walks `jaxpr` with `rules`; `consts` are the rule set's values of the constvars."""
    env: dict[Any, V] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def read(v: Any) -> V:
        return rules.constant(v.val) if isinstance(v, jcore.Literal) else env[v]

    for eqn in jaxpr.eqns:
        key = ctx + (id(eqn),)
        ins = [read(v) for v in eqn.invars]
        kind = call_kind(eqn)
        if kind is not None and rules.enter(eqn, key, ins):
            outs = walk_into(eqn, ins, rules, key)
        else:
            outs = rules.equation(eqn, key, ins)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def walk_into(eqn: Equation, ins: list[V], rules: Rules[V], key: EqnKey) -> list[V]:
    """What `run` does with an equation it enters (a call body, a literal cond's branch, an unrolled
    scan); for a rule set that must look inside before deciding (`Rules.enter`)."""
    with equation_context(eqn):
        return _ENTER[call_kind(eqn)](eqn, ins, rules, key)


def open_jaxpr(sub: Any) -> tuple[Jaxpr, list[Any]]:
    """`(jaxpr, consts)` of a closed or open jaxpr."""
    if isinstance(sub, jcore.ClosedJaxpr):
        return sub.jaxpr, list(sub.consts)
    return sub, []


def _call_body(eqn: Equation) -> Any:
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(name)
        if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
            return sub
    return None


def _run_closed(sub: Any, args: Sequence[V], rules: Rules[V], key: EqnKey) -> list[V]:
    jaxpr, consts = open_jaxpr(sub)
    # A call's trailing operands are its body's inputs (custom_jvp/vjp calls may lead with more).
    return run(jaxpr, [rules.constant(c) for c in consts], args[len(args) - len(jaxpr.invars):], rules, key)


def _enter_call(eqn: Equation, ins: list[V], rules: Rules[V], key: EqnKey) -> list[V]:
    return _run_closed(_call_body(eqn), ins, rules, key)


def _enter_cond(eqn: Equation, ins: list[V], rules: Rules[V], key: EqnKey) -> list[V]:
    branches = eqn.params["branches"]
    index = min(max(int(eqn.invars[0].val), 0), len(branches) - 1)   # lax.switch clamps the index
    return _run_closed(branches[index], ins[1:], rules, key)


def _enter_scan(eqn: Equation, ins: list[V], rules: Rules[V], key: EqnKey) -> list[V]:
    p = eqn.params
    n_consts, n_carry, length = p["num_consts"], p["num_carry"], p["length"]
    consts, carry, xs = ins[:n_consts], ins[n_consts:n_consts + n_carry], ins[n_consts + n_carry:]
    ys: list[list[V]] = [None] * length  # type: ignore[list-item]
    for i in (reversed(range(length)) if p["reverse"] else range(length)):
        outs = _run_closed(p["jaxpr"], [*consts, *carry, *(rules.index(x, i) for x in xs)], rules, key + (i,))
        carry, ys[i] = outs[:n_carry], outs[n_carry:]
    n_ys = len(eqn.outvars) - n_carry
    return [*carry, *(rules.stack([y[j] for y in ys]) for j in range(n_ys))]


_ENTER: dict[str, Callable[..., list[Any]]] = {"call": _enter_call, "cond": _enter_cond, "scan": _enter_scan}


def sub_programs(eqn: Equation) -> list[tuple[Jaxpr, list[Any]]]:
    """Every jaxpr held in an equation's parameters (bodies, branches, loop conditions), opened."""
    subs = []
    for value in eqn.params.values():
        for item in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(item, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                subs.append(open_jaxpr(item))
    return subs


@contextlib.contextmanager
def equation_context(eqn: Equation) -> Iterator[None]:
    """The context an equation was traced in (matmul precision, compute placement, metadata)."""
    with eqn.ctx.manager:
        yield


def bind(eqn: Equation, args: Sequence[Any]) -> list[Any]:
    """Applies the equation's primitive to `args` (arrays or tracers), as the program does."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ([], bind_params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def bind_with(eqn: Equation, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` in the equation's context (for a replacement implementation of it)."""
    with eqn.ctx.manager:
        return fn(*args, **kwargs)
