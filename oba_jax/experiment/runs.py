"""What every prune pipeline of `prune.py` shares: the dense model, the scoring sample, progress, reports."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from oba_jax.experiment import checkpoint as ckpt_lib
from oba_jax.experiment import config as config_lib
from oba_jax.experiment import training
from oba_jax.experiment.hosts import is_writer
from oba_jax.experiment.lock import reading_lock
from oba_jax.experiment.manifest import Manifest, claim_stage, config_inputs, model_digest

__all__ = ["Start", "dense_model", "method_options", "model_outline", "progress", "pyplot", "save_figure", "score_batches", "start",
           "text_table"]


def dense_model(config: ml_collections.ConfigDict, workdir: str) -> tuple[nnx.Module, str]:
    """The model to prune and where it came from: `prune.pretrained` (read under a shared lock, so a train.py
    still writing it is refused rather than read mid-run) or a training run in WORKDIR/dense (a stage with a
    manifest: reused only when trained from the same inputs)."""
    spec = config_lib.model_spec(config)
    source = config.prune.pretrained
    if source is None:
        source = os.path.join(workdir, "dense")
        claim_stage(source, Manifest("dense", config_inputs(config, "dense"), {}),
                    overwrite=bool(config.get("overwrite", False)))
        training.train_and_evaluate(config, source)
    try:
        with reading_lock(source, what="config.prune.pretrained"):
            model, meta = ckpt_lib.restore_model(source)
    except FileNotFoundError as err:
        if config.prune.pretrained is None:
            raise
        raise _no_pretrained(source, str(err)) from None
    if model.spec != spec:
        raise ckpt_lib.CheckpointMismatchError(
            f"{source} holds a {meta.get('spec')} model, but the config describes {spec}: prune.pretrained must be a "
            "train.py workdir of the configured model")
    return model, source


def _no_pretrained(source: str, why: str) -> config_lib.ConfigError:
    return config_lib.ConfigError(f"config.prune.pretrained: {why}; pass the --workdir of a train.py run of this "
                                  "model, or leave prune.pretrained unset to train one into WORKDIR/dense")


@dataclasses.dataclass(frozen=True)
class Start:
    """What a prune pipeline starts from."""

    dataset: Any
    dense: nnx.Module
    source: str                              # where the dense model came from
    batches: tuple[jax.Array, jax.Array]     # the scoring sample, stacked
    dense_digest: str                        # `manifest.model_digest` of its parameters and BN statistics

    def claim(self, config: ml_collections.ConfigDict, directory: str, stage: str, start: nnx.Module | None = None,
              start_from: str = "", **inputs: Any) -> bool:
        """`manifest.claim_stage` of a stage of kind `stage` that starts from `start` (default: the dense model;
        `start_from` says where it came from) with `inputs` beyond the config's; True when the directory holds
        its work already."""
        start_digest = self.dense_digest if start is None else _values_digest(start)
        manifest = Manifest(stage, {**config_inputs(config, stage), **inputs, "dense_model": self.dense_digest,
                                    "start_model": start_digest},
                            {"dense_model": self.source, "start_model": start_from or self.source})
        return claim_stage(directory, manifest, overwrite=bool(config.get("overwrite", False)))


def _values_digest(model: nnx.Module) -> str:
    """The digest of what training changes (parameters, BatchNorm statistics): RNG state and the like are not
    part of a model's identity (and a key array has no bytes to hash)."""
    return model_digest(training.split_model(model)[1:])


def model_outline(config: ml_collections.ConfigDict) -> nnx.Module:
    """The configured model with abstract parameters (shapes only: nothing is initialised)."""
    from models import build_model
    spec = config_lib.model_spec(config)
    return nnx.eval_shape(lambda: build_model(spec, rngs=nnx.Rngs(0)))


def start(config: ml_collections.ConfigDict, workdir: str,
          check: Callable[[nnx.Module, jax.Array], None] | None = None, *, finetunes: bool = True) -> Start:
    """The dataset (checked against the model), the dense model and the scoring sample of a config.

    `check(outline, example)` runs on `model_outline(config)` and one example input before the dense model is
    trained or restored, so a setting that does not fit the model (a layer name that matches nothing, an N:M
    pattern that does not divide a layer) is a ConfigError in seconds rather than after a training run; the
    dense model has the outline's structure (`dense_model` refuses any other). The dense training (without
    `prune.pretrained`) and, when `finetunes`, the fine-tuning must each run at least one step on the dataset."""
    pretrained = config.prune.pretrained
    if pretrained is not None and not os.path.isdir(pretrained):
        raise _no_pretrained(pretrained, f"{pretrained!r} is not a directory")
    os.makedirs(workdir, exist_ok=True)
    dataset = training.load_dataset_for(config)
    training.check_dataset_matches(config_lib.model_spec(config), dataset)
    n = dataset.num_train
    if pretrained is None:
        training.check_step_count(config, n, "train")
    if finetunes and config.finetune.epochs > 0:
        training.check_step_count(config_lib.finetune_config(config), n, "finetune")
    batches = score_batches(dataset, config)
    if check is not None:
        check(model_outline(config), batches[0][0][:1])
    dense, source = dense_model(config, workdir)
    return Start(dataset, dense, source, batches, _values_digest(dense))


def score_batches(dataset, config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """A deterministic sample of normalised training batches (the evaluation transform, no augmentation), stacked:
    `(n, B, H, W, C)`, `(n, B)`; a streamed dataset reads only these examples."""
    from oba_jax.experiment import inputs
    from oba_jax.experiment.data import preprocess_batch
    p = config.prune
    n = p.score_batches * p.score_batch_size
    if n > dataset.num_train:
        raise config_lib.ConfigError(f"config.prune: score_batches × score_batch_size = {n} exceeds the "
                                     f"{dataset.num_train} training examples")
    order = np.random.default_rng(p.seed).permutation(dataset.num_train)[:n]
    images, labels = inputs.examples(dataset, "train", order)
    x = preprocess_batch(jnp.asarray(images), None, augment=False, mean=dataset.mean, std=dataset.std)
    y = jnp.asarray(labels, jnp.int32)
    return x.reshape(p.score_batches, p.score_batch_size, *x.shape[1:]), y.reshape(p.score_batches, -1)


def method_options(config: ml_collections.ConfigDict, method: str) -> dict[str, Any]:
    """The options a pipeline scores `method` with: `prune.seed` for a method that takes a seed (random), so
    that runs with other seeds draw other random scores, not only other scoring samples."""
    from oba_jax.scores import get_method
    return {"seed": int(config.prune.seed)} if "seed" in get_method(method).options else {}


def progress(total: int, desc: str):
    """A schedule's progress: a bar on a terminal, ten lines in a log (`progress.progress_bar`)."""
    from oba_jax.experiment.progress import progress_bar
    return progress_bar(total, desc, "step")


def pyplot():
    """matplotlib.pyplot on the Agg backend (files, no display), imported when a plot is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, workdir: str, name: str) -> str:
    """`fig` laid out, written to `workdir/name` and closed; the path."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = os.path.join(workdir, name)
    if is_writer():   # (one process of a multi-host run writes the run's files)
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def text_table(rows: list[list[str]], title: str) -> list[str]:
    """`title`, then the rows (the first is the header) in aligned columns between rules."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    rule = "-" * (sum(widths) + 3 * (len(widths) - 1))
    cells = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return [title, rule, cells[0], rule, *cells[1:], rule] if len(rows) > 1 else [title, rule, cells[0], rule]
