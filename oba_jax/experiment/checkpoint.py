"""Orbax checkpoints of a training run: architecture spec + arrays + optimizer + data position.

Layout of ``WORKDIR/checkpoints/<step>/`` (one orbax ``CheckpointManager`` step, written to a
temporary directory and renamed when complete, so a killed run never leaves a half checkpoint):

- ``model``: params and batch stats, a flat dict ``{"params/layers/0/conv/kernel": array, ...}`` keyed by
  the leaf paths of `oba_jax.paths`;
- ``train``: optimizer state and step, flat the same way (leaf names from the pytree paths);
- ``meta`` (JSON): ``spec`` (``models.spec_to_dict``), ``config``, ``data_position``
  (epoch, step_in_epoch), ``step``, anything extra (e.g. accumulated wall time) and ``checksums``
  (``{"model": {name: {"crc32", "dtype", "shape"}}, "train": {...}}``, one per array, taken at save time);
- ``input`` (streamed training data only): Grain's orbax handler's files, one JSON per process
  (``process_<i>-of-<n>.json``), the state of that process's input iterator (`oba_jax.experiment.streaming`).

Arrays are stored flat and restored by unflattening into a template pytree, which keeps the
files readable and independent of how NNX/optax register their pytrees.
:func:`restore_model` needs only the stored spec, so it works in a fresh process.

Every restore checks each array against its stored checksum (checkpoints written before checksums
existed are accepted unchecked). A step whose files cannot be read or whose arrays do not match is
corrupt (:class:`CorruptCheckpointError`, one message naming the step directory and the file or
array); without an explicit step the restore falls back to the newest intact step with a
:class:`CorruptCheckpointWarning` naming the corrupt step(s) and the one restored.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import re
import sys
import warnings
import zlib
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from oba_jax import nnx_model
from oba_jax.paths import flat_by_path, unflatten_by_path
from oba_jax.sharding import data_mesh, replicated

CHECKPOINT_DIR = "checkpoints"
MAX_TO_KEEP = 2
META_FILE = "metadata"  # orbax JsonSave's file name inside <step>/meta/
CHECKSUMS_KEY = "checksums"
CORRUPT_SUFFIX = ".corrupt"
ITEMS = ("model", "train", "meta", "input")


class CheckpointMismatchError(ValueError):
    """The checkpoint in a workdir belongs to a different model than the one being trained."""


class CorruptCheckpointError(ValueError):
    """A checkpoint's files cannot be read or its arrays do not match the checksums stored at save time.

    The message is one paragraph naming the step directory and, where it is known, the file or array.
    """


class CorruptCheckpointWarning(UserWarning):
    """A corrupt newest checkpoint was skipped in favour of an older intact one (the message names both steps)."""


def checkpoint_dir(workdir: str) -> str:
    """``workdir/checkpoints`` as an absolute path (orbax requires absolute paths)."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, *, max_to_keep: int = MAX_TO_KEEP) -> ocp.CheckpointManager:
    """A CheckpointManager for ``workdir/checkpoints`` keeping the newest ``max_to_keep`` steps."""
    # cleanup_tmp_directories: a killed run may leave an unfinished tmp step dir; drop it on restart.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def flatten_named(tree: Any, prefix: str) -> dict[str, Any]:
    """``{"prefix/a/0/b": leaf}``: one name per leaf, the leaf paths of `oba_jax.paths`."""
    return flat_by_path(tree, prefix)


def unflatten_named(template: Any, prefix: str, flat: Mapping[str, Any]) -> Any:
    """Inverse of :func:`flatten_named` into the structure of ``template``."""
    try:
        return unflatten_by_path(template, flat, prefix)
    except KeyError as err:
        raise ValueError(f"checkpoint lacks arrays the model needs: {err.args[0]}") from None


