"""What `train.py` and `prune.py` share: one paragraph and one exit status per kind of user error.

A user error (a bad config, missing or corrupt data, a checkpoint of another model or a corrupt one, a
diverged run, a workdir another run holds, a filesystem that refuses a write) ends the run with one
message on stderr, no traceback, and the status below; a genuine bug still shows its traceback.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable

from oba_jax.experiment.checkpoint import CheckpointMismatchError, CorruptCheckpointError, CorruptCheckpointWarning
from oba_jax.experiment.config import ConfigError
from oba_jax.experiment.data import CorruptDatasetError, DatasetNotFoundError
from oba_jax.experiment.lock import WorkdirLockedError
from oba_jax.experiment.training import TrainingDivergedError

__all__ = ["EXIT_STATUSES", "run_cli"]

# (exception, exit status, what the message starts with); the first that matches wins
EXIT_STATUSES: tuple[tuple[type[BaseException], int, str], ...] = (
    (ConfigError, 2, "invalid configuration"),
    (DatasetNotFoundError, 3, "dataset missing"),
    (CorruptDatasetError, 3, "dataset file corrupt"),
    (CheckpointMismatchError, 4, "checkpoint of another model"),
    (CorruptCheckpointError, 5, "checkpoint corrupt"),
    (TrainingDivergedError, 6, "training diverged"),
    (WorkdirLockedError, 7, "workdir in use"),
    (OSError, 8, "file system error"),
)
INTERRUPTED = 130


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # A checkpoint fall-back is news for the user, not a code location.
    if issubclass(category, CorruptCheckpointWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _default_show(message, category, filename, lineno, file, line)


_default_show = warnings.showwarning


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename and str(err.filename) not in str(err.strerror or ""):
        return f"{err.strerror or err} ({err.filename})" + (f" → {err.filename2}" if err.filename2 else "")
    return str(err)


def _exit_now_if_stuck(status: int) -> None:
    """After a failed checkpoint write, orbax's background threads wait 300 s for a signal that never comes
    and keep the process alive: with the message printed and the last good checkpoint on disk, leave."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """`body()`'s exit status, or the status of the user error it raised (message on stderr)."""
    warnings.showwarning = _show_warning
    # orbax logs its own view of a failure (thread tracebacks) before the exception reaches us
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    try:
        return body()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the last checkpoint is kept, re-run the same command to resume",
              file=sys.stderr)
        _exit_now_if_stuck(INTERRUPTED)
        return INTERRUPTED
    except tuple(kind for kind, _, _ in EXIT_STATUSES) as err:
        for kind, status, label in EXIT_STATUSES:
            if isinstance(err, kind):
                print(f"{prog}: {label}: {_describe(err)}", file=sys.stderr)
                _exit_now_if_stuck(status)
                return status
        raise
    finally:
        warnings.showwarning = _default_show
