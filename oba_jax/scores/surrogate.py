"""The OBA surrogate network: the traced program re-evaluated with every nonlinearity linearised.

OBA_SPEC.md §2: replace every non-bilinear op φ by `sg(φ(u)) + jvp(φ, sg(u); u − sg(u))` (same value and
first derivative, zero second derivative), keep parameter layers and parallel products exact. The
Hessian of `Σ sg(∂ℓ/∂z)·z̃` is then exactly OBA's H̃. With `linearise_parallel=True` the parallel products
are linearised too, which leaves only the series part. This construction serves `parts=True` and the
non-unit deltas (forward-over-reverse HVPs, `oba_jax.scores.oba`); the default score evaluates the same
surrogate with its tangent written out (`oba_jax.scores.tangent`).

With `probes` the evaluator also adds, for every layer, `P ⊛ sg(T)` to the layer's product, where T is a
given tangent of the layer's input and P the layer's view of a zero-valued probe of its weight leaf;
the gradient with respect to P is then `Tᵀ g`, the downward part's kernel.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from oba_jax.graph import Analysis, Role
from oba_jax.program import Equation, EqnKey, bind, run
from oba_jax.scores.convs import bind_conv_eqn, conv_binding

__all__ = ["evaluate", "jvp_at"]


def jvp_at(eqn: Equation, point: list[Any], t_ins: list[Any]) -> tuple[list[Any], list[Any]]:
    """The equation's value and tangent at `point`, the operands with a tangent (not None) moving."""
    live = [k for k, t in enumerate(t_ins) if t is not None]

    def f(*live_args):
        args = list(point)
        for k, a in zip(live, live_args):
            args[k] = a
        return bind(eqn, args)

    return jax.jvp(f, [point[k] for k in live], [t_ins[k] for k in live])


def _linearised(eqn: Equation, args: list[Any], deps: Sequence[bool]) -> list[Any]:
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
        return bind(eqn, full(dyn_args))

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
        return out, jvp_at(eqn, full([jax.lax.stop_gradient(p) for p in primals]), moving)[1]

    return list(frozen(*[args[i] for i in dyn]))


def _series_product(eqn: Equation, args: list[Any]) -> list[Any]:
    """`a·b ↦ sg(a)·b + a·sg(b) − sg(a)·sg(b)`: the product's first-order expansion."""
    a, b = args[0], args[1]
    sa, sb = jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
    left = bind(eqn, [sa, b])[0]
    right = bind(eqn, [a, sb])[0]
    both = bind(eqn, [sa, sb])[0]
    return [left + right - both]


def index_leading(x: Any, i: int) -> Any:
    """`x[i]` (an unrolled scan's slice of a scanned-over array)."""
    return jax.lax.index_in_dim(x, i, 0, keepdims=False)


class _Surrogate:
    """Rules: arrays in, arrays out; layers and parallel products exact, nonlinearities linearised."""

    def __init__(self, analysis: Analysis, *, linearise_parallel: bool, probes: dict[str, Any] | None,
                 probe_tangents: dict[str, Any] | None, record_inputs: dict[str, Any] | None, forward_mode: bool):
        self.analysis = analysis
        self.forward_mode = forward_mode
        self.linearise_parallel = linearise_parallel
        self.probes = probes
        self.probe_tangents = probe_tangents
        self.record_inputs = record_inputs
        self.layer_calls: dict[str, int] = {}

    def constant(self, value: Any) -> Any:
        return value

    def enter(self, eqn: Equation, key: EqnKey, ins: list[Any]) -> bool:
        return self.analysis.role(key) is Role.CALL

    def index(self, value: Any, i: int) -> Any:
        return index_leading(value, i)

    def stack(self, values: list[Any]) -> Any:
        return jnp.stack(values)

    def equation(self, eqn: Equation, key: EqnKey, ins: list[Any]) -> list[Any]:
        role = self.analysis.role(key)
        if role is Role.NONLINEAR:
            return _linearised(eqn, ins, self.analysis.nonlinear_deps[key])
        if role is Role.PARALLEL and self.linearise_parallel:
            return _series_product(eqn, ins)
        if role is Role.LAYER:
            return self._layer(eqn, ins, key)
        return bind(eqn, ins)

    def _layer(self, eqn: Equation, ins: list[Any], key: EqnKey) -> list[Any]:
        use = self.analysis.uses[key]
        path = self.analysis.program.paths[use.weight_leaf]
        binding = conv_binding(eqn)
        if binding is bind_conv_eqn:
            binding = functools.partial(bind_conv_eqn, forward_mode=self.forward_mode)
        out = binding(eqn, ins)
        call = self.layer_calls.get(path, 0)
        self.layer_calls[path] = call + 1
        w_pos = use.weight_position
        if self.record_inputs is not None:
            self.record_inputs.setdefault(path, []).append(ins[1 - w_pos])
        if self.probes is not None and path in self.probes:
            if use.steps is None:
                raise NotImplementedError(
                    f"parts=True: the weight of layer {use.layer!r} is read from {path!r} through constants that "
                    "cannot be recomputed outside the program; score without parts")
            tangent = jax.lax.stop_gradient(self.probe_tangents[path][call])
            w_view = self.probes[path]
            for step in use.steps:
                w_view = step(w_view)
            probe_args = list(ins)
            probe_args[1 - w_pos] = tangent
            probe_args[w_pos] = w_view
            out = [out[0] + binding(eqn, probe_args)[0]]
        return out


def evaluate(analysis: Analysis, flat_params: Sequence[Any], flat_inputs: Sequence[Any], *,
             linearise_parallel: bool = False, probes: dict[str, Any] | None = None,
             probe_tangents: dict[str, Any] | None = None,
             record_inputs: dict[str, Any] | None = None, forward_mode: bool = False) -> Any:
    """Logits of the surrogate network at `flat_params` (all leaves) on `flat_inputs`.

    `forward_mode=True` when the caller differentiates only with `jax.jvp` (the CPU fast conv is
    reverse-mode only; see `oba_jax.fastconv`).
    """
    program = analysis.program
    rules = _Surrogate(analysis, linearise_parallel=linearise_parallel, probes=probes,
                       probe_tangents=probe_tangents, record_inputs=record_inputs, forward_mode=forward_mode)
    (out,) = run(program.jaxpr, program.consts, [*flat_params, *flat_inputs], rules)
    return out
