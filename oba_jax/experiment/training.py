"""Data-parallel SGD training and evaluation of NNX models, on in-memory or streamed datasets (the batches come
from `oba_jax.experiment.inputs`, by global step).

The model is split NNX-style into ``graphdef`` (static structure), ``params`` (``nnx.Param``),
``batch_stats`` (``nnx.BatchStat``) and ``other`` (any remaining state, kept constant). A
:class:`TrainState` holds the arrays; :func:`make_train_step` returns a pure jitted
``train_step(state, images_uint8, labels, rng) -> (state, metrics)`` that donates the state.

Parallelism: the data mesh of `oba_jax.sharding` (1-D, named ``'data'``, all devices); batches are
sharded along it, parameters and optimizer state replicated, so XLA inserts the gradient
all-reduce. Nothing depends on the device count except that it must divide the batch size.

Determinism: the epoch permutation comes from ``(seed, epoch)``, a streamed image's augmentation from
``(seed, epoch, index)`` and the device augmentation rng from ``(seed, step)``, so a run resumed from a
checkpoint at step ``s`` replays exactly the batches an uninterrupted run would have seen (a streamed run also
restores its input iterator's state from the checkpoint).

Entry points: :func:`train_and_evaluate` (config + workdir, what ``train.py`` calls) and
:func:`fit` (an already-built model, e.g. a pruned one to fine-tune).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from oba_jax import nnx_model
from oba_jax.losses import cross_entropy
from oba_jax.experiment import checkpoint as ckpt_lib
from oba_jax.experiment import config as config_lib
from oba_jax.experiment import inputs as inputs_lib
from oba_jax.experiment.lock import workdir_lock
from oba_jax.sharding import data_mesh, put_replicated, replicated
from oba_jax.unstructured import apply_masks, masked_optimizer

Metrics = dict[str, float]
METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """Everything that changes during training (all leaves are arrays)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The static half of a split model plus the state that training never changes, and the dtype its
    layers compute in (None: the parameters', float32)."""

    graphdef: Any
    other: Any
    compute_dtype: Any = None


# the NNX layers whose `dtype` attribute is their computation dtype (`param_dtype` stays what it is)
_COMPUTING_LAYERS = (nnx.Linear, nnx.Conv, nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm, nnx.Embed,
                     nnx.MultiHeadAttention, nnx.Einsum)


def _compute_in(model: nnx.Module, dtype: Any) -> None:
    """Flax's mixed precision on a merged model: every layer casts its inputs and parameters to `dtype`
    (as `dtype=` at construction would), norms keep computing their statistics in float32."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, _COMPUTING_LAYERS):
            module.dtype = dtype


def split_model(model: nnx.Module) -> tuple[ModelParts, Any, Any]:
    """``model -> (parts, params, batch_stats)``: the one NNX split (`oba_jax.nnx_model`)."""
    graphdef, state = nnx_model.split(model)
    return ModelParts(graphdef, state.rest), state.params, state.batch_stats


def merge_model(parts: ModelParts, params: Any, batch_stats: Any) -> nnx.Module:
    """Inverse of :func:`split_model` (fresh Variables: see `oba_jax.nnx_model.merge`)."""
    return nnx_model.merge(parts.graphdef, nnx_model.ModelState(params, batch_stats, parts.other))


def apply_model(parts: ModelParts, params: Any, batch_stats: Any, images: jax.Array, *,
                train: bool) -> tuple[jax.Array, Any]:
    """Logits and the (possibly updated) batch stats; BN uses batch statistics iff ``train``."""
    model = merge_model(parts, params, batch_stats)
    model.train() if train else model.eval()
    if parts.compute_dtype is None:
        return model(images), nnx.state(model, nnx.BatchStat)
    _compute_in(model, parts.compute_dtype)
    logits = model(images.astype(parts.compute_dtype)).astype(jnp.float32)   # the loss and metrics in float32
    return logits, nnx.state(model, nnx.BatchStat)


# ----------------------------------------------------------------------------- optimizer


def learning_rate_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
    """Per-step learning rate.

    ``multistep``: ``lr * gamma**k`` after the k-th milestone epoch (PyTorch MultiStepLR stepped
    once per epoch, i.e. boundaries at ``milestone * steps_per_epoch``); ``cosine``: cosine decay
    from ``lr`` to 0 over ``total_steps``; ``constant``: ``lr``.
    """
    if optim.schedule == "constant":
        return optax.constant_schedule(optim.lr)
    if optim.schedule == "cosine":
        return optax.cosine_decay_schedule(optim.lr, decay_steps=max(total_steps, 1))
    if optim.schedule == "multistep":
        boundaries = {int(round(m * steps_per_epoch)): optim.gamma for m in optim.milestones}
        return optax.piecewise_constant_schedule(optim.lr, boundaries)
    raise ValueError(f"config.optim.schedule: unknown schedule {optim.schedule!r}")


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """SGD with momentum and *coupled* weight decay, as PyTorch's ``SGD(weight_decay=wd)``.

    ``wd * theta`` is added to the gradient of every parameter (BN scales and biases included,
    as in the paper's code) before the momentum trace ``buf = momentum * buf + g`` and the update
    ``theta -= lr * buf``; with ``nesterov`` the update uses ``g + momentum * buf``.
    """
    return optax.chain(
        optax.add_decayed_weights(optim.weight_decay),
        optax.sgd(schedule, momentum=optim.momentum or None, nesterov=optim.nesterov),
    )


# ----------------------------------------------------------------------------- losses, metrics


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 per example whose label is among the ``k`` largest logits (k capped at num_classes).

    Counts classes scoring strictly higher than the label's logit, so ties favour the label
    (the same as torch.topk on distinct logits). An example with any non-finite logit is wrong, and so is
    one whose label is no class index (outside [0, num_classes)).
    """
    num_classes = logits.shape[-1]
    valid = (labels >= 0) & (labels < num_classes)
    label_logit = jnp.take_along_axis(logits, jnp.clip(labels, 0, num_classes - 1)[:, None], axis=-1)
    higher = jnp.sum(logits > label_logit, axis=-1)
    # every comparison with NaN is false: without this, NaN logits would count as correct
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    return ((higher < min(k, num_classes)) & finite & valid).astype(jnp.float32)


# ----------------------------------------------------------------------------- steps


def make_train_step(parts: ModelParts, tx: optax.GradientTransformation, *,
                    label_smoothing: float, augment: bool, mean, std, mesh: Mesh) -> Callable:
    """Returns jitted ``train_step(state, images_u8, labels, rng) -> (state, metrics)``.

    ``images_u8`` (B, H, W, C) uint8 and ``labels`` (B,) are sharded along the mesh; the images
    are augmented and normalised inside the step. The state argument is donated.
    """
    from oba_jax.experiment.data import preprocess_batch  # deferred: keeps this module importable on its own

    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def loss_fn(params, batch_stats, images, labels):
        logits, new_stats = apply_model(parts, params, batch_stats, images, train=True)
        loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
        return loss, (logits, new_stats)

    def train_step(state: TrainState, images_u8, labels, rng):
        images = preprocess_batch(images_u8, rng, augment=augment, mean=mean, std=std)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, new_stats)), grads = grad_fn(state.params, state.batch_stats, images, labels)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "accuracy": jnp.mean(topk_correct(logits, labels, 1))}
        return TrainState(state.step + 1, params, new_stats, opt_state), metrics

    rep = replicated(mesh)
    return jax.jit(train_step, donate_argnums=0, out_shardings=(rep, rep))


