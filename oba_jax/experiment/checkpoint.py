"""Orbax checkpoints of a training run: architecture spec + arrays + optimizer + data position.

Layout of ``WORKDIR/checkpoints/<step>/`` (one orbax ``CheckpointManager`` step, written to a
temporary directory and renamed when complete, so a killed run never leaves a half checkpoint):

- ``model``: params and batch stats, a flat dict ``{"params/layers/0/conv/kernel": array, ...}`` keyed by
  the leaf paths of `oba_jax.paths`;
- ``train``: optimizer state and step, flat the same way (leaf names from the pytree paths);
- ``meta`` (JSON): ``spec`` (``models.spec_to_dict``), ``config``, ``data_position``
  (epoch, step_in_epoch), ``step`` and anything extra (e.g. accumulated wall time).

Arrays are stored flat and restored by unflattening into a template pytree, which keeps the
files readable and independent of how NNX/optax register their pytrees.
:func:`restore_model` needs only the stored spec, so it works in a fresh process.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from oba_jax import nnx_model
from oba_jax.paths import flat_by_path, unflatten_by_path

CHECKPOINT_DIR = "checkpoints"
MAX_TO_KEEP = 2


def checkpoint_dir(workdir: str) -> str:
    """``workdir/checkpoints`` as an absolute path (orbax requires absolute paths)."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def make_manager(workdir: str, *, max_to_keep: int = MAX_TO_KEEP) -> ocp.CheckpointManager:
    """A CheckpointManager for ``workdir/checkpoints`` keeping the newest ``max_to_keep`` steps."""
    # cleanup_tmp_directories: a killed run may leave an unfinished tmp step dir; drop it on restart.
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("model", "train", "meta"))


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
    """Restore targets: shape, dtype and (when the template is a jax.Array) its sharding."""
    def one(x):
        sharding = x.sharding if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    return {k: one(v) for k, v in flat.items()}


def save_state(manager: ocp.CheckpointManager, step: int, state, *, spec=None, config=None,
               data_position: Mapping[str, int] | None = None, extra: Mapping[str, Any] | None = None) -> None:
    """Saves a :class:`oba_jax.train_lib.TrainState` (asynchronously; atomic on completion)."""
    from models import spec_to_dict
    meta = {"step": int(step), "spec": spec_to_dict(spec) if spec is not None else None,
            "config": json.loads(config.to_json_best_effort()) if config is not None else None,
            "data_position": dict(data_position or {}), **dict(extra or {})}
    model = {**flatten_named(state.params, "params"), **flatten_named(state.batch_stats, "batch_stats")}
    train = {**flatten_named(state.opt_state, "opt_state"), "step": state.step}
    manager.save(int(step), args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), train=ocp.args.StandardSave(train), meta=ocp.args.JsonSave(meta)))


class CheckpointMismatchError(ValueError):
    """The checkpoint in a workdir belongs to a different model than the one being trained."""


def restore_state(manager: ocp.CheckpointManager, template, step: int | None = None, *, spec=None):
    """``(state, meta)`` from the latest (or given) step shaped like ``template``; None if no checkpoint.

    With ``spec``, first checks that the checkpoint was written for the same architecture, so that
    reusing a workdir for another model fails with a clear message instead of a shape error.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    if spec is not None:
        from models import spec_to_dict
        stored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"].get("spec")
        if stored is not None and stored != spec_to_dict(spec):
            raise CheckpointMismatchError(
                f"{manager.directory} holds checkpoints of a different model ({stored}) than the configured "
                f"one ({spec_to_dict(spec)}); use a new --workdir or delete the old checkpoints.")
    model_flat = {**flatten_named(template.params, "params"), **flatten_named(template.batch_stats, "batch_stats")}
    train_flat = {**flatten_named(template.opt_state, "opt_state"), "step": template.step}
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(_abstract(model_flat)),
        train=ocp.args.StandardRestore(_abstract(train_flat)), meta=ocp.args.JsonRestore()))
    state = type(template)(
        step=restored["train"]["step"],
        params=unflatten_named(template.params, "params", restored["model"]),
        batch_stats=unflatten_named(template.batch_stats, "batch_stats", restored["model"]),
        opt_state=unflatten_named(template.opt_state, "opt_state", restored["train"]))
    return state, restored["meta"]


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
    """Yields ``(manager, directory, step, meta)`` for the latest (or given) checkpoint under ``path``."""
    directory, found_step = _resolve(path)
    step = found_step if step is None else step
    with ocp.CheckpointManager(directory, item_names=("model", "train", "meta"),
                               options=ocp.CheckpointManagerOptions(read_only=True, create=False)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        yield manager, directory, step, meta


def read_meta(path: str, step: int | None = None) -> dict:
    """The JSON metadata (spec, config, data position, step) of the latest (or given) checkpoint."""
    with _open_read_only(path, step) as (_, _, _, meta):
        return meta


def restore_model(path: str, step: int | None = None):
    """Rebuilds the model stored under ``path`` (workdir, ``checkpoints/`` or a step dir) from its spec.

    Returns ``(model, extra)`` where ``extra`` is the checkpoint metadata (spec, config, step,
    data_position, ...). Needs nothing but the checkpoint: the architecture comes from the stored spec.
    """
    from flax import nnx
    from models import build_model, spec_from_dict

    with _open_read_only(path, step) as (manager, directory, step, meta):
        if not meta.get("spec"):
            raise ValueError(f"checkpoint {directory}/{step} stores no architecture spec")
        spec = spec_from_dict(meta["spec"])
        # Only shapes are needed from the template, so initialise abstractly (no compute, no memory).
        abstract = nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0)))
        _, state = nnx_model.split(abstract)
        params, batch_stats = state.params, state.batch_stats
        flat = {**flatten_named(params, "params"), **flatten_named(batch_stats, "batch_stats")}
        restored = manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()})))
    params = unflatten_named(params, "params", restored["model"])
    batch_stats = unflatten_named(batch_stats, "batch_stats", restored["model"])
    model = build_model(spec, rngs=nnx.Rngs(0))
    nnx.update(model, params, batch_stats)
    model.eval()
    return model, {**meta, "step": step}