def _abstract(flat: Mapping[str, Any]) -> dict[str, jax.ShapeDtypeStruct]:
    """Restore targets: shape, dtype and sharding — the template's when it is a jax.Array, else replicated
    over this run's devices (not the saved one: a checkpoint written by two processes restores in one)."""
    everywhere = replicated(data_mesh())

    def one(x):
        sharding = x.sharding if isinstance(x, jax.Array) else everywhere
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    return {k: one(v) for k, v in flat.items()}


# ----------------------------------------------------------------------------- checksums


def _host(x) -> np.ndarray | None:
    """The whole array on the host, or None when this process does not hold all of it (sharded multi-host)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            return None
        x = x.addressable_data(0)
    return np.asarray(jax.device_get(x))


def _crc32(a: np.ndarray) -> str:
    return f"{zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8)):08x}"


def _checksums(flat: Mapping[str, Any]) -> dict[str, dict]:
    """``{name: {"crc32", "dtype", "shape"}}`` of every array (``crc32`` None for one this process does not
    hold whole, which restores then do not verify)."""
    out = {}
    for name, x in flat.items():
        host = _host(x)
        out[name] = {"crc32": None if host is None else _crc32(host),
                     "dtype": str(np.dtype(x.dtype) if host is None else host.dtype),
                     "shape": list(np.shape(x))}
    return out


def _well_formed(checksums: Any) -> bool:
    """Whether ``meta["checksums"]`` is ``{item: {name: {"crc32": str | None, "dtype": str, "shape": [int]}}}``."""
    def record(r):
        return (isinstance(r, Mapping) and isinstance(r.get("crc32"), (str, type(None)))
                and isinstance(r.get("dtype"), str) and isinstance(r.get("shape"), list)
                and all(isinstance(d, int) for d in r["shape"]))
    return isinstance(checksums, Mapping) and all(
        isinstance(records, Mapping) and all(record(r) for r in records.values()) for records in checksums.values())


def _verify(where: str, item_dir: str, restored: Mapping[str, Any], records: Mapping[str, Mapping]) -> None:
    """Raises CorruptCheckpointError naming the first array that does not match its stored checksum."""
    for name, value in restored.items():
        record = records.get(name)
        host = None if record is None or record["crc32"] is None else _host(value)
        if host is None:
            continue
        try:
            stored = np.dtype(record["dtype"])
        except TypeError:
            raise CorruptCheckpointError(
                f"{where} is corrupt: the stored checksum of array {name!r} names an unknown dtype "
                f"{record['dtype']!r}") from None
        if host.dtype != stored:
            # Restored into another dtype (orbax casts to the target's): verifiable only if exact.
            if not np.can_cast(stored, host.dtype, "safe"):
                continue
            host = host.astype(stored)
        if host.shape != tuple(record["shape"]) or _crc32(host) != record["crc32"]:
            raise CorruptCheckpointError(
                f"{where} is corrupt: array {name!r} does not match the checksum stored when it was saved "
                f"(its data is in {item_dir})")


def _check_fits(where: str, template: Mapping[str, Any], records: Mapping[str, Mapping] | None) -> None:
    """A template that asks for arrays the checkpoint lacks or shapes it does not have is a mismatch, not
    corruption (only known when the checkpoint stores checksums, which list its arrays)."""
    if records is None:
        return
    missing = [n for n in template if n not in records]
    wrong = [f"{n} {tuple(records[n]['shape'])} != {tuple(np.shape(template[n]))}" for n in template
             if n in records and tuple(records[n]["shape"]) != tuple(np.shape(template[n]))]
    if missing or wrong:
        detail = (f"{len(missing)} arrays missing, e.g. {missing[:3]}" if missing
                  else f"{len(wrong)} arrays of other shapes, e.g. {wrong[:3]}")
        raise CheckpointMismatchError(
            f"{where} does not fit the state being restored ({detail}); use a new --workdir or delete the "
            "old checkpoints.")


# ----------------------------------------------------------------------------- reading one step


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def _where(manager: ocp.CheckpointManager, step: int) -> str:
    return f"checkpoint step {step} in {_step_dir(manager, step)}"


def _first_line(err: BaseException) -> str:
    """The innermost cause's first line: orbax wraps tensorstore's precise error (which names the array
    and the database) in generic ones, e.g. 'Encountered error while reading array index ...'."""
    root, seen = err, set()
    while id(root) not in seen and (root.__cause__ or root.__context__) is not None:
        seen.add(id(root))
        root = root.__cause__ or root.__context__
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    return f"{type(root).__name__}: {lines[0] if lines else '(no message)'}"


_LOGS_FILTERED = False
_ORBAX_CODE = f"{os.sep}orbax{os.sep}"


def _closed_loop(err: BaseException | None) -> bool:
    return isinstance(err, RuntimeError) and str(err) == "Event loop is closed"


def _through_orbax(tb) -> bool:
    while tb is not None:
        if _ORBAX_CODE in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


def _orbax_echo(err: BaseException | None, tb) -> bool:
    # tensorstore's futures carry no Python traceback: their message names the checkpoint being written
    return (_closed_loop(err) or _through_orbax(tb)
            or any(mark in str(err) for mark in (".orbax-checkpoint-tmp", "in OCDBT database")))


def filter_orbax_noise() -> None:
    """Keeps the leftovers of orbax's failed reads and writes off stderr from now on.

    When one array read or write fails, orbax abandons the sibling ones. Each such coroutine, when finally
    collected (at some later time, from whichever thread drops the last reference), turns the GeneratorExit
    of its closing into an exception that Python prints as 'Exception ignored in: <coroutine object
    _read_array_index_and_device_put ...>' with a long traceback; a sibling write task that failed too is
    logged by asyncio as 'Task exception was never retrieved'; callbacks that find orbax's loop closed print
    'Event loop is closed'. The error that matters reaches the caller as an exception; the hook and log
    filters installed here drop exactly these echoes (coroutines whose code is orbax's, exceptions raised
    through orbax's code, the closed loop) and pass everything else on. The hook is installed again over
    whatever hook is current when that is not ours (a caller, or pytest, may have replaced it).

    It changes the interpreter's global state, so library calls never install it: the CLIs do
    (`cli.run_cli`), and so may a program that wants the same quiet stderr.
    """
    global _LOGS_FILTERED
    if not _LOGS_FILTERED:
        echo = lambda record: not (record.exc_info and _orbax_echo(record.exc_info[1], record.exc_info[2]))
        logging.getLogger("concurrent.futures").addFilter(echo)   # a thread pool's done-callback, loop closed
        logging.getLogger("asyncio").addFilter(echo)              # a sibling write's own failure
        _LOGS_FILTERED = True
    previous = sys.unraisablehook
    if getattr(previous, "drops_orbax_noise", False):
        return

    def from_orbax(unraisable) -> bool:
        code = getattr(unraisable.object, "cr_code", None)
        return ((code is not None and _ORBAX_CODE in code.co_filename)
                or _orbax_echo(unraisable.exc_value, unraisable.exc_traceback))

    def hook(unraisable):
        if not from_orbax(unraisable):
            previous(unraisable)
    hook.drops_orbax_noise = True
    sys.unraisablehook = hook


def _read(where: str, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, with any error while reading turned into one CorruptCheckpointError (no traceback chain)."""
    try:
        return fn()
    except (CheckpointMismatchError, CorruptCheckpointError):
        raise
    except Exception as err:  # noqa: BLE001  (orbax/tensorstore/json raise anything from ValueError to Exception)
        detail = re.sub(r"\s*\[tensorstore_spec=.*\]\s*$", "", _first_line(err))   # a page of JSON otherwise
    gc.collect()  # finalise the failed read's abandoned coroutines now, where possible
    raise CorruptCheckpointError(f"{where} is corrupt: {what} cannot be read ({detail})") from None


def _read_meta_step(manager: ocp.CheckpointManager, step: int) -> dict:
    """The step's meta JSON (checksums included); CorruptCheckpointError naming the file if it does not parse."""
    where = _where(manager, step)
    path = os.path.join(_step_dir(manager, step), "meta", META_FILE)
    meta = _read(where, f"its metadata file {path}",
                 lambda: manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    if not isinstance(meta, Mapping) or not _well_formed(meta.get(CHECKSUMS_KEY, {})):
        raise CorruptCheckpointError(f"{where} is corrupt: its metadata file {path} is not a checkpoint's "
                                     "metadata (a JSON object whose 'checksums' are well-formed)")
    return dict(meta)


def _public(meta: Mapping) -> dict:
    """The metadata callers see (the checksums are the checkpoint's own business)."""
    return {k: v for k, v in meta.items() if k != CHECKSUMS_KEY}


def _restore_items(manager: ocp.CheckpointManager, step: int, meta: Mapping,
                   targets: Mapping[str, Mapping[str, jax.ShapeDtypeStruct]]) -> dict[str, dict]:
    """Restores the flat items ``targets`` (e.g. model, train) of ``step`` and verifies their checksums."""
    where = _where(manager, step)
    checksums = meta.get(CHECKSUMS_KEY)
    for item, target in targets.items():
        _check_fits(where, target, None if checksums is None else checksums.get(item, {}))
    restored = _read(where, f"the arrays of {'/'.join(targets)} in {_step_dir(manager, step)}",
                     lambda: manager.restore(step, args=ocp.args.Composite(
                         **{item: ocp.args.StandardRestore(dict(t)) for item, t in targets.items()})))
    restored = {item: dict(restored[item]) for item in targets}
    if checksums is not None:
        for item in targets:
            _verify(where, os.path.join(_step_dir(manager, step), item), restored[item],
                    checksums.get(item, {}))
    return restored


def _with_fallback(manager: ocp.CheckpointManager, step: int | None, restore_one: Callable[[int], Any]):
    """``(step, restore_one(step), corrupt)`` for the given step, or for the newest step that is not corrupt
    (``corrupt``: ``[(step, error)]`` of the newer ones skipped, see :func:`_warn_fallback`). None if there
    is no step."""
    if step is not None:
        if step not in manager.all_steps():
            raise FileNotFoundError(f"no checkpoint of step {step} in {manager.directory} "
                                    f"(steps there: {sorted(manager.all_steps())})")
        return step, restore_one(step), []
    corrupt: list[tuple[int, CorruptCheckpointError]] = []
    for candidate in sorted(manager.all_steps(), reverse=True):
        try:
            result = restore_one(candidate)
        except CorruptCheckpointError as err:
            corrupt.append((candidate, err))
            continue
        return candidate, result, corrupt
    if not corrupt:
        return None
    if len(corrupt) == 1:
        raise corrupt[0][1]
    raise CorruptCheckpointError(
        f"every checkpoint in {manager.directory} is corrupt (steps {', '.join(str(s) for s, _ in corrupt)}): "
        + "; ".join(str(err) for _, err in corrupt))


def _warn_fallback(manager: ocp.CheckpointManager, step: int, corrupt, moved=()) -> None:
    """One warning naming the corrupt steps skipped (and why) and the step restored instead."""
    if not corrupt:
        return
    skipped = ", ".join(str(s) for s, _ in corrupt)
    aside = f" Moved the corrupt step(s) aside to {', '.join(moved)}." if moved else ""
    warnings.warn(
        f"skipped corrupt checkpoint step{'s' if len(corrupt) > 1 else ''} {skipped} and restored step {step}, "
        f"the newest intact one, from {manager.directory}: " + "; ".join(str(err) for _, err in corrupt) + aside,
        CorruptCheckpointWarning, stacklevel=3)


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> list[str]:
    """Renames corrupt step dirs to ``<step>.corrupt`` (which orbax ignores) so that a resumed run can save
    those steps again instead of orbax skipping every save up to the newest (corrupt) step."""
    moved = []
    for step in steps:
        src = _step_dir(manager, step)
        dst, n = src + CORRUPT_SUFFIX, 1
        while os.path.exists(dst):
            dst, n = f"{src}{CORRUPT_SUFFIX}{n}", n + 1
        moved.append(dst)
        if jax.process_index() == 0:
            os.rename(src, dst)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("oba_jax.checkpoint.set_aside_corrupt")
    manager.reload()
    return moved


# ----------------------------------------------------------------------------- save / restore


def as_os_error(err: BaseException) -> OSError | None:
    """The OSError behind a failed checkpoint write, or None if `err` is not one.

    tensorstore reports a file system error (a full disk, a read-only directory) as a ValueError like
    'RESOURCE_EXHAUSTED: Error writing local file "<dir>/8.orbax-checkpoint-tmp/model..." ...
    [os_error_code='28']', wrapped by orbax; this finds the code and names the step directory."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        code = re.search(r"os_error_code='(\d+)'", text)
        if code:
            path = re.search(r'local file "([^"]+)"', text)
            where = re.sub(r"\.orbax-checkpoint-tmp.*$", "", path.group(1)) if path else None
            return OSError(int(code.group(1)), os.strerror(int(code.group(1))), where)
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def os_errors_naming(workdir: str):
    """Inside, a file system error of a checkpoint write is an OSError that names where it happened.

    orbax drops the path of a full disk ('[Errno 28] No space left on device'): the workdir is named
    instead; tensorstore reports its own as a ValueError carrying the OS error code (`as_os_error`)."""
    try:
        yield
    except OSError as err:
        if err.filename:
            raise
        raise OSError(err.errno, err.strerror or str(err), os.path.abspath(workdir)) from err
    except ValueError as err:
        os_error = as_os_error(err)
        if os_error is None:
            raise
        raise os_error from err


class _FrozenState:
    """An input iterator's state taken now: orbax may run Grain's handler after the iterator has moved on."""

    def __init__(self, iterator):
        self._state = iterator.get_state()

    def get_state(self) -> bytes:
        return self._state


def save_state(manager: ocp.CheckpointManager, step: int, state, *, spec=None, config=None,
               data_position: Mapping[str, int] | None = None, extra: Mapping[str, Any] | None = None,
               input_iterator: Any = None) -> None:
    """Saves a :class:`oba_jax.train_lib.TrainState` (asynchronously; atomic on completion), and with
    `input_iterator` (a Grain-checkpointable iterator) its state as the ``input`` item.

    The meta JSON gets a checksum of every array (computed here from host copies, before orbax's
    asynchronous write), which restores verify.
    """
    from models import spec_to_dict
    if extra and CHECKSUMS_KEY in extra:
        raise ValueError(f"extra metadata may not use the reserved key {CHECKSUMS_KEY!r}")
    model = {**flatten_named(state.params, "params"), **flatten_named(state.batch_stats, "batch_stats")}
    train = {**flatten_named(state.opt_state, "opt_state"), "step": state.step}
    meta = {"step": int(step), "spec": spec_to_dict(spec) if spec is not None else None,
            "config": json.loads(config.to_json_best_effort()) if config is not None else None,
            "data_position": dict(data_position or {}), **dict(extra or {}),
            CHECKSUMS_KEY: {"model": _checksums(model), "train": _checksums(train)}}
    items = dict(model=ocp.args.StandardSave(model), train=ocp.args.StandardSave(train), meta=ocp.args.JsonSave(meta))
    if input_iterator is not None:
        import grain
        items["input"] = grain.checkpoint.CheckpointSave(_FrozenState(input_iterator))
    manager.save(int(step), args=ocp.args.Composite(**items))


def restore_input(manager: ocp.CheckpointManager, step: int, iterator: Any) -> bool:
    """Sets `iterator` (Grain-checkpointable) to the input state saved with `step`; False when that step has none
    for this process layout (in-memory data then, or another process count), leaving `iterator` as it was."""
    import grain
    folder = os.path.join(_step_dir(manager, step), "input")
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not os.path.isfile(os.path.join(folder, name)):
        return False
    _read(_where(manager, step), f"its input iterator state in {folder}",
          lambda: manager.restore(step, args=ocp.args.Composite(input=grain.checkpoint.CheckpointRestore(iterator))))
    return True


def restore_state(manager: ocp.CheckpointManager, template, step: int | None = None, *, spec=None,
                  set_aside_corrupt: bool = False):
    """``(state, meta)`` from the latest (or given) step shaped like ``template``; None if no checkpoint.

    With ``spec``, first checks that the checkpoint was written for the same architecture, so that
    reusing a workdir for another model fails with a clear message instead of a shape error
    (:class:`CheckpointMismatchError`).

    Every array is checked against the checksum stored at save time. Without ``step``, a corrupt
    newest step falls back to the newest intact one (:class:`CorruptCheckpointWarning` naming both);
    if all are corrupt, or the given ``step`` is, raises :class:`CorruptCheckpointError`. With
    ``set_aside_corrupt`` (for a run about to resume and save again) the skipped corrupt steps are
    renamed to ``<step>.corrupt``: otherwise orbax would keep them as the newest steps and silently
    skip every save up to them.
    """
    model_flat = {**flatten_named(template.params, "params"), **flatten_named(template.batch_stats, "batch_stats")}
    train_flat = {**flatten_named(template.opt_state, "opt_state"), "step": template.step}
    targets = {"model": _abstract(model_flat), "train": _abstract(train_flat)}

    def restore_one(step: int):
        meta = _read_meta_step(manager, step)
        if spec is not None:
            from models import spec_to_dict
            stored = meta.get("spec")
            if stored is not None and stored != spec_to_dict(spec):
                raise CheckpointMismatchError(
                    f"{manager.directory} holds checkpoints of a different model ({stored}) than the configured "
                    f"one ({spec_to_dict(spec)}); use a new --workdir or delete the old checkpoints.")
        return _restore_items(manager, step, meta, targets), _public(meta)

    found = _with_fallback(manager, step, restore_one)
    if found is None:
        return None
    step, (restored, meta), corrupt = found
    moved = _set_aside(manager, [s for s, _ in corrupt]) if set_aside_corrupt and corrupt else ()
    _warn_fallback(manager, step, corrupt, moved)
    state = type(template)(
        step=restored["train"]["step"],
        params=unflatten_named(template.params, "params", restored["model"]),
        batch_stats=unflatten_named(template.batch_stats, "batch_stats", restored["model"]),
        opt_state=unflatten_named(template.opt_state, "opt_state", restored["train"]))
    return state, meta


def _resolve(path: str) -> tuple[str, int | None]:
    """``(checkpoints_dir, step)`` from a workdir, a checkpoints dir, or one step's directory."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return os.path.join(path, CHECKPOINT_DIR), None
    if os.path.isdir(os.path.join(path, "meta")) and os.path.basename(path).isdigit():
        return os.path.dirname(path), int(os.path.basename(path))
    return path, None


@contextlib.contextmanager
def _open_read_only(path: str, step: int | None):
    """Yields ``(manager, directory, step)``: the step given, or the one ``path`` names (a step dir), or None."""
    directory, found_step = _resolve(path)
    step = found_step if step is None else step
    with ocp.CheckpointManager(directory, item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False)) as manager:
        if not manager.all_steps():
            raise FileNotFoundError(f"no checkpoint in {directory}")
        yield manager, directory, step


def read_meta(path: str, step: int | None = None) -> dict:
    """The JSON metadata (spec, config, data position, step) of the latest (or given) checkpoint.

    Without ``step``, a step whose metadata does not parse falls back to the next older one (with a
    warning); the arrays are not read, so not verified.
    """
    with _open_read_only(path, step) as (manager, _, given):
        found, meta, corrupt = _with_fallback(manager, given, lambda s: _read_meta_step(manager, s))
        _warn_fallback(manager, found, corrupt)
        return _public(meta)


def restore_model(path: str, step: int | None = None):
    """Rebuilds the model stored under ``path`` (workdir, ``checkpoints/`` or a step dir) from its spec.

    Returns ``(model, extra)`` where ``extra`` is the checkpoint metadata (spec, config, step,
    data_position, ...). Needs nothing but the checkpoint: the architecture comes from the stored spec.
    The arrays are verified against their stored checksums; for a workdir or checkpoints dir (no step
    given) a corrupt newest step falls back to the newest intact one, as in :func:`restore_state`.
    """
    from flax import nnx
    from models import build_model, spec_from_dict

    def restore_one(step: int):
        meta = _read_meta_step(manager, step)
        if not meta.get("spec"):
            raise ValueError(f"checkpoint {directory}/{step} stores no architecture spec")
        spec = spec_from_dict(meta["spec"])
        # Only shapes are needed from the template, so initialise abstractly (no compute, no memory).
        abstract = nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0)))
        _, state = nnx_model.split(abstract)
        params, batch_stats = state.params, state.batch_stats
        flat = {**flatten_named(params, "params"), **flatten_named(batch_stats, "batch_stats")}
        target = _abstract(flat)
        restored = _restore_items(manager, step, meta, {"model": target})["model"]
        return spec, abstract, params, batch_stats, restored, meta

    with _open_read_only(path, step) as (manager, directory, given):
        found, (spec, model, params, batch_stats, restored, meta), corrupt = _with_fallback(
            manager, given, restore_one)
        _warn_fallback(manager, found, corrupt)
    params = unflatten_named(params, "params", restored)
    batch_stats = unflatten_named(batch_stats, "batch_stats", restored)
    if jax.tree.leaves(nnx_model.split(model)[1].rest):
        # state that is neither params nor batch stats (none of the zoo's models has any) is not in the
        # checkpoint: it needs a real initialisation
        model = build_model(spec, rngs=nnx.Rngs(0))
    # otherwise the abstract model becomes the restored one: initialising weights only to overwrite them
    # cost seconds per model (eager init compiles an op per parameter shape)
    nnx.update(model, params, batch_stats)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model))):
        raise RuntimeError(f"restoring {path} left parts of the model without values (a bug: please report it)")
    model.eval()
    return model, {**_public(meta), "step": found}


