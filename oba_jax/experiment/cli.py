"""What `train.py` and `prune.py` share: one paragraph and one exit status per kind of user error.

A user error (a bad config, missing or corrupt data, a checkpoint of another model or a corrupt one, a
diverged run, a workdir another run holds, a filesystem that refuses a write, memory that runs out) ends
the run with one message on stderr, no traceback, and the status below; a genuine bug still shows its
traceback. SIGINT (Ctrl-C) and SIGTERM unwind the run the same way (locks released, no half-written
report) and end it with 130 and 143; further signals during that shutdown are ignored, so it finishes
without a traceback. The process-wide hooks a CLI wants (orbax's noise filters, warnings as one line) are
installed here, by the CLI, never by library calls.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import Any

from oba_jax.experiment.checkpoint import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    filter_orbax_noise,
)
from oba_jax.experiment.config import ConfigError
from oba_jax.experiment.data import CorruptDatasetError, DatasetNotFoundError
from oba_jax.experiment.lock import WorkdirLockedError
from oba_jax.experiment.training import TrainingDivergedError

__all__ = ["EXIT_STATUSES", "INTERRUPTED", "OUT_OF_MEMORY", "TERMINATED", "Session", "Terminated", "run_cli"]

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
TERMINATED = 143    # 128 + SIGTERM, what a shell reports for a process SIGTERM killed
OUT_OF_MEMORY = 9


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so it unwinds exactly as a Ctrl-C does."""


@dataclasses.dataclass
class Session:
    """What a CLI's body tells `run_cli` as it learns it: the config (for the out-of-memory advice) and
    whether re-running the command resumes its work (for the interruption message)."""

    config: Any = None
    resumable: bool = True


def _out_of_memory(err: BaseException) -> bool:
    """XLA's allocation failures (RESOURCE_EXHAUSTED from the device or host allocator) and Python's."""
    if isinstance(err, MemoryError):
        return True
    return type(err).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and "RESOURCE_EXHAUSTED" in str(err)


def _memory_advice(prog: str, config: Any) -> str:
    """The batch sizes a run of `config` allocates by, to name in the message."""
    keys = [("train", "batch_size"), ("train", "eval_batch_size")] + ([("prune", "score_batch_size")]
                                                                     if prog == "prune.py" else [])
    if config is None:
        return f"lower the batch sizes ({', '.join(f'{s}.{k}' for s, k in keys)}) or the model's size"
    sizes = [f"{s}.{k}={config[s][k]}" for s, k in keys if s in config and k in config[s]]
    return f"lower the batch size that was running ({', '.join(sizes)}) or the model's size, or use a device with more memory"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


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


def _install_process_hooks() -> None:
    """What a CLI process wants and a library call must not impose on a notebook: a checkpoint fall-back as
    one 'warning:' line, orbax's echoes of failed reads and writes off stderr, absl's thread tracebacks off."""
    warnings.showwarning = _show_warning
    filter_orbax_noise()
    # orbax logs its own view of a failure (thread tracebacks) before the exception reaches us
    logging.getLogger("absl").setLevel(logging.CRITICAL)


class _Signalled(Exception):
    """Marks that a signal, not the body itself, raised the interruption."""


def _stop_on(signum: int, frame: Any) -> None:
    # the first signal starts the shutdown; signals while it unwinds would interrupt the cleanup itself
    # (a traceback out of a finally block, a lock or a temporary file left behind), so they are ignored
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    err = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    err.__cause__ = _Signalled()
    raise err


def run_cli(prog: str, body: Callable[[Session], int], *, owns_process: bool = False) -> int:
    """`body(session)`'s exit status, or the status of the user error it raised (message on stderr).

    `owns_process`: the CLI is the program (its `__main__`), so it may take over SIGINT / SIGTERM and leave
    at once (`os._exit`) when orbax's threads would hold the process after a failed write. A call from
    other code (a test, a notebook) gets the statuses and messages, but keeps its signal handlers and is
    never ended under it."""
    _install_process_hooks()
    session = Session()
    takes_signals = owns_process and threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _stop_on) for s in (signal.SIGINT, signal.SIGTERM)} if takes_signals else {}
    leave = _exit_now_if_stuck if owns_process else (lambda status: None)
    signalled = False
    try:
        return body(session)
    except KeyboardInterrupt as err:
        signalled = isinstance(err.__cause__, _Signalled)
        terminated = isinstance(err, Terminated)
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        then = ("the last checkpoint is kept, re-run the same command to resume" if session.resumable
                else "nothing was written; re-run the command to start again")
        print(f"{prog}: {what}; {then}", file=sys.stderr)
        status = TERMINATED if terminated else INTERRUPTED
        leave(status)
        return status
    except tuple(kind for kind, _, _ in EXIT_STATUSES) as err:
        for kind, status, label in EXIT_STATUSES:
            if isinstance(err, kind):
                print(f"{prog}: {label}: {_describe(err)}", file=sys.stderr)
                leave(status)
                return status
        raise
    except Exception as err:
        if not _out_of_memory(err):
            raise
        print(f"{prog}: out of memory: {_first_line(err).rstrip('.')}; {_memory_advice(prog, session.config)}",
              file=sys.stderr)
        leave(OUT_OF_MEMORY)
        return OUT_OF_MEMORY
    finally:
        warnings.showwarning = _default_show
        if not signalled:   # after a signal, one more during the exit must not raise a traceback either
            for s, handler in previous.items():
                signal.signal(s, handler)
