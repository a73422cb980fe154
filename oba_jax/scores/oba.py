"""OBA's per-batch score `θ ⊙ H̃θ` (OBA_SPEC.md §2), with its parts and the first-order term.

* default: one reverse pass over the written-out tangent (`oba_jax.scores.tangent`):
  `H̃θ = ∇_θ ⟨∇L̃(θ), sg(θ)⟩`;
* `parts=True` or non-unit deltas: forward-over-reverse HVPs of the surrogate (`oba_jax.scores.surrogate`):
  the total, the series part (parallel products linearised), the downward part (probes), and
  upward = series − downward, parallel = total − series, each scaled by its delta squared.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from oba_jax.graph import Analysis
from oba_jax.scores.surrogate import evaluate
from oba_jax.scores.tangent import evaluate_with_tangent

__all__ = ["ObaSetup", "oba_batch"]

LossFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ObaSetup:
    """What OBA's per-batch function is built from."""

    analysis: Analysis
    loss: LossFn
    parts: bool = False
    first_order: bool = False
    deltas: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @property
    def theta_idx(self) -> tuple[int, ...]:
        return self.analysis.theta


def _replace(flat: Sequence[Any], idx: Sequence[int], new: Sequence[Any]) -> list[Any]:
    full = list(flat)
    for i, x in zip(idx, new):
        full[i] = x
    return full


def _surrogate_loss(setup: ObaSetup, flat: Sequence[Any], x: Sequence[Any], labels: jax.Array,
                    theta: Sequence[Any], **evaluate_kwargs: Any) -> jax.Array:
    """`Σ sg(∂ℓ/∂z)·z̃(θ)`: the loss linearised at the logits of the surrogate network."""
    z = evaluate(setup.analysis, _replace(flat, setup.theta_idx, theta), x, **evaluate_kwargs)
    gz = jax.grad(setup.loss)(jax.lax.stop_gradient(z), labels)
    return jnp.sum(jax.lax.stop_gradient(gz) * z)


def _oba_total(setup: ObaSetup, flat: Sequence[Any], x: Sequence[Any], labels: jax.Array) -> dict[str, list]:
    """`θ ⊙ H̃θ` as the gradient of `⟨∇L̃(θ), sg(θ)⟩`, the tangent written out (reverse over forward)."""
    theta = [flat[i] for i in setup.theta_idx]

    def objectives(th, chain=False):
        """`⟨∇L̃, sg(θ)⟩` and the linearised loss `Σ sg(∂ℓ/∂z)·z` (whose gradient is g)."""
        z, tz = evaluate_with_tangent(setup.analysis, _replace(flat, setup.theta_idx, th), x, setup.theta_idx,
                                      chain=chain)
        gz = jax.lax.stop_gradient(jax.grad(setup.loss)(jax.lax.stop_gradient(z), labels))
        return jnp.sum(gz * tz), jnp.sum(gz * z)

    if not setup.first_order:
        # g is not needed: on a chain network the logits may lose their gradient (`oba_jax.scores.chain`).
        hv = jax.grad(lambda th: objectives(th, chain=True)[0])(theta)
        return {"total": [t * h for t, h in zip(theta, hv)]}
    (directional, loss_lin), pullback = jax.vjp(objectives, theta)
    (hv,) = pullback((jnp.ones_like(directional), jnp.zeros_like(loss_lin)))
    (g,) = pullback((jnp.zeros_like(directional), jnp.ones_like(loss_lin)))
    # Removing θ_i is the step δθ_i = −θ_i: the first-order change of the loss is −θ_i·g_i.
    return {"total": [t * h - t * gi for t, h, gi in zip(theta, hv, g)]}


def oba_batch(setup: ObaSetup, flat: Sequence[Any], x: Sequence[Any], labels: jax.Array) -> dict[str, list]:
    """OBA's scores of one batch: `{"total": [...]}` (plus the parts), one array per θ leaf."""
    if not setup.parts and setup.deltas == (1.0, 1.0, 1.0):
        return _oba_total(setup, flat, x, labels)
    theta = [flat[i] for i in setup.theta_idx]
    grad_fn = jax.grad(lambda th: _surrogate_loss(setup, flat, x, labels, th))
    g, hv = jax.jvp(grad_fn, (theta,), (theta,))
    total = [t * h for t, h in zip(theta, hv)]
    out: dict[str, list] = {}
    if setup.analysis.graph.parallel:
        series_grad = jax.grad(lambda th: _surrogate_loss(setup, flat, x, labels, th, linearise_parallel=True))
        _, hv_s = jax.jvp(series_grad, (theta,), (theta,))
        series = [t * h for t, h in zip(theta, hv_s)]
    else:
        series = total
    down = _downward(setup, flat, x, labels, theta)
    up = [s - d for s, d in zip(series, down)]
    par = [a - s for a, s in zip(total, series)]
    du, dd, dp = (d * d for d in setup.deltas)
    out.update(upward=[du * u for u in up], downward=[dd * d for d in down], parallel=[dp * p for p in par])
    total = [u + d + p for u, d, p in zip(out["upward"], out["downward"], out["parallel"])]
    if setup.first_order:
        # Removing θ_i is the step δθ_i = −θ_i: the first-order change of the loss is −θ_i·g_i.
        total = [s - t * gi for s, t, gi in zip(total, theta, g)]
    out["total"] = total
    return out


def _downward(setup: ObaSetup, flat: Sequence[Any], x: Sequence[Any], labels: jax.Array,
              theta: Sequence[Any]) -> list[Any]:
    """`W_l ⊙ (T_lᵀ g_l)`: the forward tangent T of each layer's input contracted with its output gradient."""
    analysis = setup.analysis

    def layer_inputs(th):
        rec: dict[str, list] = {}
        evaluate(analysis, _replace(flat, setup.theta_idx, th), x, record_inputs=rec, forward_mode=True)
        return rec

    _, tangents = jax.jvp(layer_inputs, (list(theta),), (list(theta),))
    paths = analysis.program.paths
    weight_paths = {leaf: paths[leaf] for leaf in analysis.found.weight_leaves.values()}
    probes = {path: jnp.zeros_like(flat[i]) for i, path in weight_paths.items()}

    def probed_loss(p):
        return _surrogate_loss(setup, flat, x, labels, theta, probes=p, probe_tangents=tangents)

    kernels = jax.grad(probed_loss)(probes)
    return [t * kernels[weight_paths[i]] if i in weight_paths else jnp.zeros_like(t)
            for i, t in zip(setup.theta_idx, theta)]