MASKS_PREFIX = "opt_state/masks"


def restore_masks(path: str, step: int | None = None) -> tuple[Any, int]:
    """``(masks, step)``: the masks of a masked fine-tuning run (`training.fit(..., masks=...)`, whose
    optimizer state is `oba_jax.masked_optimizer`'s) stored under ``path``, as a bool pytree with the
    structure of the model's ``nnx.Param`` state. Verified and with the fall-back of :func:`restore_model`."""
    from flax import nnx
    from models import build_model, spec_from_dict

    def restore_one(step: int):
        meta = _read_meta_step(manager, step)
        if not meta.get("spec"):
            raise ValueError(f"checkpoint {directory}/{step} stores no architecture spec")
        abstract = nnx.eval_shape(lambda: build_model(spec_from_dict(meta["spec"]), rngs=nnx.Rngs(0)))
        params = nnx_model.split(abstract)[1].params
        names = set(flatten_named(params, MASKS_PREFIX))
        stored = (meta.get(CHECKSUMS_KEY) or {}).get("train")
        if stored is None:
            raise ValueError(f"checkpoint {directory}/{step} was written before checkpoints listed their arrays; "
                             "its masks cannot be located")
        if not names <= set(stored):
            raise ValueError(f"checkpoint {directory}/{step} holds no masks of this model: it is not of a masked "
                             "fine-tuning run")
        # the train item is restored whole (orbax restores a tree, not a part of one); its list is the checksums'
        target = _abstract({k: jax.ShapeDtypeStruct(tuple(r["shape"]), np.dtype(r["dtype"])) for k, r in stored.items()})
        train = _restore_items(manager, step, meta, {"train": target})["train"]
        return params, {k: v for k, v in train.items() if k in names}

    with _open_read_only(path, step) as (manager, directory, given):
        found, (params, restored), corrupt = _with_fallback(manager, given, restore_one)
        _warn_fallback(manager, found, corrupt)
    return unflatten_named(params, MASKS_PREFIX, restored), found
