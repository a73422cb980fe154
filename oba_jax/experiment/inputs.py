"""The one input contract of training, importance scoring and evaluation, for both kinds of dataset.

- training: `TrainInput.batch(step)` is the global batch of global step `step`, sharded along the data mesh
  (each process supplies its part). In-memory datasets (`data.ArrayDataset`) keep their uint8 training set on
  device and gather the step's indices there; streamed ones (`streaming.StreamingDataset`) read the step's
  examples from disk through Grain. Both take the step's examples from `streaming.epoch_order`, so they give the
  same batches for the same data, and a run resumed at step `s` reads what an uninterrupted run read.
- evaluation: `eval_batches(dataset, batch_size, mesh)` yields global `(images, labels, weights)`, the last batch
  padded with weight-0 examples.
- samples: `examples(dataset, split, indices)` — host uint8 images and labels with the evaluation transform (the
  scoring batches, an example input).

What differs between the two kinds lives in one table, `_KINDS`, looked up once per call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from oba_jax.experiment import streaming
from oba_jax.sharding import batch_sharded, put_replicated

Batch = tuple[jax.Array, jax.Array]


class TrainInput(Protocol):
    def batch(self, step: int) -> Batch:
        """The global batch of global step `step`: uint8 images and int32 labels, sharded along the mesh."""

    def checkpoint_item(self) -> Any:
        """What the checkpoint saves of the input and restores into (a Grain-checkpointable iterator whose
        `next_step` is the step it reads next), or None when the step says it all (in-memory data)."""

    def close(self) -> None:
        """Stop worker processes (if any)."""


def batch_indices(seed: int, epoch: int, step_in_epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """Indices of batch `step_in_epoch` of `epoch` (the incomplete last batch is dropped)."""
    order = streaming.epoch_order(seed, epoch, num_examples)
    return order[step_in_epoch * batch_size:(step_in_epoch + 1) * batch_size].astype(np.int32)


@dataclasses.dataclass
class _DeviceTrainInput:
    """An in-memory training set, replicated on device; a step's batch is gathered there (only the index vector
    crosses from the host)."""

    images: jax.Array
    labels: jax.Array
    gather: Any
    seed: int
    batch_size: int
    steps_per_epoch: int

    def batch(self, step: int) -> Batch:
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        idx = batch_indices(self.seed, epoch, in_epoch, len(self.labels), self.batch_size)
        return self.gather(self.images, self.labels, idx)

    def checkpoint_item(self) -> None:
        return None

    def close(self) -> None:
        pass


class _StreamTrainInput:
    """A streamed training set: this process's part of every global batch, read by Grain (`streaming`)."""

    def __init__(self, ds: streaming.StreamingDataset, seed: int, batch_size: int, steps_per_epoch: int,
                 num_steps: int, mesh: Mesh):
        self._batches = streaming.train_batches(ds, seed=seed, global_batch=batch_size, steps_per_epoch=steps_per_epoch,
                                                num_steps=num_steps, process_index=jax.process_index(),
                                                process_count=jax.process_count())
        self._sharding = batch_sharded(mesh)
        self._stream = streaming.StepIterator(self._batches, 0, ds.num_workers)

    def batch(self, step: int) -> Batch:
        if self._stream.next_step != step:   # a jump (a resume without the iterator's state): start there
            self._stream.seek(step)
        images, labels = next(self._stream)
        return (jax.make_array_from_process_local_data(self._sharding, images),
                jax.make_array_from_process_local_data(self._sharding, labels))

    def checkpoint_item(self) -> streaming.StepIterator:
        return self._stream

    def close(self) -> None:
        self._stream.close()


# ----------------------------------------------------------------------------- the table


def _device_train_input(ds, seed: int, batch_size: int, steps_per_epoch: int, num_steps: int, mesh: Mesh):
    out = batch_sharded(mesh)
    gather = jax.jit(lambda images, labels, idx: (images[idx], labels[idx]), out_shardings=(out, out))
    images, labels = put_replicated((ds.train_images, ds.train_labels.astype(np.int32)), mesh)
    return _DeviceTrainInput(images, labels, gather, seed, batch_size, steps_per_epoch)


def _device_eval_batches(ds, batch_size: int, mesh: Mesh, images=None, labels=None) -> Iterator[tuple]:
    images = np.asarray(ds.test_images if images is None else images)
    labels = np.asarray(ds.test_labels if labels is None else labels, np.int32)
    sharding = batch_sharded(mesh)
    for start in range(0, len(labels), batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        w = np.ones(len(y), np.float32)
        pad = batch_size - len(y)   # one shape for every batch: pad the last one and give the padding weight 0
        if pad:
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y, w = np.concatenate([y, np.zeros(pad, y.dtype)]), np.concatenate([w, np.zeros(pad, np.float32)])
        yield tuple(jax.make_array_from_callback(a.shape, sharding, lambda i, a=a: a[i]) for a in (x, y, w))


def _stream_eval_batches(ds, batch_size: int, mesh: Mesh, images=None, labels=None) -> Iterator[tuple]:
    if images is not None or labels is not None:
        return _device_eval_batches(ds, batch_size, mesh, images, labels)
    batches = streaming.eval_batches(ds, global_batch=batch_size, process_index=jax.process_index(),
                                     process_count=jax.process_count())
    sharding = batch_sharded(mesh)

    def generate():
        iterator = streaming.iterate(batches, 0, ds.num_workers, processes=False)
        try:
            for local in iterator:
                yield tuple(jax.make_array_from_process_local_data(sharding, a) for a in local)
        finally:
            getattr(iterator, "close", lambda: None)()
    return generate()


def _device_examples(ds, split: str, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = (ds.train_images, ds.train_labels) if split == "train" else (ds.test_images, ds.test_labels)
    indices = np.asarray(indices, np.int64)
    return np.asarray(images[indices]), np.asarray(labels[indices], np.int32)


@dataclasses.dataclass(frozen=True)
class _Kind:
    train_input: Any
    eval_batches: Any
    examples: Any


_KINDS = {False: _Kind(_device_train_input, _device_eval_batches, _device_examples),
          True: _Kind(_StreamTrainInput, _stream_eval_batches, streaming.examples)}


def _kind(dataset) -> _Kind:
    return _KINDS[bool(dataset.streams)]


def train_input(dataset, *, seed: int, batch_size: int, steps_per_epoch: int, num_steps: int,
                mesh: Mesh) -> TrainInput:
    """The training batches of `dataset` by global step (see the module docstring)."""
    return _kind(dataset).train_input(dataset, seed, batch_size, steps_per_epoch, num_steps, mesh)


def eval_batches(dataset, batch_size: int, mesh: Mesh, images: np.ndarray | None = None,
                 labels: np.ndarray | None = None) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
    """Global `(images, labels, weights)` batches of `dataset`'s test split (or of the given host arrays)."""
    return _kind(dataset).eval_batches(dataset, batch_size, mesh, images, labels)


def examples(dataset, split: str, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Host `(uint8 images, int32 labels)` of examples `indices` of `split` ("train" or "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _kind(dataset).examples(dataset, split, indices)
