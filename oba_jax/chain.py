"""Chain networks: where OBA's reverse pass needs no cotangent of the primal activations.

In the default score (`surrogate.evaluate_with_tangent`, `hessian._oba_total`) the gradient of
`⟨sg(∂ℓ/∂z), t_z⟩` flows back along two chains: `g`, through the tangents, and `c`, through the primal
activations (which enter the tangent as `θ_W ⊛ x` at every layer). With the direction θ equal to the
weights, a layer `y = W ⊛ x` passes back `c_x = Wᵀ(c_y + g_y)` and `g_x = Wᵀ g_y`, and every other
equation passes both through the same (frozen) Jacobian. So if every path from an activation v to the
logits crosses the same number `k_v` of perturbed layers, then `c_v = k_v·g_v` (`c = 0` at the logits),
and a layer's kernel gradient `x ⋆ c_y + t_x ⋆ g_y` is `(t_x + k_y·x) ⋆ g_y`: one kernel gradient and no
`c` chain, four convolution-sized products per layer instead of six.

`layer_depths` finds the `k` of every layer and bias output, or None when the program is not such a
chain: a parallel product, a residual connection joining paths of different depth, or a perturbed
parameter used other than as a layer weight or bias (then `c` is not a multiple of `g`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jax.extend import core as jcore

from oba_jax.graph import _STRUCTURAL, Role, _Analysis, _is_float, _open, _sub_jaxpr

__all__ = ["layer_depths"]

_Record = tuple[tuple[int, ...], Role, jcore.JaxprEqn, list[Any], list[Any]]


class _NotAChain(Exception):
    pass


def layer_depths(analysis: _Analysis, theta_idx: Sequence[int]) -> dict[tuple[int, ...], int] | None:
    """`{equation key: k}` for every layer product and bias add that reaches the logits, where k is the
    number of perturbed layers between its output and the logits; None if the program is not a chain."""
    try:
        records, logits, tangent, param = _flatten(analysis, set(theta_idx))
        return _depths(analysis, records, logits, tangent, param)
    except _NotAChain:
        return None


def _flatten(analysis: _Analysis, theta: set[int]) -> tuple[list[_Record], Any, set, set]:
    """The program's equations in evaluation order with calls walked into (as the surrogate evaluates
    them), each value a fresh node; which nodes carry a tangent and which are views of a θ leaf."""
    records: list[_Record] = []
    tangent: set[Any] = set()
    param: set[Any] = set()

    def walk(jaxpr: jcore.Jaxpr, nodes: list[Any], ctx: tuple[int, ...]) -> list[Any]:
        env = dict(zip(jaxpr.invars, nodes))
        read = lambda v: None if isinstance(v, jcore.Literal) else env.get(v)
        for eqn in jaxpr.eqns:
            key = ctx + (id(eqn),)
            ins = [read(v) for v in eqn.invars]
            role = analysis.roles.get(key, Role.CONSTANT)
            if role is Role.INLINE:
                sub, _ = _open(_sub_jaxpr(eqn))
                outs = walk(sub, ins[len(ins) - len(sub.invars):], key)
            else:
                outs = [object() for _ in eqn.outvars]
                _check_parameter_use(analysis, key, eqn, ins, param)
                carried = [n in tangent for n in ins]
                if any(carried) and eqn.primitive.name != "stop_gradient":
                    tangent.update(o for o, v in zip(outs, eqn.outvars) if _is_float(v.aval))
                if ins and any(n in param for n in ins) and eqn.primitive.name in _STRUCTURAL:
                    param.update(outs)
                records.append((key, role, eqn, ins, outs))
            for v, n in zip(eqn.outvars, outs):
                env[v] = n
        return [read(v) for v in jaxpr.outvars]

    closed = analysis.program.closed
    leaves = [object() for _ in closed.jaxpr.invars]
    for i in theta:
        tangent.add(leaves[i])
        param.add(leaves[i])
    (logits,) = walk(closed.jaxpr, leaves, ())
    return records, logits, tangent, param


def _check_parameter_use(analysis: _Analysis, key: tuple[int, ...], eqn: jcore.JaxprEqn, ins: list[Any],
                         param: set) -> None:
    """A perturbed parameter may only be reshaped, be a layer's weight or a layer's bias."""
    uses = [k for k, n in enumerate(ins) if n in param]
    if not uses:
        return
    if eqn.primitive.name in _STRUCTURAL and len(ins) == 1:
        return
    if key in analysis.layer_of_eqn and uses == [analysis.weight_position[key]]:
        return
    if key in analysis.bias_eqns and len(uses) == 1:
        return
    raise _NotAChain


def _depths(analysis: _Analysis, records: list[_Record], logits: Any, tangent: set,
            param: set) -> dict[tuple[int, ...], int]:
    k: dict[Any, int] = {logits: 0}
    depths: dict[tuple[int, ...], int] = {}
    for key, role, eqn, ins, outs in reversed(records):
        reached = {k[o] for o in outs if o in k}
        if not reached or eqn.primitive.name == "stop_gradient":
            continue
        if len(reached) > 1 or role is Role.PARALLEL:
            raise _NotAChain
        (k_out,) = reached
        if key in analysis.layer_of_eqn:
            depths[key] = k_out
            w = analysis.weight_position[key]
            passed = [(ins[1 - w], k_out + (1 if ins[w] in tangent else 0))]
        else:
            if key in analysis.bias_eqns:
                depths[key] = k_out
            passed = [(n, k_out) for n in ins]
        for node, k_in in passed:
            if node in tangent and node not in param and k.setdefault(node, k_in) != k_in:
                raise _NotAChain
    return depths

