"""Which implementation a traced convolution is evaluated with: the CPU fast conv where it applies."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from oba_jax import fastconv
from oba_jax.program import Equation, bind, bind_with

__all__ = ["bind_conv_eqn", "conv_binding", "eqn_supported"]

_CONV_KWARGS = ("window_strides", "padding", "lhs_dilation", "rhs_dilation", "dimension_numbers",
                "feature_group_count", "batch_group_count", "precision", "preferred_element_type")


def eqn_supported(eqn: Equation) -> bool:
    """Whether a traced `conv_general_dilated` equation takes the fast path."""
    if eqn.primitive.name != "conv_general_dilated" or eqn.params.get("out_sharding") is not None:
        return False
    lhs, rhs = (v.aval for v in eqn.invars)
    return fastconv.is_supported(lhs.shape, rhs.shape, **{k: eqn.params[k] for k in _CONV_KWARGS})


def bind_conv_eqn(eqn: Equation, args: Sequence[Any], *, forward_mode: bool = False) -> list[Any]:
    """Evaluates a supported `conv_general_dilated` equation with the fast conv
    (`forward_mode=True`: its plain forward, for `jax.jvp` through it)."""
    conv = fastconv.conv_general_dilated_forward if forward_mode else fastconv.conv_general_dilated_fast
    return [bind_with(eqn, conv, *args, **{k: eqn.params[k] for k in _CONV_KWARGS})]


def conv_binding(eqn: Equation) -> Callable[[Equation, Sequence[Any]], list[Any]]:
    """`bind_conv_eqn` where the fast conv applies (CPU: XLA:CPU's kernel gradient is slow), else `bind`."""
    return bind_conv_eqn if fastconv.use_fast_conv() and eqn_supported(eqn) else bind
