"""One run per workdir: an exclusive lock on `WORKDIR/.lock`, held for the run's lifetime.

The lock is an advisory `flock` on the file, so the kernel releases it when the holder dies, however it
dies (SIGKILL included): a lock file left by a dead run is simply taken over. The file records who holds
it (pid, host, start time, command), so a refused run can name the holder. Locks are re-entrant within a
process (`prune.py` locks its workdir and fine-tunes into it).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator

__all__ = ["LOCK_FILE", "WorkdirLockedError", "reading_lock", "workdir_lock"]

LOCK_FILE = ".lock"
_HELD: dict[str, list] = {}   # realpath of a lock file -> [open file, depth]


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir."""


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('start')} "
                f"({info.get('command', '?')})")
    except (OSError, ValueError):
        return "a process that has not written its details yet"


def _is_writer() -> bool:
    from oba_jax.experiment.hosts import is_writer   # (deferred: imported by config checks, before any backend)
    return is_writer()


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[str]:
    """Holds `workdir/.lock` (creating the workdir) for the duration; `WorkdirLockedError` naming the
    holder if another process has it. Yields the lock file's path."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise NotADirectoryError(errno.ENOTDIR, "--workdir names an existing file, not a directory", workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
    if not _is_writer():   # one run of several processes: process 0 holds the lock for all of them
        yield path
        return
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield path
        finally:
            _HELD[path][1] -= 1
        return
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise WorkdirLockedError(
            f"{os.path.abspath(workdir)} is in use by another run: {_holder(path)}. Wait for it to finish, or use "
            "another --workdir") from None
    except OSError as e:   # a filesystem without flock: run unlocked rather than not at all
        print(f"warning: cannot lock {path} ({e}); not protected against a second run", file=sys.stderr)
    f.seek(0)
    f.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(),
               "start": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:500]}, f)
    f.flush()
    _HELD[path] = [f, 1]
    try:
        yield path
    finally:
        del _HELD[path]
        f.close()   # closing releases the flock; the file stays (a later run takes it over)


@contextlib.contextmanager
def reading_lock(workdir: str, what: str = "the workdir") -> Iterator[None]:
    """A shared `flock` on `workdir/.lock` while another run's outputs are read (`prune.pretrained`): refused
    with `WorkdirLockedError` naming the holder while a run holds the workdir (a train.py still writing it
    would be read at whichever step is newest), and a run that starts on it meanwhile is refused in turn.
    Writes nothing: a read-only workdir, or one without a lock file (never run by train.py), reads unlocked."""
    path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
    if not _is_writer():   # one run of several processes: process 0 holds the locks for all of them
        yield
        return
    if path in _HELD or not os.path.isfile(path):   # held by this process (re-entrant), or no run ever held it
        yield
        return
    try:
        f = open(path)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirLockedError(
                f"{what} {os.path.abspath(workdir)} is in use by another run, which may still be writing it: "
                f"{_holder(path)}. Wait for it to finish") from None
        except OSError:   # a filesystem without flock
            pass
        yield
    finally:
        f.close()
