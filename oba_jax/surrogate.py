"""The OBA surrogate network: the traced program re-evaluated with every nonlinearity linearised.

OBA_SPEC.md §2: replace every non-bilinear op φ by `sg(φ(u)) + jvp(φ, sg(u); u − sg(u))` (same value and
first derivative, zero second derivative), keep parameter layers and parallel products exact. The
Hessian of `Σ sg(∂ℓ/∂z)·z̃` is then exactly OBA's H̃. With `linearise_parallel=True` the parallel products
are linearised too, which leaves only the series part.

`evaluate_with_tangent` evaluates the same surrogate with its forward tangent in the direction θ
written out next to every value; the gradient of `⟨sg(∂ℓ/∂z), tangent⟩` is OBA's `H̃θ` in one reverse
pass (the default score, see `oba_jax.hessian`). There a dense layer's value and tangent are one custom
VJP with the backward written out (`_dense_pair`).

With `probes` the evaluator also adds, for every layer, `P ⊛ sg(T)` to the layer's product, where T is a
given tangent of the layer's input; the gradient with respect to the zero-valued probe P is then
`Tᵀ g`, the downward part's kernel (see `oba_jax.hessian`).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.extend import core as jcore

from oba_jax.chain import layer_depths
from oba_jax.fastconv import bind_conv_eqn, eqn_supported, use_fast_conv
from oba_jax.graph import Role, _Analysis, _open, _sub_jaxpr

__all__ = ["evaluate", "evaluate_with_tangent"]


def _bind(eqn: jcore.JaxprEqn, args: Sequence[Any]) -> list[Any]:
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bind_params if isinstance(bind_params, tuple) else ([], bind_params)
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*subfuns, *args, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def _linearised(eqn: jcore.JaxprEqn, args: list[Any], deps: list[bool]) -> list[Any]:
    """φ with its derivative frozen at the evaluation point: same value and first derivative as φ,
    zero second derivative (`sg(φ(u)) + jvp(φ, sg(u); u − sg(u))` over the parameter-dependent operands).

    Written as a `jax.custom_jvp` whose tangent is `jvp(φ, sg(u); du)`: the forward pass evaluates φ
    once (no zero-valued tangent term) and the backward pass multiplies by φ'(u₀) as φ's own would.
    """
    dyn = [i for i, d in enumerate(deps) if d]
    const = {i: a for i, a in enumerate(args) if i not in dyn}

    def full(dyn_args):
        out = [const.get(i) for i in range(len(args))]
        for i, a in zip(dyn, dyn_args):
            out[i] = a
        return out

    @jax.custom_jvp
    def frozen(*dyn_args):
        return _bind(eqn, full(dyn_args))

    @functools.partial(frozen.defjvp, symbolic_zeros=True)
    def frozen_jvp(primals, tangents):
        # The primal through `frozen` again, so every order of differentiation sees the frozen φ.
        out = frozen(*primals)
        live = [k for k, t in enumerate(tangents) if not isinstance(t, jax.custom_derivatives.SymbolicZero)]
        if not live:
            return out, [jnp.zeros_like(o) if jnp.issubdtype(o.dtype, jnp.inexact) else
                         np.zeros(o.shape, jax.dtypes.float0) for o in out]
        moving = [None] * len(args)
        for k in live:
            moving[dyn[k]] = tangents[k]
        return out, _jvp_at(eqn, full([jax.lax.stop_gradient(p) for p in primals]), moving)[1]

    return list(frozen(*[args[i] for i in dyn]))


def _series_product(eqn: jcore.JaxprEqn, args: list[Any]) -> list[Any]:
    """`a·b ↦ sg(a)·b + a·sg(b) − sg(a)·sg(b)`: the product's first-order expansion."""
    a, b = args[0], args[1]
    sa, sb = jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
    left = _bind(eqn, [sa, b])[0]
    right = _bind(eqn, [a, sb])[0]
    both = _bind(eqn, [sa, sb])[0]
    return [left + right - both]


