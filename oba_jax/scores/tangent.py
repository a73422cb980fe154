"""The surrogate network with its forward tangent in the direction θ written out (the default score).

Every value is a pair (primal, tangent); a tangent of None is zero. Tangents follow the surrogate's
derivative: `φ'(sg(u))·t_u` at a nonlinearity (frozen: no derivative through the point), the bilinear
expansion at layers and parallel products, `jax.jvp` at linear equations. Primals are the network's
own: one reverse pass through both gives `∇_θ ⟨∇L̃(θ), sg(θ)⟩ = H̃θ` and needs only the primals' first
derivatives, where the surrogate and the network agree. A dense layer's value and tangent are one
custom VJP with the backward written out (`_dense_pair`); on a chain network (`oba_jax.scores.chain`)
the primals carry no gradient at all.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from oba_jax.graph import Analysis, Role
from oba_jax.program import Equation, EqnKey, bind, equation_context, run
from oba_jax.scores.chain import layer_depths
from oba_jax.scores.convs import conv_binding
from oba_jax.scores.surrogate import index_leading, jvp_at

__all__ = ["dense_pair", "evaluate_with_tangent"]

Pair = tuple[Any, Any]


class _Tangent:
    """Rules: (primal, tangent) pairs."""

    def __init__(self, analysis: Analysis, depths: dict[EqnKey, int] | None = None):
        self.analysis = analysis
        self.depths = depths or {}

    def constant(self, value: Any) -> Pair:
        return value, None

    def enter(self, eqn: Equation, key: EqnKey, ins: list[Pair]) -> bool:
        return self.analysis.role(key) is Role.CALL

    def index(self, value: Pair, i: int) -> Pair:
        x, t = value
        return index_leading(x, i), None if t is None else index_leading(t, i)

    def stack(self, values: list[Pair]) -> Pair:
        xs = jnp.stack([x for x, _ in values])
        if all(t is None for _, t in values):
            return xs, None
        return xs, jnp.stack([jnp.zeros_like(x) if t is None else t for x, t in values])

    def equation(self, eqn: Equation, key: EqnKey, pairs: list[Pair]) -> list[Pair]:
        ins = [x for x, _ in pairs]
        t_ins = [t for _, t in pairs]
        role = self.analysis.role(key)
        if all(t is None for t in t_ins):
            outs, t_outs = bind(eqn, ins), None
        elif role is Role.NONLINEAR:
            # The one reverse pass only sees first derivatives of the primals, which the surrogate
            # shares with the network: φ itself will do. The tangent `φ'(sg(u))·t` is the frozen one.
            outs = bind(eqn, ins)
            t_outs = jvp_at(eqn, [jax.lax.stop_gradient(a) for a in ins], t_ins)[1]
        elif role is Role.LAYER and key in self.depths:
            outs, t_outs = self._chain_layer(eqn, ins, t_ins, key)
        elif role is Role.LAYER and _is_dense(eqn):
            outs, t_outs = dense_pair(eqn, *ins, *t_ins)
        elif role is Role.LAYER:
            binding = conv_binding(eqn)
            t_out = _bilinear_tangent(binding, eqn, ins, t_ins)
            out = binding(eqn, ins)[0]
            if eqn.primitive.name == "conv_general_dilated":
                out = _after(out, t_out)
            outs, t_outs = [out], [t_out]
        elif role is Role.PARALLEL:
            outs = bind(eqn, ins)
            t_outs = [_bilinear_tangent(bind, eqn, ins, t_ins)]
        elif key in self.depths:
            outs, t_outs = _chain_bias(eqn, ins, t_ins, self.depths[key])
        else:
            outs, t_outs = jvp_at(eqn, ins, t_ins)
        t_outs = t_outs or [None] * len(outs)
        return [(x, t if t is not None and jnp.issubdtype(jnp.result_type(t), jnp.inexact) else None)
                for x, t in zip(outs, t_outs)]

    def _chain_layer(self, eqn: Equation, ins: list[Any], t_ins: list[Any],
                     key: EqnKey) -> tuple[list[Any], list[Any]]:
        """A layer of a chain network, k perturbed layers below its output: the value `y = W ⊛ x`
        without gradient (no `c` chain), the tangent `W ⊛ (t_x + k·x) + (1 − k)·y`, whose value is
        `W ⊛ t_x + y` and whose kernel gradient `(t_x + k·x) ⋆ g` includes the primal path's."""
        w = self.analysis.uses[key].weight_position
        x, weight, t_x, t_w = ins[1 - w], ins[w], t_ins[1 - w], t_ins[w]
        operands = lambda act: [act, weight] if w == 1 else [weight, act]
        binding = conv_binding(eqn)
        y = jax.lax.stop_gradient(binding(eqn, operands(x))[0])
        if t_w is None:  # a layer held fixed (`exclude=`): no θ_W ⊛ x term, no kernel gradient
            return [y], [binding(eqn, operands(t_x))[0]]
        k = self.depths[key]
        moved = t_x if k == 0 else k * x if t_x is None else t_x + k * x
        if moved is None:  # the first layer of a one-layer network: no second-order term
            return [y], [y]
        if _is_dense(eqn):
            t_y = dense_pair(eqn, *operands(moved), None, None)[0][0]
        else:
            t_y = binding(eqn, operands(moved))[0]
        if k != 1:
            t_y = t_y + (1 - k) * y
        if eqn.primitive.name == "conv_general_dilated":
            y = _after(y, t_y)
        return [y], [t_y]


