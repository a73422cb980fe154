"""Stage manifests: what produced a directory that a later run would reuse.

`prune.py` resumes work it finds in its workdir (the dense training in WORKDIR/dense, each fine-tuning in
WORKDIR/ops_<target>, unstructured_<method>, n_m_<method>). Deciding that by the directory's existence reused
a model pruned from another dense model, or with another method, and reported it as this run's. Every stage
directory therefore gets `manifest.json`, written before the stage starts: the inputs that determine its
result (the config keys of `STAGE_KEYS` for its kind, the digest of the model it starts from, its target or
method). A later run reuses the directory only when its inputs are the same; otherwise it stops with a
`ConfigError` naming each key that differs and the directory, or, with `config.overwrite`, deletes the
directory and runs the stage again.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from oba_jax.experiment.config import ConfigError
from oba_jax.experiment.hosts import decided_once

__all__ = ["MANIFEST_FILE", "STAGE_KEYS", "Manifest", "claim_stage", "config_inputs", "model_digest"]

MANIFEST_FILE = "manifest.json"

_DATA = ("model.", "data.name", "data.augment", "data.host_transform", "data.synthetic.")
_FINETUNE = (*_DATA, "optim.momentum", "optim.nesterov", "optim.gamma", "optim.label_smoothing", "train.batch_size",
             "train.seed", "train.compute_dtype", "finetune.")
_SCORES = ("prune.bn_mode", "prune.score_batches", "prune.score_batch_size", "prune.seed")
# The config keys (exact, or prefixes ending in '.') that determine a stage's result, per kind of stage. Keys
# that only change where or how a run reports (data_dir, progress, logging and checkpoint intervals, eval
# batch size, latency repeats, plots) are not inputs.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "dense": (*_DATA, "optim.", "train.epochs", "train.batch_size", "train.seed", "train.max_steps",
              "train.compute_dtype"),
    "structured": (*_FINETUNE, *_SCORES, "prune.mode", "prune.importance", "prune.normalizer", "prune.steps",
                   "prune.final_ratio", "prune.global_pruning", "prune.max_pruning_ratio", "prune.round_to",
                   "prune.kinds", "prune.ignored_layers", "prune.count_attention"),
    "unstructured": (*_FINETUNE, *_SCORES, "prune.keep_ratio", "prune.unstructured_steps", "prune.exclude",
                     "prune.mask_form"),
    "n_m": (*_FINETUNE, *_SCORES, "prune.n_m", "prune.exclude", "prune.n_m_exclude", "prune.mask_form"),
}


@dataclasses.dataclass(frozen=True)
class Manifest:
    """`inputs` are compared before a reuse; `about` (where the start model was read from, when) only informs."""

    stage: str                      # a STAGE_KEYS kind
    inputs: Mapping[str, Any]       # dotted key -> JSON value
    about: Mapping[str, Any]


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _selected(key: str, keys: tuple[str, ...]) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in keys)


def config_inputs(config: ml_collections.ConfigDict, stage: str) -> dict[str, Any]:
    """The config values that determine a stage of kind `stage` (`STAGE_KEYS`), as JSON values."""
    flat = _flat(json.loads(json.dumps(config.to_dict(), default=str)))
    return {k: v for k, v in sorted(flat.items()) if _selected(k, STAGE_KEYS[stage])}


def model_digest(state: Any) -> str:
    """sha256 of every array of a pytree (paths, dtypes, shapes and bytes): the identity of a model's values,
    whatever file or directory they were read from."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state)):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _read(path: str) -> Manifest | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return Manifest(data["stage"], data["inputs"], data.get("about", {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write(directory: str, manifest: Manifest) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MANIFEST_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({**dataclasses.asdict(manifest),
                   "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}, f, indent=2)
    os.replace(path + ".tmp", path)


def _is_fresh(directory: str) -> bool:
    """Nothing of a stage in it yet (absent, empty, or only the lock file of a run that stopped at once)."""
    return not os.path.isdir(directory) or not [n for n in os.listdir(directory) if n != ".lock"]


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# Inputs added after manifests were first written, with the value every run before them used: a manifest
# without the key matches a run at that value (an older workdir stays reusable).
ADDED_INPUTS: dict[str, Any] = {"train.compute_dtype": "float32", "data.host_transform": "none"}


def _differences(stored: Manifest, now: Manifest) -> list[str]:
    if stored.stage != now.stage:
        return [f"stage kind ({stored.stage} → {now.stage})"]
    keys = sorted(set(stored.inputs) | set(now.inputs))
    out = []
    for key in keys:
        before, after = (m.inputs.get(key, ADDED_INPUTS.get(key, "<absent>")) for m in (stored, now))
        if before == after:
            continue
        if key in now.about or key in stored.about:   # a digest: say where each model came from
            out.append(f"{key} (the directory's came from {stored.about.get(key, '?')}, this run's from "
                       f"{now.about.get(key, '?')})")
        else:
            out.append(f"{key} ({_show(before)} → {_show(after)})")
    return out


def claim_stage(directory: str, manifest: Manifest, *, overwrite: bool) -> bool:
    """Makes `directory` this stage's: a new or matching directory is kept (True when work of the same inputs
    is already there to reuse), one of other inputs is a ConfigError naming them — or, with `overwrite`,
    deleted and started afresh (a warning names it). The manifest is on disk before the stage writes.
    In a run of several processes, process 0 decides and writes, and every process gets its answer."""
    return bool(decided_once(lambda: int(_claim(directory, manifest, overwrite=overwrite)),
                             f"the stage directory {directory}"))


def _claim(directory: str, manifest: Manifest, *, overwrite: bool) -> bool:
    if _is_fresh(directory):
        _write(directory, manifest)
        return False
    stored = _read(os.path.join(directory, MANIFEST_FILE))
    differences = (["no manifest.json: it was written by an older oba-jax or by another program"]
                   if stored is None else _differences(stored, manifest))
    if not differences:
        return True
    if not overwrite:
        raise ConfigError(f"{directory} holds a stage of other inputs: {'; '.join(differences)}. Use another "
                          "--workdir, or --config.overwrite=true to delete it and run the stage again")
    print(f"warning: deleting {directory} (config.overwrite; its inputs differ: {'; '.join(differences)})",
          file=sys.stderr)
    shutil.rmtree(directory)
    _write(directory, manifest)
    return False
