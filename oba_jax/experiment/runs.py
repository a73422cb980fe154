"""What every prune pipeline of `prune.py` shares: the dense model, the scoring sample, progress, reports."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from oba_jax.experiment import checkpoint as ckpt_lib
from oba_jax.experiment import config as config_lib
from oba_jax.experiment import training

__all__ = ["REPORT_FILE", "dense_model", "progress", "score_batches", "write_json"]

REPORT_FILE = "report.json"


def dense_model(config: ml_collections.ConfigDict, workdir: str) -> tuple[nnx.Module, str]:
    """The model to prune and where it came from: `prune.pretrained` or a training run in WORKDIR/dense."""
    spec = config_lib.model_spec(config)
    source = config.prune.pretrained
    if source is None:
        source = os.path.join(workdir, "dense")
        training.train_and_evaluate(config, source)
    model, meta = ckpt_lib.restore_model(source)
    if model.spec != spec:
        raise ckpt_lib.CheckpointMismatchError(
            f"{source} holds a {meta.get('spec')} model, but the config describes {spec}: prune.pretrained must be a "
            "train.py workdir of the configured model")
    return model, source


def score_batches(dataset, config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """A deterministic sample of normalised training batches, stacked: `(n, B, H, W, C)`, `(n, B)`."""
    from oba_jax.experiment.data import preprocess_batch
    p = config.prune
    n = p.score_batches * p.score_batch_size
    if n > len(dataset.train_labels):
        raise config_lib.ConfigError(f"config.prune: score_batches × score_batch_size = {n} exceeds the "
                                     f"{len(dataset.train_labels)} training examples")
    order = np.random.default_rng(p.seed).permutation(len(dataset.train_labels))[:n]
    x = preprocess_batch(jnp.asarray(dataset.train_images[order]), None, augment=False, mean=dataset.mean,
                         std=dataset.std)
    y = jnp.asarray(dataset.train_labels[order], jnp.int32)
    return x.reshape(p.score_batches, p.score_batch_size, *x.shape[1:]), y.reshape(p.score_batches, -1)


def progress(total: int, desc: str):
    """A schedule's progress: a bar on a terminal, ten lines in a log (`progress.progress_bar`)."""
    from oba_jax.experiment.progress import progress_bar
    return progress_bar(total, desc, "step")


def write_json(path: str, data: Any) -> None:
    """Written to a temporary file and renamed: a report on disk is always complete."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=float)
    os.replace(tmp, path)
