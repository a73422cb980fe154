"""The processes of one run (`train.distributed`): which one writes files, and decisions made once.

Every process of a multi-host run executes the same program; files are written by process 0 alone, and
what depends on the file system (reuse a stage or start it) is decided by process 0 and broadcast, so that
the processes never take different paths (which would leave their collectives waiting for each other).
With one process all of this is the plain single-process behaviour.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from oba_jax.experiment.config import ConfigError

__all__ = ["decided_once", "is_writer"]


def is_writer() -> bool:
    """Whether this process writes the run's files (reports, plots, manifests, scores): process 0."""
    return jax.process_index() == 0


def decided_once(decide: Callable[[], int], refused: str) -> int:
    """`decide()` (a non-negative int) run by process 0 and broadcast to every process. An exception in
    process 0 is raised there and, as a `ConfigError` naming `refused` (one line, status 2), in the others."""
    if jax.process_count() == 1:
        return decide()
    from jax.experimental import multihost_utils
    failure, value = None, 0
    if is_writer():
        try:
            value = decide()
        except Exception as err:  # broadcast first, so that the other processes do not wait forever
            failure, value = err, -1
    value = int(multihost_utils.broadcast_one_to_all(np.int32(value)))
    if failure is not None:
        raise failure
    if value < 0:
        raise ConfigError(f"process 0 refused {refused}; its message says why")
    return value