def make_eval_step(parts: ModelParts, *, mean, std, mesh: Mesh) -> Callable:
    """Returns jitted ``eval_step(params, batch_stats, images_u8, labels, weights) -> sums``.

    Sums (not means) of loss, top-1, top-5 and the example count over examples with weight 1,
    so padded examples (weight 0) of the last batch do not count.
    """
    from oba_jax.experiment.data import preprocess_batch

    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def eval_step(params, batch_stats, images_u8, labels, weights):
        images = preprocess_batch(images_u8, None, augment=False, mean=mean, std=std)
        logits, _ = apply_model(parts, params, batch_stats, images, train=False)
        loss = cross_entropy(logits, labels)
        return {"loss": jnp.sum(loss * weights),
                "top1": jnp.sum(topk_correct(logits, labels, 1) * weights),
                "top5": jnp.sum(topk_correct(logits, labels, 5) * weights),
                "count": jnp.sum(weights)}

    return jax.jit(eval_step, out_shardings=replicated(mesh))


# ----------------------------------------------------------------------------- data order


def step_rng(seed: int, step: int) -> jax.Array:
    """The augmentation/dropout key of global step ``step``; a pure function of ``(seed, step)``."""
    return jax.random.fold_in(jax.random.key(seed), step)


# ----------------------------------------------------------------------------- trainer