def _chain_bias(eqn: Equation, ins: list[Any], t_ins: list[Any], k: int) -> tuple[list[Any], list[Any]]:
    """A layer's bias add in a chain network: the value without gradient and the tangent plus
    `k·(y − sg(y))` (zero), whose gradient adds the primal path's `k·Σg` to the bias."""
    (y,), (t_y,) = jvp_at(eqn, ins, t_ins)
    if k:
        t_y = t_y + k * (y - jax.lax.stop_gradient(y))
    return [jax.lax.stop_gradient(y)], [t_y]


def _is_dense(eqn: Equation) -> bool:
    """`a @ b`: the last axis of `a` against the first of a 2-D `b`, no batch axes, one dtype."""
    if eqn.primitive.name != "dot_general":
        return False
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a, b = (v.aval for v in eqn.invars)
    return (not lb and not rb and b.ndim == 2 and tuple(rc) == (0,) and tuple(lc) == (a.ndim - 1,)
            and a.dtype == b.dtype == eqn.outvars[0].aval.dtype)


def dense_pair(eqn: Equation, a, b, t_a, t_b) -> tuple[list[Any], list[Any]]:
    """`y = a @ b` and its tangent `t_a @ b + a @ t_b` (a tangent may be None: zero), as one custom VJP
    with the backward written out.

    With cotangents `c` (of y) and `g` (of the tangent): `ā = c bᵀ + g t_bᵀ`, `b̄ = aᵀc + t_aᵀg`,
    `t̄_a = g bᵀ`, `t̄_b = aᵀg`, the kernel gradients contracting the rows of both operands. JAX's own
    transpose of a product writes `b̄` as `(cᵀa)ᵀ`, for which XLA:CPU makes a transposed copy of every
    cotangent first (ViT, batch 64: 0.9 GB less memory traffic this way). A symbolically zero
    cotangent (the logits' `c`) skips its matmuls.
    """
    mm = functools.partial(jnp.matmul, precision=eqn.params.get("precision"))
    k, n = b.shape
    rows = lambda u, m: u.reshape(-1, m)

    @jax.custom_vjp
    def pair(a, b, t_a, t_b):
        return mm(a, b), _sum(t_a is not None and mm(t_a, b), t_b is not None and mm(a, t_b))

    def fwd(a, b, t_a, t_b):
        values = jax.tree_util.tree_map(lambda p: p.value, (a, b, t_a, t_b))
        return pair(*values), values

    def bwd(res, cts):
        a, b, t_a, t_b = res
        c, g = (None if isinstance(u, SymbolicZero) else u for u in cts)
        with equation_context(eqn):  # the matmul precision the equation was traced with
            return (_sum(c is not None and mm(c, b.T), g is not None and t_b is not None and mm(g, t_b.T)),
                    _sum(c is not None and mm(rows(a, k).T, rows(c, n)),
                         g is not None and t_a is not None and mm(rows(t_a, k).T, rows(g, n))),
                    None if t_a is None else _sum(g is not None and mm(g, b.T)),
                    None if t_b is None else _sum(g is not None and mm(rows(a, k).T, rows(g, n))))

    pair.defvjp(fwd, bwd, symbolic_zeros=True)
    with equation_context(eqn):
        y, t_y = pair(a, b, t_a, t_b)
    return [y], [t_y]


def _sum(*terms: Any) -> Any:
    """The sum of the terms that are arrays (a skipped term is False); None, a zero cotangent, if none."""
    live = [t for t in terms if t is not False]
    return functools.reduce(jnp.add, live) if live else None


def _bilinear_tangent(binding, eqn: Equation, ins: list[Any], t_ins: list[Any]) -> Any:
    """`t_a ⊛ b + a ⊛ t_b` for a product that is linear in each operand."""
    terms = []
    for k, t in enumerate(t_ins):
        if t is not None:
            args = list(ins)
            args[k] = t
            terms.append(binding(eqn, args)[0])
    return _sum(*terms)


def evaluate_with_tangent(analysis: Analysis, flat_params: Sequence[Any], flat_inputs: Sequence[Any],
                          theta_idx: Sequence[int], *, chain: bool = False) -> tuple[Any, Any]:
    """Logits of the surrogate network and their tangent in the direction `sg(θ)` on `theta_idx`.

    `⟨sg(∂ℓ/∂z), tangent⟩` is `⟨∇L̃(θ), sg(θ)⟩`; its gradient with respect to θ is OBA's `H̃θ`, taken in
    reverse mode only (so the CPU fast conv's reverse-mode kernel gradient applies throughout).
    `chain=True`: if the program is a chain network (`oba_jax.scores.chain`), the logits carry no
    gradient and the tangent's gradient is still `H̃θ`, without the primal activations' reverse chain.
    """
    program = analysis.program
    theta = set(theta_idx)
    tangents = [jax.lax.stop_gradient(p) if i in theta else None for i, p in enumerate(flat_params)]
    tangents += [None] * len(flat_inputs)
    depths = layer_depths(analysis, theta_idx) if chain else None
    ((out, t_out),) = run(program.jaxpr, [(c, None) for c in program.consts],
                          list(zip([*flat_params, *flat_inputs], tangents)), _Tangent(analysis, depths))
    return out, t_out


def _after(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a + 0·b[0]`: the values of `a`, available only once `b` is.

    XLA's schedulers otherwise put the whole primal chain of convolutions before the whole tangent
    chain; with each convolution's output waiting for its tangent the two convolutions of a layer are
    scheduled together and run concurrently (wide ResNet-20, batch 32, 2 CPU cores: about 10% less
    time). Dense layers are left alone: XLA:CPU's matmuls use both cores on their own.
    """
    return a + (jax.lax.stop_gradient(b.reshape(-1)[0]) * 0).astype(a.dtype)
