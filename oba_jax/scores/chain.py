"""Chain networks: where OBA's reverse pass needs no cotangent of the primal activations.

In the default score (`oba_jax.scores.tangent`) the gradient of
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

from oba_jax.graph import Analysis, Role
from oba_jax.program import Equation, EqnKey, run
from oba_jax.program.primitives import is_float

__all__ = ["layer_depths"]

_Record = tuple[EqnKey, Role, Equation, list[Any], list[Any]]


class _NotAChain(Exception):
    pass


def layer_depths(analysis: Analysis, theta_idx: Sequence[int]) -> dict[EqnKey, int] | None:
    """`{equation key: k}` for every layer product and bias add that reaches the logits, where k is the
    number of perturbed layers between its output and the logits; None if the program is not a chain."""
    try:
        records, logits, tangent, param = _flatten(analysis, set(theta_idx))
        return _depths(analysis, records, logits, tangent, param)
    except _NotAChain:
        return None


class _Flatten:
    """Rules: every value a fresh node; records the equations in evaluation order (calls walked into
    as the surrogate walks them) and which nodes carry a tangent / are views of a θ leaf."""

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.records: list[_Record] = []
        self.tangent: set[Any] = set()
        self.param: set[Any] = set()

    def constant(self, value: Any) -> Any:
        return None

    def enter(self, eqn: Equation, key: EqnKey, ins: list[Any]) -> bool:
        return self.analysis.role(key) is Role.CALL

    def index(self, value: Any, i: int) -> Any:
        raise _NotAChain   # an unrolled scan: not worth the bookkeeping; the general construction applies

    stack = index

    def equation(self, eqn: Equation, key: EqnKey, ins: list[Any]) -> list[Any]:
        outs = [object() for _ in eqn.outvars]
        self._check_parameter_use(key, ins)
        carried = [n in self.tangent for n in ins]
        if any(carried) and eqn.primitive.name != "stop_gradient":
            self.tangent.update(o for o, v in zip(outs, eqn.outvars) if is_float(v.aval))
        if any(n in self.param for n in ins) and key in self.analysis.found.view_eqns:
            self.param.update(outs)
        self.records.append((key, self.analysis.role(key), eqn, ins, outs))
        return outs

    def _check_parameter_use(self, key: EqnKey, ins: list[Any]) -> None:
        """A perturbed parameter may only be viewed (sliced, reshaped, masked...), be a layer's weight or
        a layer's bias."""
        uses = [k for k, n in enumerate(ins) if n in self.param]
        if not uses:
            return
        found = self.analysis.found
        if key in found.view_eqns:
            return
        if key in found.uses and uses == [found.uses[key].weight_position]:
            return
        if key in found.bias_adds and len(uses) == 1:
            return
        raise _NotAChain


def _flatten(analysis: Analysis, theta: set[int]) -> tuple[list[_Record], Any, set, set]:
    rules = _Flatten(analysis)
    program = analysis.program
    leaves = [object() for _ in program.jaxpr.invars]
    for i in theta:
        rules.tangent.add(leaves[i])
        rules.param.add(leaves[i])
    (logits,) = run(program.jaxpr, [None] * len(program.consts), leaves, rules)
    return rules.records, logits, rules.tangent, rules.param


def _depths(analysis: Analysis, records: list[_Record], logits: Any, tangent: set,
            param: set) -> dict[EqnKey, int]:
    found = analysis.found
    k: dict[Any, int] = {logits: 0}
    depths: dict[EqnKey, int] = {}
    for key, role, eqn, ins, outs in reversed(records):
        reached = {k[o] for o in outs if o in k}
        if not reached or eqn.primitive.name == "stop_gradient":
            continue
        if len(reached) > 1 or role is Role.PARALLEL:
            raise _NotAChain
        (k_out,) = reached
        if key in found.uses:
            depths[key] = k_out
            w = found.uses[key].weight_position
            passed = [(ins[1 - w], k_out + (1 if ins[w] in tangent else 0))]
        else:
            if key in found.bias_adds:
                depths[key] = k_out
            passed = [(n, k_out) for n in ins]
        for node, k_in in passed:
            if node in tangent and node not in param and k.setdefault(node, k_in) != k_in:
                raise _NotAChain
    return depths