class _Evaluator:
    def __init__(self, analysis: _Analysis, *, linearise_parallel: bool,
                 probes: dict[str, Any] | None, probe_tangents: dict[str, Any] | None,
                 record_inputs: dict[str, Any] | None, forward_mode: bool):
        self.a = analysis
        self.forward_mode = forward_mode
        self.linearise_parallel = linearise_parallel
        self.probes = probes
        self.probe_tangents = probe_tangents
        self.record_inputs = record_inputs
        self.layer_calls: dict[str, int] = {}

    def run(self, jaxpr: jcore.Jaxpr, consts: list[Any], args: list[Any], ctx: tuple[int, ...]) -> list[Any]:
        env: dict[Any, Any] = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, x in zip(jaxpr.invars, args):
            env[v] = x
        read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
        for eqn in jaxpr.eqns:
            key = ctx + (id(eqn),)
            ins = [read(v) for v in eqn.invars]
            role = self.a.roles.get(key, Role.CONSTANT)
            if role is Role.INLINE:
                sub_jaxpr, sub_consts = _open(_sub_jaxpr(eqn))
                outs = self.run(sub_jaxpr, sub_consts, ins[len(ins) - len(sub_jaxpr.invars):], key)
            elif role is Role.NONLINEAR:
                outs = _linearised(eqn, ins, self.a.nonlinear_deps[key])
            elif role is Role.PARALLEL and self.linearise_parallel:
                outs = _series_product(eqn, ins)
            elif role is Role.LAYER:
                outs = self._layer(eqn, ins, key)
            else:
                outs = _bind(eqn, ins)
            for v, x in zip(eqn.outvars, outs):
                env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def _layer(self, eqn: jcore.JaxprEqn, ins: list[Any], key: tuple[int, ...]) -> list[Any]:
        path = self.a.layer_of_eqn[key]
        w_pos = self.a.weight_position[key]
        # CPU: convolutions whose kernel gradient is matmuls (XLA:CPU's native one is slow).
        if use_fast_conv() and eqn_supported(eqn):
            bind = functools.partial(bind_conv_eqn, forward_mode=self.forward_mode)
        else:
            bind = _bind
        out = bind(eqn, ins)
        call = self.layer_calls.get(path, 0)
        self.layer_calls[path] = call + 1
        if self.record_inputs is not None:
            self.record_inputs.setdefault(path, []).append(ins[1 - w_pos])
        if self.probes is not None and path in self.probes:
            tangent = jax.lax.stop_gradient(self.probe_tangents[path][call])
            w_view = self.probes[path]
            for view_eqn in self.a.weight_chain[key]:
                (w_view,) = _bind(view_eqn, [w_view])
            probe_args = list(ins)
            probe_args[1 - w_pos] = tangent
            probe_args[w_pos] = w_view
            out = [out[0] + bind(eqn, probe_args)[0]]
        return out


def evaluate(analysis: _Analysis, flat_params: Sequence[Any], flat_inputs: Sequence[Any], *,
             linearise_parallel: bool = False, probes: dict[str, Any] | None = None,
             probe_tangents: dict[str, Any] | None = None,
             record_inputs: dict[str, Any] | None = None, forward_mode: bool = False) -> Any:
    """Logits of the surrogate network at `flat_params` (all leaves) on `flat_inputs`.

    `forward_mode=True` when the caller differentiates only with `jax.jvp` (the CPU fast conv is
    reverse-mode only; see `oba_jax.fastconv`).
    """
    closed = analysis.program.closed
    ev = _Evaluator(analysis, linearise_parallel=linearise_parallel, probes=probes,
                    probe_tangents=probe_tangents, record_inputs=record_inputs, forward_mode=forward_mode)
    (out,) = ev.run(closed.jaxpr, list(closed.consts), [*flat_params, *flat_inputs], ())
    return out


