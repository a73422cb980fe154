"""Training under fixed masks: an optax transformation and a jaxpruner-style updater.

`masked_optimizer(tx, masks)` runs `tx` (weight decay, momentum, schedule: all of it) and then replaces
the update of every pruned entry by `-param`, so `optax.apply_updates` leaves it exactly 0 — also when
the parameters were not masked beforehand, and whatever the momentum trace holds. The masks live in the
optimizer state (`MaskedState.masks`), so they are checkpointed and restored with it.

`MaskUpdater` offers the interface of jaxpruner's updaters (`wrap_optax`, `instant_sparsify`,
`pre_forward_update`, `post_gradient_update`), which EasyDeL's trainer calls through its
`pruning_module` hook, so code written for jaxpruner can train with OBA masks unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from oba_jax.unstructured.masks import apply_masks, check_masks

__all__ = ["MaskUpdater", "MaskedState", "masked_optimizer"]


class MaskedState(NamedTuple):
    inner_state: Any
    masks: Any


def _masked_updates(updates: Any, masks: Any, params: Any) -> Any:
    if params is None:
        return jax.tree_util.tree_map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, masks)
    return jax.tree_util.tree_map(lambda u, m, p: jnp.where(m, u, -p.astype(u.dtype)), updates, masks, params)


def masked_optimizer(tx: optax.GradientTransformation, masks: Any) -> optax.GradientTransformation:
    """`tx` whose updates keep every entry with mask False exactly zero (use it last, around the whole chain).

    `masks`: a bool pytree with the structure of the parameters (True = kept), e.g. from
    `oba_jax.unstructured_masks`; checked against the parameters at `init`.
    """
    def init(params):
        check_masks(masks, params)
        return MaskedState(tx.init(params), jax.tree_util.tree_map(jnp.asarray, masks))

    def update(updates, state, params=None):
        new_updates, inner = tx.update(updates, state.inner_state, params)
        return _masked_updates(new_updates, state.masks, params), MaskedState(inner, state.masks)

    return optax.GradientTransformation(init, update)


def _find_masks(opt_state: Any) -> Any:
    """The masks of the first `MaskedState` in an optimizer state (it may be wrapped by other transforms)."""
    if isinstance(opt_state, MaskedState):
        return opt_state.masks
    if isinstance(opt_state, (tuple, list)):
        for item in opt_state:
            found = _find_masks(item)
            if found is not None:
                return found
    return None


@dataclasses.dataclass
class MaskUpdater:
    """jaxpruner's updater interface over fixed masks (e.g. `MaskUpdater(oba_jax.unstructured_masks(...))`).

    `wrap_optax(tx)` → `masked_optimizer(tx, masks)`; `instant_sparsify(params)` → `(masked params, masks)`;
    `pre_forward_update` / `post_gradient_update(params, opt_state)` → params with the masks (from the
    optimizer state when it holds them) applied.
    """

    masks: Any

    def wrap_optax(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        return masked_optimizer(tx, self.masks)

    def instant_sparsify(self, params: Any, grads: Any = None) -> tuple[Any, Any]:
        del grads   # the masks are fixed: OBA scores come from data, not from one gradient
        return apply_masks(params, self.masks), self.masks

    def pre_forward_update(self, params: Any, opt_state: Any) -> Any:
        masks = _find_masks(opt_state)
        return apply_masks(params, self.masks if masks is None else masks)

    def post_gradient_update(self, params: Any, opt_state: Any) -> Any:
        return self.pre_forward_update(params, opt_state)