@dataclasses.dataclass
class Trainer:
    """The compiled functions and the input of one training run (built by :func:`make_trainer`)."""

    config: ml_collections.ConfigDict
    parts: ModelParts
    mesh: Mesh
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    train_step: Callable
    eval_step: Callable
    inputs: inputs_lib.TrainInput     # the training batches by global step
    dataset: Any                      # evaluated on (its test split)
    steps_per_epoch: int
    total_steps: int
    num_train: int


def steps_per_epoch_of(num_train: int, batch_size: int) -> int:
    if num_train < batch_size:
        raise config_lib.ConfigError(f"config.train.batch_size: {batch_size} exceeds the {num_train} training "
                                     "examples (the incomplete last batch is dropped, so no step would run)")
    return num_train // batch_size


def check_step_count(config: ml_collections.ConfigDict, num_train: int, section: str = "train") -> None:
    """ConfigError unless the epochs of `config` make at least one step on `num_train` examples (an explicit
    `max_steps=0`, e.g. only a fine-tuning's step-0 checkpoint, is a choice, not an error); `section` is where
    the epochs were set ("finetune" for `config_lib.finetune_config`), so the message names that key."""
    spe = steps_per_epoch_of(num_train, config.train.batch_size)
    if int(round(config.train.epochs * spe)) >= 1:
        return
    raise config_lib.ConfigError(
        f"config.{section}.epochs: {config.train.epochs:g} epochs of {spe} steps ({num_train} examples, batch "
        f"{config.train.batch_size}) round to 0 steps; train at least one step (epochs >= {1 / spe:.3g})")


def total_steps_of(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """``epochs * steps_per_epoch``, capped by ``train.max_steps`` when set."""
    total = int(round(config.train.epochs * steps_per_epoch))
    if config.train.get("max_steps") is not None:
        total = min(total, int(config.train.max_steps))
    return total


def make_trainer(config: ml_collections.ConfigDict, parts: ModelParts, dataset, mesh: Mesh | None = None, *,
                 masks: Any = None) -> Trainer:
    """Compiles the step functions and opens the training input (an in-memory training set goes on device). With
    `masks` (a bool pytree like the params, True = kept) the optimizer is `masked_optimizer(tx, masks)`: pruned
    weights stay zero. The trainer's input may hold worker processes: `trainer.inputs.close()` when done."""
    mesh = data_mesh() if mesh is None else mesh
    compute = config.train.get("compute_dtype", "float32")     # (one of config_lib.COMPUTE_DTYPES)
    parts = dataclasses.replace(parts, compute_dtype=None if compute == "float32" else jnp.dtype(compute))
    spe = steps_per_epoch_of(dataset.num_train, config.train.batch_size)
    total = total_steps_of(config, spe)
    # The schedule is defined over the full epochs even when max_steps truncates the run, so a
    # truncated run follows the same lr curve as the first max_steps of the full run.
    schedule = learning_rate_schedule(config.optim, spe, int(round(config.train.epochs * spe)))
    tx = make_optimizer(config.optim, schedule)
    if masks is not None:
        tx = masked_optimizer(tx, masks)
    common = dict(mean=dataset.mean, std=dataset.std, mesh=mesh)
    train_step = make_train_step(parts, tx, label_smoothing=config.optim.label_smoothing,
                                 augment=config.data.augment, **common)
    eval_step = make_eval_step(parts, **common)
    train_input = inputs_lib.train_input(dataset, seed=config.train.seed, batch_size=config.train.batch_size,
                                         steps_per_epoch=spe, num_steps=total, mesh=mesh)
    return Trainer(config, parts, mesh, schedule, tx, train_step, eval_step, train_input, dataset, spe, total,
                   dataset.num_train)


def create_state(trainer: Trainer, params: Any, batch_stats: Any) -> TrainState:
    """Step 0 state with a fresh optimizer, replicated over the mesh."""
    state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, trainer.tx.init(params))
    return put_replicated(jax.device_get(state), trainer.mesh)


