"""What `train.py` and `prune.py` share: one paragraph and one exit status per kind of user error.

A user error (a bad config, missing or corrupt data, a checkpoint of another model or a corrupt one, a
diverged run, a workdir another run holds, a filesystem that refuses a write, memory that runs out) ends
the run with one message on stderr, no traceback, and the status below; a genuine bug still shows its
traceback. SIGINT (Ctrl-C) and SIGTERM unwind the run the same way (locks released, no half-written
report) and end it with 130 and 143; further signals during that shutdown are ignored, so it finishes
without a traceback, and a shutdown that does not finish within `shutdown_grace_s()` (a wait inside a
library that a signal interrupted at the wrong moment) is ended there with the same status and message. The process-wide hooks a CLI wants (orbax's noise filters, warnings as one line) are
installed here, by the CLI, never by library calls.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import os
import signal
import sys
import threading
import time
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

__all__ = ["EXIT_STATUSES", "INTERRUPTED", "OUT_OF_MEMORY", "SHUTDOWN_GRACE_ENV", "TERMINATED", "Session",
           "Terminated", "run_cli", "shutdown_grace_s"]

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
# A cluster scheduler sends SIGKILL some tens of seconds after SIGTERM (SLURM's KillWait: 30 s); a checkpoint
# write in flight normally finishes well within this, and a shutdown still running after it is stuck.
SHUTDOWN_GRACE_ENV = "OBA_JAX_SHUTDOWN_GRACE_S"
_DEFAULT_SHUTDOWN_GRACE_S = 60.0


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


def _raise_is_swallowed(frame: Any) -> bool:
    """Whether an exception raised in `frame` would be printed and dropped ("Exception ignored in …"): a
    gc callback or a finaliser (`__del__`) is on the stack. A SIGTERM raised inside jax's `_xla_gc_callback`
    was lost that way, and the run went on training (the CI hang of the signal test)."""
    callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _stop_on(signum: int, frame: Any) -> None:
    if _raise_is_swallowed(frame):
        # raising here would print a traceback and lose the interrupt; the shutdown watch (`_watch_shutdown`,
        # started by the same signal through the wakeup fd) ends the run after the grace period instead
        # (re-delivering the signal with `_thread.interrupt_main` did not get it out of the callback)
        return
    # the first signal starts the shutdown; signals while it unwinds would interrupt the cleanup itself
    # (a traceback out of a finally block, a lock or a temporary file left behind), so they are ignored
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    err = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    err.__cause__ = _Signalled()
    raise err


def shutdown_grace_s() -> float:
    """Seconds a signalled CLI may take to shut down: $OBA_JAX_SHUTDOWN_GRACE_S, else 60."""
    text = os.environ.get(SHUTDOWN_GRACE_ENV, "")
    try:
        grace = float(text) if text.strip() else _DEFAULT_SHUTDOWN_GRACE_S
    except ValueError:
        grace = -1.0
    if not grace > 0 or grace == float("inf"):
        raise ConfigError(f"${SHUTDOWN_GRACE_ENV}: must be a positive number of seconds, got {text!r}")
    return grace


def _describe_signal(signum: int) -> tuple[str, int]:
    """(what the message says, exit status) of a run ended by `signum`."""
    return ("terminated (SIGTERM)", TERMINATED) if signum == signal.SIGTERM else ("interrupted", INTERRUPTED)


def _interruption_message(prog: str, signum: int, session: Session) -> str:
    then = ("the last checkpoint is kept, re-run the same command to resume" if session.resumable
            else "nothing was written; re-run the command to start again")
    return f"{prog}: {_describe_signal(signum)[0]}; {then}"


def _watch_shutdown(prog: str, session: Session, told: threading.Event, grace: float) -> Callable[[], None]:
    """Ends the process `grace` seconds after the first SIGINT / SIGTERM if it is still alive then.

    The signal is seen through `signal.set_wakeup_fd`, which the interpreter writes to as the signal arrives,
    so the clock starts even when the main thread is held in native code and the Python handler has not run.
    Returns the function that stops watching (the run ended without a signal)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch() -> None:
        signum = None
        while signum not in (signal.SIGINT, signal.SIGTERM):   # another handled signal (a library's) is not a stop
            try:
                byte = os.read(read_end, 1)
            except OSError:
                return
            if not byte:   # the write end closed: the run ended without a signal
                return
            signum = byte[0]
        time.sleep(grace)
        if not told.is_set():
            print(_interruption_message(prog, signum, session)
                  + f" (the shutdown did not finish within {grace:g} s, so it was cut short there)", file=sys.stderr)
        sys.stderr.flush()
        os._exit(_describe_signal(signum)[1])

    threading.Thread(target=watch, name="oba-jax-shutdown-watch", daemon=True).start()

    def stop() -> None:
        signal.set_wakeup_fd(previous_fd)
        os.close(write_end)

    return stop


def run_cli(prog: str, body: Callable[[Session], int], *, owns_process: bool = False) -> int:
    """`body(session)`'s exit status, or the status of the user error it raised (message on stderr).

    `owns_process`: the CLI is the program (its `__main__`), so it may take over SIGINT / SIGTERM and leave
    at once (`os._exit`) when orbax's threads would hold the process after a failed write. A call from
    other code (a test, a notebook) gets the statuses and messages, but keeps its signal handlers and is
    never ended under it."""
    _install_process_hooks()
    session = Session()
    takes_signals = owns_process and threading.current_thread() is threading.main_thread()
    told = threading.Event()     # the interruption message is out
    stop_watching: Callable[[], None] = lambda: None
    previous: dict = {}
    leave = _exit_now_if_stuck if owns_process else (lambda status: None)
    signalled = False
    try:
        if takes_signals:
            stop_watching = _watch_shutdown(prog, session, told, shutdown_grace_s())
            previous = {s: signal.signal(s, _stop_on) for s in (signal.SIGINT, signal.SIGTERM)}
        return body(session)
    except KeyboardInterrupt as err:
        signalled = isinstance(err.__cause__, _Signalled)
        signum = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
        print(_interruption_message(prog, signum, session), file=sys.stderr)
        told.set()
        status = _describe_signal(signum)[1]
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
            stop_watching()  # after a signal the watch stays, bounding the interpreter's own exit too
