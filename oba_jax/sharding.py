"""The data mesh: a 1-D mesh named `data` over every (global) device; batches are split along it,
everything else is replicated. Training and scoring both place their arrays with these functions."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["AXIS", "batch_sharded", "data_mesh", "put_replicated", "replicated", "scoring_sharding"]

AXIS = "data"


def data_mesh(devices: list | None = None) -> Mesh:
    """1-D mesh named `data` over `devices` (default: every global device)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, *, leading_batch_count: bool = False) -> NamedSharding:
    """The batch axis split over the mesh (`leading_batch_count`: arrays of shape (num_batches, batch, ...))."""
    return NamedSharding(mesh, PartitionSpec(None, AXIS) if leading_batch_count else PartitionSpec(AXIS))


def scoring_sharding(batch_size: int, *, stacked: bool) -> NamedSharding | None:
    """How scoring places a batch: split over every device when there are several and they divide the
    batch; None (left where it is) otherwise."""
    n = jax.device_count()
    if n == 1 or batch_size % n:
        return None
    return batch_sharded(data_mesh(), leading_batch_count=stacked)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree on every device of `mesh` (works across hosts: each host fills its own shards)."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)