def train_steps(trainer: Trainer, state: TrainState, start_step: int, stop_step: int,
                on_step: Callable[[int, TrainState, Mapping[str, jax.Array]], None] | None = None) -> TrainState:
    """Runs global steps ``[start_step, stop_step)``; ``on_step(step_done, state, metrics)`` after each.

    Batches are looked up by global step, so any range can be run (that is what makes resume exact).
    """
    cfg = trainer.config.train
    for step in range(start_step, stop_step):
        images, labels = trainer.inputs.batch(step)
        state, metrics = trainer.train_step(state, images, labels, step_rng(cfg.seed, step))
        if on_step is not None:
            on_step(step + 1, state, metrics)
    return state


def evaluate(trainer: Trainer, params: Any, batch_stats: Any, images: np.ndarray | None = None,
             labels: np.ndarray | None = None) -> Metrics:
    """Mean loss, top-1 and top-5 accuracy (BN in eval mode) on the test set (or the given host arrays)."""
    bs = trainer.config.train.eval_batch_size
    return _evaluate(trainer.eval_step, params, batch_stats,
                     inputs_lib.eval_batches(trainer.dataset, bs, trainer.mesh, images, labels))


def evaluate_model(model: nnx.Module, dataset, batch_size: int, mesh: Mesh | None = None) -> Metrics:
    """`evaluate` for a model alone (e.g. a pruned one) on `dataset`'s test split."""
    mesh = data_mesh() if mesh is None else mesh
    parts, params, batch_stats = split_model(model)
    step = make_eval_step(parts, mean=dataset.mean, std=dataset.std, mesh=mesh)
    params, batch_stats = put_replicated(jax.device_get((params, batch_stats)), mesh)
    return _evaluate(step, params, batch_stats, inputs_lib.eval_batches(dataset, batch_size, mesh))


def model_evaluator(model: nnx.Module, dataset, batch_size: int,
                    mesh: Mesh | None = None) -> Callable[[Any], Metrics]:
    """`evaluate(params) -> metrics` of `model` with other values of its `nnx.Param` state (e.g. masked
    ones) on `dataset`'s test split: one compiled eval step for every call."""
    mesh = data_mesh() if mesh is None else mesh
    parts, _, batch_stats = split_model(model)
    step = make_eval_step(parts, mean=dataset.mean, std=dataset.std, mesh=mesh)
    batch_stats = put_replicated(jax.device_get(batch_stats), mesh)

    def evaluate_params(params: Any) -> Metrics:
        return _evaluate(step, put_replicated(jax.device_get(params), mesh), batch_stats,
                         inputs_lib.eval_batches(dataset, batch_size, mesh))
    return evaluate_params


def _evaluate(eval_step: Callable, params: Any, batch_stats: Any, batches) -> Metrics:
    """Sums of the eval step over `batches` (global `(images, labels, weights)`), as means over the weight."""
    totals = None
    for x, y, w in batches:
        sums = eval_step(params, batch_stats, x, y, w)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    n = max(float(totals["count"]), 1.0)
    return {"loss": float(totals["loss"]) / n, "top1": float(totals["top1"]) / n, "top5": float(totals["top5"]) / n}


