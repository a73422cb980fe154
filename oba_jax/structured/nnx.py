"""Structured pruning of Flax NNX models: channel groups with paths relative to the model."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from flax import nnx

from oba_jax.graph import ChannelGroup, channel_groups
from oba_jax.scores import model_apply

__all__ = ["model_channel_groups", "model_path", "state_path"]

_PARAMS = "params/"


def model_path(path: str) -> str:
    """A leaf path of the model's `ModelState` as the model's user sees it: `nnx.Param` leaves relative
    to the parameters (`"conv1/kernel"`, as `score_model` names them), others keep their collection
    (`"batch_stats/bn1/mean"`)."""
    return path[len(_PARAMS):] if path.startswith(_PARAMS) else path


def state_path(path: str) -> str:
    """Inverse of `model_path`."""
    return path if path.startswith(("batch_stats/", "rest/")) else _PARAMS + path


def _relative(group: ChannelGroup) -> ChannelGroup:
    members = tuple(dataclasses.replace(m, path=model_path(m.path)) for m in group.members)
    name = model_path(group.name)
    return dataclasses.replace(group, name=name, members=members, producers=tuple(map(model_path, group.producers)))


def model_channel_groups(model: nnx.Module, example_inputs: Any, ignore: Sequence[str] = (),
                         bn_mode: str = "train") -> tuple[ChannelGroup, ...]:
    """`channel_groups` of an NNX model; paths as `model_path` gives them (`ignore` in those terms)."""
    apply_fn, state = model_apply(model, bn_mode)
    groups = channel_groups(apply_fn, state, example_inputs, ignore=tuple(state_path(p) for p in ignore))
    return tuple(_relative(g) for g in groups)