class _TangentEvaluator:
    """The surrogate network evaluated with its forward tangent in the direction `sg(θ)`, written out.

    Every value is a pair (primal, tangent); a tangent of None is zero. Tangents follow the surrogate's
    derivative: `φ'(sg(u))·t_u` at a nonlinearity (frozen: no derivative through the point), the
    bilinear expansion at layers and parallel products, `jax.jvp` at linear equations. Primals are the
    network's own: one reverse pass through both gives `∇_θ ⟨∇L̃(θ), sg(θ)⟩ = H̃θ` and needs only the
    primals' first derivatives, where the surrogate and the network agree.
    """

    def __init__(self, analysis: _Analysis, depths: dict[tuple[int, ...], int] | None = None):
        self.a = analysis
        self.depths = depths or {}

    def run(self, jaxpr: jcore.Jaxpr, consts: list[Any], args: list[Any], tangents: list[Any],
            ctx: tuple[int, ...]) -> tuple[list[Any], list[Any]]:
        env: dict[Any, Any] = {}
        tan: dict[Any, Any] = {}
        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, x, t in zip(jaxpr.invars, args, tangents):
            env[v] = x
            tan[v] = t
        read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]
        read_t = lambda v: None if isinstance(v, jcore.Literal) else tan.get(v)
        for eqn in jaxpr.eqns:
            key = ctx + (id(eqn),)
            ins = [read(v) for v in eqn.invars]
            t_ins = [read_t(v) for v in eqn.invars]
            role = self.a.roles.get(key, Role.CONSTANT)
            if role is Role.INLINE:
                outs, t_outs = self._inline(eqn, ins, t_ins, key)
            elif all(t is None for t in t_ins):
                outs, t_outs = _bind(eqn, ins), None
            elif role is Role.NONLINEAR:
                # The one reverse pass only sees first derivatives of the primals, which the surrogate
                # shares with the network: φ itself will do. The tangent `φ'(sg(u))·t` is the frozen one.
                outs = _bind(eqn, ins)
                t_outs = _jvp_at(eqn, [jax.lax.stop_gradient(a) for a in ins], t_ins)[1]
            elif role is Role.LAYER and key in self.depths:
                outs, t_outs = self._chain_layer(eqn, ins, t_ins, key)
            elif role is Role.LAYER and _is_dense(eqn):
                outs, t_outs = _dense_pair(eqn, *ins, *t_ins)
            elif role is Role.LAYER:
                bind = _conv_binding(eqn)
                t_out = _bilinear_tangent(bind, eqn, ins, t_ins)
                out = bind(eqn, ins)[0]
                if eqn.primitive.name == "conv_general_dilated":
                    out = _after(out, t_out)
                outs, t_outs = [out], [t_out]
            elif role is Role.PARALLEL:
                outs = _bind(eqn, ins)
                t_outs = [_bilinear_tangent(_bind, eqn, ins, t_ins)]
            elif key in self.depths:
                outs, t_outs = _chain_bias(eqn, ins, t_ins, self.depths[key])
            else:
                outs, t_outs = _jvp_at(eqn, ins, t_ins)
            t_outs = t_outs or [None] * len(outs)
            for v, x, t in zip(eqn.outvars, outs, t_outs):
                env[v] = x
                tan[v] = t if t is not None and jnp.issubdtype(jnp.result_type(t), jnp.inexact) else None
        return [read(v) for v in jaxpr.outvars], [read_t(v) for v in jaxpr.outvars]

    def _inline(self, eqn: jcore.JaxprEqn, ins: list[Any], t_ins: list[Any],
                key: tuple[int, ...]) -> tuple[list[Any], list[Any]]:
        sub_jaxpr, sub_consts = _open(_sub_jaxpr(eqn))
        n = len(sub_jaxpr.invars)
        return self.run(sub_jaxpr, sub_consts, ins[len(ins) - n:], t_ins[len(t_ins) - n:], key)

    def _chain_layer(self, eqn: jcore.JaxprEqn, ins: list[Any], t_ins: list[Any],
                     key: tuple[int, ...]) -> tuple[list[Any], list[Any]]:
        """A layer of a chain network (`oba_jax.chain`), k perturbed layers below its output: the value
        `y = W ⊛ x` without gradient (no `c` chain), the tangent `W ⊛ (t_x + k·x) + (1 − k)·y`, whose
        value is `W ⊛ t_x + y` and whose kernel gradient `(t_x + k·x) ⋆ g` includes the primal path's."""
        w = self.a.weight_position[key]
        x, weight, t_x, t_w = ins[1 - w], ins[w], t_ins[1 - w], t_ins[w]
        operands = lambda act: [act, weight] if w == 1 else [weight, act]
        bind = _conv_binding(eqn)
        y = jax.lax.stop_gradient(bind(eqn, operands(x))[0])
        if t_w is None:  # a layer held fixed (`exclude=`): no θ_W ⊛ x term, no kernel gradient
            return [y], [bind(eqn, operands(t_x))[0]]
        k = self.depths[key]
        moved = t_x if k == 0 else k * x if t_x is None else t_x + k * x
        if moved is None:  # the first layer of a one-layer network: no second-order term
            return [y], [y]
        if _is_dense(eqn):
            t_y = _dense_pair(eqn, *operands(moved), None, None)[0][0]
        else:
            t_y = bind(eqn, operands(moved))[0]
        if k != 1:
            t_y = t_y + (1 - k) * y
        if eqn.primitive.name == "conv_general_dilated":
            y = _after(y, t_y)
        return [y], [t_y]


def _chain_bias(eqn: jcore.JaxprEqn, ins: list[Any], t_ins: list[Any], k: int) -> tuple[list[Any], list[Any]]:
    """A layer's bias add in a chain network: the value without gradient and the tangent plus
    `k·(y − sg(y))` (zero), whose gradient adds the primal path's `k·Σg` to the bias."""
    (y,), (t_y,) = _jvp_at(eqn, ins, t_ins)
    if k:
        t_y = t_y + k * (y - jax.lax.stop_gradient(y))
    return [jax.lax.stop_gradient(y)], [t_y]