# ----------------------------------------------------------------------------- logging


class MetricsLog:
    """Appends one JSON object per line to ``workdir/metrics.jsonl`` (process 0 only).

    A run killed mid-write leaves a last line without its newline; the next record would be glued to it and
    both lost, so opening the log cuts such a torn tail off (with a warning) before anything is appended."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, METRICS_FILE)
        if jax.process_index() == 0:
            _cut_torn_tail(self.path)

    def write(self, record: Mapping[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")


def _cut_torn_tail(path: str) -> None:
    """Truncates `path` after its last newline if it does not end with one (a writer killed mid-line)."""
    try:
        with open(path, "rb+") as f:
            data = f.read()
            if not data or data.endswith(b"\n"):
                return
            keep = data.rfind(b"\n") + 1
            f.truncate(keep)
    except FileNotFoundError:
        return
    print(f"warning: {path}: dropped a torn last line ({len(data) - keep} bytes, from a run killed while writing it)",
          file=sys.stderr)


def read_metrics(workdir: str) -> list[dict]:
    """All records of ``workdir/metrics.jsonl`` (keeping the last record per (kind, step) after resumes);
    lines that are not JSON objects (a torn write) are skipped with one warning naming them."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    records: dict[tuple, dict] = {}
    skipped: list[int] = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError:
                r = None
            if not isinstance(r, dict):
                skipped.append(number)
                continue
            records[(r.get("kind"), r.get("step"))] = r
    if skipped:
        print(f"warning: {path}: skipped {len(skipped)} line(s) that are not JSON records (line "
              f"{', '.join(map(str, skipped[:5]))}{', …' if len(skipped) > 5 else ''})", file=sys.stderr)
    return sorted(records.values(), key=lambda r: (r.get("step", 0), r.get("kind", "")))


def plot_curves(workdir: str, filename: str = "curves.png") -> str | None:
    """Saves loss/accuracy curves from metrics.jsonl as a PNG; returns its path (None if no data)."""
    records = read_metrics(workdir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["train_loss"] for r in train], label="train")
        ax_acc.plot(steps, [r["train_accuracy"] for r in train], label="train top-1")
    if evals:
        steps = [r["step"] for r in evals]
        ax_loss.plot(steps, [r["eval_loss"] for r in evals], "o-", label="test")
        ax_acc.plot(steps, [r["eval_top1"] for r in evals], "o-", label="test top-1")
        ax_acc.plot(steps, [r["eval_top5"] for r in evals], "s--", label="test top-5")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _progress_bar(total_images: int, initial_images: int, enabled: bool, epochs: float, workdir: str | None):
    from oba_jax.experiment.progress import progress_bar
    # named by the run: prune.py fine-tunes several (ops_0.5, unstructured_oba, n_m_oba, …) into one log
    desc = "train" if workdir is None else f"train {os.path.basename(os.path.normpath(workdir))}"
    return progress_bar(total_images, desc, "img", initial=initial_images, unit_scale=True, enabled=enabled,
                        lines=max(1, min(int(round(epochs)), 50)) if epochs >= 1 else 10)


# ----------------------------------------------------------------------------- loops


def fit(model: nnx.Module, dataset, config: ml_collections.ConfigDict, workdir: str | None, *,
        spec=None, mesh: Mesh | None = None, masks: Any = None) -> tuple[nnx.Module, Metrics]:
    """Trains ``model`` on ``dataset`` per ``config``; returns the trained model and final metrics.

    With a ``workdir``: logs to ``metrics.jsonl``, checkpoints every ``train.checkpoint_every_steps``
    and at the end, resumes from the latest checkpoint there, and plots the curves. ``spec`` (the
    model's architecture spec; default ``model.spec``) is stored in the checkpoint so
    :func:`oba_jax.checkpoint.restore_model` can rebuild the model alone. ``model`` is not modified.
    ``masks`` (bool pytree like the ``nnx.Param`` state): masked training — the pruned weights start and
    stay exactly zero, and the masks are part of the optimizer state, so checkpoints hold them.
    """
    if workdir is None:
        return _fit(model, dataset, config, None, spec=spec, mesh=mesh, masks=masks)
    with workdir_lock(workdir), ckpt_lib.os_errors_naming(workdir):
        return _fit(model, dataset, config, workdir, spec=spec, mesh=mesh, masks=masks)


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite; the checkpoints written before stay as they were."""


def _check_finite(loss: Any, step: int, last_saved: int | None) -> None:
    value = float(jax.device_get(loss))
    if not np.isfinite(value):
        kept = (f"the last checkpoint (step {last_saved}) is kept" if last_saved is not None
                else "no checkpoint was written")
        raise TrainingDivergedError(
            f"the training loss of step {step} is {value}: training stopped there and {kept}. Lower the learning "
            "rate (optim.lr / finetune.lr) or check the data for NaN/inf")


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _check_state_finite(state: "TrainState", step: int, last_saved: int | None) -> None:
    """A finite loss does not make the update that followed it finite: the parameters are checked too."""
    if not bool(jax.device_get(_all_finite(state.params))):
        kept = (f"the last checkpoint (step {last_saved}) is kept" if last_saved is not None
                else "no checkpoint was written")
        raise TrainingDivergedError(
            f"the parameters after step {step} are not finite (NaN or inf): training stopped there and {kept}. "
            "Lower the learning rate (optim.lr / finetune.lr) or check the data for NaN/inf")


def _warn_changed(meta: Mapping[str, Any], config: ml_collections.ConfigDict, step: int) -> None:
    """A resume under another batch size or learning rate is allowed, but never silently."""
    stored = meta.get("config") or {}
    for section, key in (("train", "batch_size"), ("optim", "lr")):
        before = (stored.get(section) or {}).get(key)
        now = config[section][key]
        if before is not None and before != now and jax.process_index() == 0:
            print(f"warning: resuming from step {step} with {section}.{key}={now}, but the checkpoint was written "
                  f"with {section}.{key}={before}", file=sys.stderr)


def _fit(model: nnx.Module, dataset, config: ml_collections.ConfigDict, workdir: str | None, *,
         spec, mesh: Mesh | None, masks: Any) -> tuple[nnx.Module, Metrics]:
    t_start = time.time()
    parts, params, batch_stats = split_model(model)
    if masks is not None:
        params = apply_masks(params, masks)
    trainer = make_trainer(config, parts, dataset, mesh, masks=masks)
    state = create_state(trainer, params, batch_stats)
    spec = getattr(model, "spec", None) if spec is None else spec

    manager, log, elapsed_before, last_saved = None, None, 0.0, None   # what a workdir adds
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        log = MetricsLog(workdir)
        manager = ckpt_lib.make_manager(workdir)
    try:
        if manager is not None:
            restored = ckpt_lib.restore_state(manager, state, spec=spec, set_aside_corrupt=True)
            if restored is not None:
                state, meta = restored
                elapsed_before = float(meta.get("wall_time", 0.0))
                last_saved = int(jax.device_get(state.step))
                _warn_changed(meta, config, last_saved)
                _restore_input(trainer, manager, last_saved)
        start = int(jax.device_get(state.step))
        end = max(start, trainer.total_steps)
        if start > trainer.total_steps and jax.process_index() == 0:
            print(f"warning: the checkpoint in {workdir} is at step {start}, already past the {trainer.total_steps} "
                  f"steps this config trains (train.max_steps / epochs): nothing to train; reporting the step-{start} "
                  "model", file=sys.stderr)
        outputs = _Outputs(workdir, manager, log, spec, last_saved,
                           wall=lambda: elapsed_before + time.time() - t_start)   # wall time summed over resumes
        result = _run(trainer, state, start, end, parts, config, outputs)
    except BaseException:
        trainer.inputs.close()
        if manager is not None:
            # a signal can land inside orbax's save, between creating its writer thread and starting it; closing
            # then raises "cannot join thread before it is started", which would replace the interrupt (or the
            # error) in flight with a traceback. The checkpoints already on disk are complete either way.
            with contextlib.suppress(Exception):
                manager.close()
        raise
    trainer.inputs.close()
    if manager is not None:
        manager.close()
    return result


def _restore_input(trainer: Trainer, manager, step: int) -> None:
    """The input iterator's state saved with `step`, when the input has one and the step holds it for this process
    layout; otherwise (or if it does not point at `step`) the input starts at `step` by itself, which reads the
    same batches (they are keyed by step)."""
    iterator = trainer.inputs.checkpoint_item()
    if iterator is None:
        return
    try:
        restored = ckpt_lib.restore_input(manager, step, iterator)
    except ckpt_lib.CorruptCheckpointError as err:   # the weights are intact: lose only the iterator's state
        print(f"warning: {err}; the input starts afresh at step {step}, which reads the same batches", file=sys.stderr)
        iterator.seek(step)
        return
    if restored and iterator.next_step != step:
        if jax.process_index() == 0:
            print(f"warning: the input state saved with step {step} is at step {iterator.next_step}; reading from "
                  f"step {step} instead", file=sys.stderr)
        iterator.seek(step)


@dataclasses.dataclass(frozen=True)
class _Outputs:
    """Where a fit writes (all None without a workdir) and what it resumed from."""

    workdir: str | None
    manager: Any                  # ocp.CheckpointManager
    log: MetricsLog | None
    spec: Any                     # stored in every checkpoint
    last_saved: int | None        # the step of the newest checkpoint, None if there is none
    wall: Callable[[], float]     # seconds of training so far, resumed runs included


def _run(trainer: Trainer, state: TrainState, start: int, end: int, parts: ModelParts, config: ml_collections.ConfigDict,
         out: _Outputs) -> tuple[nnx.Module, Metrics]:
    """The training loop of `fit` from `start` to `trainer.total_steps`, then the evaluation and the final
    checkpoint at `end` (the step the model is at: `start` when the checkpoint is already past the run)."""
    cfg = config.train
    workdir, manager, log, wall = out.workdir, out.manager, out.log, out.wall
    saved = [out.last_saved]

    def save(state: TrainState, step: int, loss: Any) -> None:
        if manager is not None:
            if loss is not None:
                _check_finite(loss, step, saved[0])   # never checkpoint a diverged state
            _check_state_finite(state, step, saved[0])
            epoch, in_epoch = divmod(step, trainer.steps_per_epoch)
            ckpt_lib.save_state(manager, step, state, spec=out.spec, config=config,
                                data_position={"epoch": epoch, "step_in_epoch": in_epoch},
                                extra={"wall_time": wall()}, input_iterator=trainer.inputs.checkpoint_item())
            saved[0] = step

    bar = _progress_bar(trainer.total_steps * cfg.batch_size, start * cfg.batch_size,
                        bool(config.train.get("progress_bar", True)), trainer.total_steps / trainer.steps_per_epoch,
                        workdir)
    window: list[Mapping[str, jax.Array]] = []
    previous: list = [None]   # (step, loss) of the step before: checked one step late, so the device keeps a step queued

    def on_step(step: int, state: TrainState, metrics) -> None:
        if previous[0] is not None:
            _check_finite(previous[0][1], previous[0][0], saved[0])
        previous[0] = (step, metrics["loss"])
        bar.update(cfg.batch_size)
        window.append(metrics)
        # Reading metrics forces a device sync, so it happens only every log_every_steps.
        if step % cfg.log_every_steps == 0 or step == trainer.total_steps:
            host = jax.device_get(window)
            loss = float(np.mean([m["loss"] for m in host]))
            acc = float(np.mean([m["accuracy"] for m in host]))
            window.clear()
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}")
            if log is not None:
                log.write({"kind": "train", "step": step, "epoch": step / trainer.steps_per_epoch,
                           "lr": float(trainer.schedule(step - 1)), "train_loss": loss,
                           "train_accuracy": acc, "wall_time": wall()})
        if step % trainer.steps_per_epoch == 0 and step != trainer.total_steps:
            record_eval(step, state)
        if step % cfg.checkpoint_every_steps == 0 and step != trainer.total_steps:
            save(state, step, metrics["loss"])

    def record_eval(step: int, state: TrainState) -> Metrics:
        metrics = evaluate(trainer, state.params, state.batch_stats)
        if log is not None:
            log.write({"kind": "eval", "step": step, "epoch": step / trainer.steps_per_epoch,
                       **{f"eval_{k}": v for k, v in metrics.items()}, "wall_time": wall()})
        return metrics

    try:
        state = train_steps(trainer, state, start, trainer.total_steps, on_step)
        if previous[0] is not None:
            _check_finite(previous[0][1], previous[0][0], saved[0])
    finally:
        bar.close()
    final = record_eval(end, state)
    if manager is not None:
        if manager.latest_step() != end:
            save(state, end, None)
        manager.wait_until_finished()
    if workdir is not None and config.get("plot", {}).get("enabled", True) and jax.process_index() == 0:
        plot_curves(workdir, config.plot.get("filename", "curves.png"))
    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    trained = merge_model(parts, params, batch_stats)
    final = {**final, "steps": end, "epochs": end / trainer.steps_per_epoch, "wall_time": wall()}
    return trained, final


def load_dataset_for(config: ml_collections.ConfigDict):
    """The dataset named by ``config.data``: in memory, or with ``data.stream`` a prepared TFDS dataset read from
    disk, its images of the model's input size (synthetic kwargs only for ``synthetic``)."""
    from oba_jax.experiment import data
    if config.data.get("stream", False):
        from models import input_shape
        from oba_jax.experiment import streaming
        name = config.data.name
        mean, std = data.NORMALIZATION.get(name, ((0.5,), (0.5,)))
        shape = tuple(input_shape(config_lib.model_spec(config)))
        return streaming.open_stream(name, config.data.data_dir, image_shape=shape,
                                     host_transform=config.data.host_transform, num_workers=config.data.num_workers,
                                     mean=mean, std=std)
    kwargs = dict(config.data.synthetic) if config.data.name == "synthetic" else {}
    if "image_shape" in kwargs:
        kwargs["image_shape"] = tuple(kwargs["image_shape"])
    return data.load_dataset(config.data.name, config.data.data_dir, download=config.data.download, **kwargs)