def _is_dense(eqn: jcore.JaxprEqn) -> bool:
    """`a @ b`: the last axis of `a` against the first of a 2-D `b`, no batch axes, one dtype."""
    if eqn.primitive.name != "dot_general":
        return False
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    a, b = (v.aval for v in eqn.invars)
    return (not lb and not rb and b.ndim == 2 and tuple(rc) == (0,) and tuple(lc) == (a.ndim - 1,)
            and a.dtype == b.dtype == eqn.outvars[0].aval.dtype)


def _dense_pair(eqn: jcore.JaxprEqn, a, b, t_a, t_b) -> tuple[list[Any], list[Any]]:
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
        with eqn.ctx.manager:  # the matmul precision the equation was traced with
            return (_sum(c is not None and mm(c, b.T), g is not None and t_b is not None and mm(g, t_b.T)),
                    _sum(c is not None and mm(rows(a, k).T, rows(c, n)),
                         g is not None and t_a is not None and mm(rows(t_a, k).T, rows(g, n))),
                    None if t_a is None else _sum(g is not None and mm(g, b.T)),
                    None if t_b is None else _sum(g is not None and mm(rows(a, k).T, rows(g, n))))

    pair.defvjp(fwd, bwd, symbolic_zeros=True)
    with eqn.ctx.manager:
        y, t_y = pair(a, b, t_a, t_b)
    return [y], [t_y]


def _sum(*terms: Any) -> Any:
    """The sum of the terms that are arrays (a skipped term is False); None, a zero cotangent, if none."""
    live = [t for t in terms if t is not False]
    return functools.reduce(jnp.add, live) if live else None


def _conv_binding(eqn: jcore.JaxprEqn):
    # CPU: convolutions whose kernel gradient is matmuls (XLA:CPU's native one is slow).
    return bind_conv_eqn if use_fast_conv() and eqn_supported(eqn) else _bind


def _bilinear_tangent(bind, eqn: jcore.JaxprEqn, ins: list[Any], t_ins: list[Any]) -> Any:
    """`t_a ⊛ b + a ⊛ t_b` for a product that is linear in each operand."""
    terms = []
    for k, t in enumerate(t_ins):
        if t is not None:
            args = list(ins)
            args[k] = t
            terms.append(bind(eqn, args)[0])
    return _sum(*terms)


def _jvp_at(eqn: jcore.JaxprEqn, point: list[Any], t_ins: list[Any]) -> tuple[list[Any], list[Any]]:
    """The equation's value and tangent at `point`, the operands with a tangent moving."""
    live = [k for k, t in enumerate(t_ins) if t is not None]

    def f(*live_args):
        args = list(point)
        for k, a in zip(live, live_args):
            args[k] = a
        return _bind(eqn, args)

    return jax.jvp(f, [point[k] for k in live], [t_ins[k] for k in live])


def evaluate_with_tangent(analysis: _Analysis, flat_params: Sequence[Any], flat_inputs: Sequence[Any],
                          theta_idx: Sequence[int], *, chain: bool = False) -> tuple[Any, Any]:
    """Logits of the surrogate network and their tangent in the direction `sg(θ)` on `theta_idx`.

    `⟨sg(∂ℓ/∂z), tangent⟩` is `⟨∇L̃(θ), sg(θ)⟩`; its gradient with respect to θ is OBA's `H̃θ`, taken in
    reverse mode only (so the CPU fast conv's reverse-mode kernel gradient applies throughout).
    `chain=True`: if the program is a chain network (`oba_jax.chain`), the logits carry no gradient and
    the tangent's gradient is still `H̃θ`, without the primal activations' reverse chain.
    """
    closed = analysis.program.closed
    theta = set(theta_idx)
    tangents = [jax.lax.stop_gradient(p) if i in theta else None for i, p in enumerate(flat_params)]
    tangents += [None] * len(flat_inputs)
    depths = layer_depths(analysis, theta_idx) if chain else None
    (out,), (t_out,) = _TangentEvaluator(analysis, depths).run(
        closed.jaxpr, list(closed.consts), [*flat_params, *flat_inputs], tangents, ())
    return out, t_out


def _after(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a + 0·b[0]`: the values of `a`, available only once `b` is.

    XLA's schedulers otherwise put the whole primal chain of convolutions before the whole tangent
    chain; with each convolution's output waiting for its tangent the two convolutions of a layer are
    scheduled together and run concurrently (wide ResNet-20, batch 32, 2 CPU cores: about 10% less
    time). Dense layers are left alone: XLA:CPU's matmuls use both cores on their own.
    """
    return a + (jax.lax.stop_gradient(b.reshape(-1)[0]) * 0).astype(a.dtype)