def count_params(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def check_dataset_matches(spec, dataset) -> None:
    """Fails early (naming the config key) when the model's input/classes do not fit the dataset."""
    from models import input_shape
    expected = tuple(input_shape(spec))
    got = tuple(dataset.image_shape)
    if expected != got:
        raise config_lib.ConfigError(
            f"config.model.spec: the model expects {expected} images but dataset {dataset.name!r} has {got}")
    if spec.num_classes != dataset.num_classes:
        raise config_lib.ConfigError(
            f"config.model.spec.num_classes: {spec.num_classes} != {dataset.num_classes} classes in {dataset.name!r}")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | None) -> Metrics:
    """Builds the model and dataset from ``config``, trains (resuming from ``workdir``), evaluates.

    ``workdir=None`` trains without checkpoints, logs or plots.

    Returns the final test metrics plus ``num_params``, ``steps``, ``epochs`` and ``wall_time``.
    """
    from models import build_model
    spec = config_lib.model_spec(config)
    dataset = load_dataset_for(config)
    check_dataset_matches(spec, dataset)
    check_step_count(config, dataset.num_train)
    model = build_model(spec, rngs=nnx.Rngs(config.train.seed))
    _, metrics = fit(model, dataset, config, workdir, spec=spec)
    return {**metrics, "num_params": count_params(model), "dataset": dataset.name,
            "dataset_source": dataset.source, "model": spec.family}
