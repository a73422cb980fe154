"""Streaming input with Grain: a prepared TFDS dataset (array_record, read by random access) as batches keyed by
global step, decoded and augmented in worker processes.

Every batch is a pure function of where it is:

- training step `s` of a run with global batch `B`, `P` processes and `spe` steps per epoch holds the examples
  `epoch_order(seed, e, n)[i*B:(i+1)*B]` with `e, i = divmod(s, spe)` — the in-memory input's order exactly
  (`oba_jax.experiment.inputs.batch_indices`), so a dataset gives the same batches from memory and from disk;
  process `p` reads its `B/P` consecutive examples of that batch;
- an example's augmentation draws from `np.random.default_rng((seed, epoch, index))`;
- evaluation batch `k` holds the examples `k*B .. k*B+B-1` in file order, the last batch padded with weight 0.

So `MapDataset[s]` is the batch of step `s` wherever it is computed (in this process or a Grain worker), and a
run that resumes at step `s` reads what an uninterrupted run would have read. This module imports numpy, PIL and
Grain (which imports JAX), no Flax and no model code: its classes are pickled into Grain's worker processes, which
should start quickly.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from oba_jax.experiment import imagenet

# host-side transforms by name: what `data.host_transform` selects ("none": decode only, the stored size)
HOST_TRANSFORMS = ("none", "imagenet")
# the split evaluated, by preference: ImageNet has no labelled test split, its validation split is the benchmark
EVAL_SPLITS = ("validation", "test")


@dataclasses.dataclass(frozen=True)
class StreamingDataset:
    """A prepared TFDS image-classification dataset read from disk batch by batch (never held in memory)."""

    name: str
    folder: str                     # the prepared `<data_dir>/<name>/<version>/`
    train_split: str
    test_split: str
    num_train: int
    num_test: int
    num_classes: int
    image_shape: tuple[int, int, int]   # of every batch's images (after the host transform)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    host_transform: str             # one of HOST_TRANSFORMS
    num_workers: int                # Grain worker processes (0: decode in this process)
    source: str                     # where it came from, for reports

    @property
    def streams(self) -> bool:
        return True


class _Records:
    """Random access to one split's records, opened lazily in whichever process reads them (TFDS' source objects
    are not pickled into Grain's workers: each opens its own). The dataset is read from its files alone
    (`tfds.builder_from_directory`), so any prepared dataset works, registered with TFDS or not."""

    def __init__(self, folder: str, split: str):
        self.folder, self.split = folder, split
        self._source = None

    def __getstate__(self):
        return {"folder": self.folder, "split": self.split, "_source": None}

    def __getitem__(self, index: int) -> dict:
        try:
            if self._source is None:
                import tensorflow_datasets as tfds
                # the encoded bytes: the host transform decodes them (PIL; TFDS' decoder would decode them first)
                self._source = tfds.builder_from_directory(self.folder).as_data_source(
                    self.split, decoders={"image": tfds.decode.SkipDecoding()})
            return self._source[int(index)]
        except Exception as err:   # array_record / TFDS raise assorted errors for a damaged shard
            from oba_jax.experiment.data import CorruptDatasetError
            detail = str(err).splitlines()[0] if str(err) else ""
            raise CorruptDatasetError(
                f"{self.folder}: record {index} of the {self.split!r} split cannot be read ({type(err).__name__}: "
                f"{detail}); its shard {_shard_of(self.folder, self.split, int(index))} is damaged or not this "
                "dataset's: prepare the dataset again") from err


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the training examples in `epoch`, in memory or streamed: a pure function of `(seed, epoch)`,
    cached for the two epochs a worker can straddle (the returned array is shared: do not write to it)."""
    return np.random.default_rng((seed, epoch)).permutation(num_examples)


def _fixed_shape(image: Any, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """The stored image decoded as it is (its own channels), which must have the dataset's shape."""
    if isinstance(image, (bytes, bytearray)):
        from PIL import Image
        with Image.open(io.BytesIO(image)) as pil:
            image = np.asarray(pil)
    array = np.asarray(image, np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape != tuple(shape):
        from oba_jax.experiment.data import CorruptDatasetError
        raise CorruptDatasetError(f"{where}: an image of shape {array.shape}, not the {tuple(shape)} of the dataset; "
                                  "set data.host_transform='imagenet' to crop and resize images of varying size")
    return array


@dataclasses.dataclass
class _TrainExample:
    """Example `k` of this process's training stream -> (uint8 image, label): step `k // b`, slot `k % b`."""

    records: _Records
    seed: int
    num_examples: int
    global_batch: int
    local_batch: int
    process_index: int
    steps_per_epoch: int
    host_transform: str
    image_shape: tuple[int, int, int]

    def __call__(self, k: int) -> tuple[np.ndarray, np.int32]:
        step, slot = divmod(int(k), self.local_batch)
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        position = in_epoch * self.global_batch + self.process_index * self.local_batch + slot
        index = int(epoch_order(self.seed, epoch, self.num_examples)[position])
        record = self.records[index]
        if self.host_transform == "imagenet":
            rng = np.random.default_rng((self.seed, epoch, index))
            image = imagenet.train_transform(record["image"], rng, self.image_shape[0])
        else:
            image = _fixed_shape(record["image"], self.image_shape, f"{self.records.split}[{index}]")
        return image, np.int32(record["label"])


@dataclasses.dataclass
class _EvalExample:
    """Example `index` of a split with the evaluation transform; an index past the end is padding (weight 0)."""

    records: _Records
    num_examples: int
    host_transform: str
    image_shape: tuple[int, int, int]

    def __call__(self, index: int) -> tuple[np.ndarray, np.int32, np.float32]:
        index = int(index)
        if index >= self.num_examples:
            return np.zeros(self.image_shape, np.uint8), np.int32(0), np.float32(0.0)
        record = self.records[index]
        if self.host_transform == "imagenet":
            size = self.image_shape[0]
            image = imagenet.eval_transform(record["image"], size, round(size * imagenet.RESIZE_SIZE / imagenet.IMAGE_SIZE))
        else:
            image = _fixed_shape(record["image"], self.image_shape, f"{self.records.split}[{index}]")
        return image, np.int32(record["label"]), np.float32(1.0)


def _stack(examples: Sequence[tuple]) -> tuple[np.ndarray, ...]:
    return tuple(np.stack(column) for column in zip(*examples))


def train_batches(ds: StreamingDataset, *, seed: int, global_batch: int, steps_per_epoch: int, num_steps: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """Element `s` is this process's part of the global batch of training step `s < num_steps`:
    `(images uint8 (B/P, H, W, C), labels int32 (B/P,))`."""
    local = global_batch // process_count
    example = _TrainExample(_Records(ds.folder, ds.train_split), seed, ds.num_train, global_batch, local,
                            process_index, steps_per_epoch, ds.host_transform, ds.image_shape)
    return grain.MapDataset.range(num_steps * local).map(example).batch(local, drop_remainder=True, batch_fn=_stack)


def eval_batches(ds: StreamingDataset, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
    """Element `k` is this process's part of evaluation batch `k`: `(images, labels, weights)`, the examples of
    `ds.test_split` in file order, the last global batch padded with weight-0 examples."""
    local = global_batch // process_count
    count = -(-ds.num_test // global_batch)
    example = _EvalExample(_Records(ds.folder, ds.test_split), ds.num_test, ds.host_transform,
                           ds.image_shape)
    position = _EvalPosition(global_batch, local, process_index)
    return (grain.MapDataset.range(count * local).map(position).map(example)
            .batch(local, drop_remainder=True, batch_fn=_stack))


@dataclasses.dataclass(frozen=True)
class _EvalPosition:
    """Example `k` of this process's evaluation stream -> its index in the split (this process's consecutive
    `local` slots of each global batch)."""

    global_batch: int
    local: int
    process_index: int

    def __call__(self, k: int) -> int:
        batch, slot = divmod(int(k), self.local)
        return batch * self.global_batch + self.process_index * self.local + slot


def examples(ds: StreamingDataset, split: str, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """`(images uint8, labels int32)` of the given examples of `split` ("train" or "test") with the evaluation
    transform (the scoring sample, an example input), read by the dataset's workers."""
    name, n = (ds.train_split, ds.num_train) if split == "train" else (ds.test_split, ds.num_test)
    example = _EvalExample(_Records(ds.folder, name), n, ds.host_transform, ds.image_shape)
    items = grain.MapDataset.source(np.asarray(indices, np.int64)).map(example)
    images, labels, _ = _stack(list(iterate(items, 0, ds.num_workers, processes=False)))
    return images, labels


def _flags_parsed() -> None:
    """Grain reads absl flags; a program that is not an absl app (ours, a notebook) has not parsed them."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _exit_with_parent(worker_index: int, worker_count: int, poll_s: float = 1.0) -> None:
    """Runs in each Grain worker: ends the worker once its parent is gone. A training process killed by SIGKILL
    cannot stop its workers, which would otherwise wait on their full queues for ever, holding memory."""
    import threading
    import time
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(0)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def iterate(batches: grain.MapDataset, start: int, num_workers: int, *, processes: bool,
            prefetch: int = 2) -> grain.DatasetIterator:
    """An iterator over `batches[start:]`, `prefetch` elements ahead per worker. With `processes`, `num_workers`
    Grain worker processes compute whole elements in turn (0: one background thread here); otherwise that many
    threads of this process do. Processes pay a start of about a second each (Python, Grain and TFDS imports), so
    they serve the long-lived training stream; an evaluation pass or a sample, started anew each time, uses
    threads (PIL's decode and resize release the GIL)."""
    _flags_parsed()
    if processes and num_workers > 0:
        dataset = batches.slice(slice(start, None)).to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                                                      prefetch_buffer_size=1))
        options = grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=prefetch)
        return iter(dataset.mp_prefetch(options, worker_init_fn=_exit_with_parent))
    threads = max(1, num_workers)
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch * threads)
    return iter(batches.slice(slice(start, None)).to_iter_dataset(read))


class StepIterator:
    """The training stream of one process from a given step, checkpointable with Grain's orbax handler.

    Its state (bytes, JSON) is `{"start": …, "next_step": …, "num_workers": …, "grain": …}`: the step its Grain
    iterator was started at, the step of the batch it returns next, its worker count, and Grain's own state of that
    iterator (its workers' positions; None before the first batch), which `set_state` gives back to a Grain
    iterator started at the same step with as many workers (with another count it starts afresh at `next_step`,
    which reads the same batches). Worker processes start with the first batch."""

    def __init__(self, batches: grain.MapDataset, start: int, num_workers: int):
        self._batches, self._workers = batches, num_workers
        self.start = self.next_step = int(start)
        self._iterator: grain.DatasetIterator | None = None
        self._pending_state: Any = None

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._iterator is None:
            self._iterator = iterate(self._batches, self.start, self._workers, processes=True)
            if self._pending_state is not None:
                self._iterator.set_state(self._pending_state)
                self._pending_state = None
        # copied out of the worker's shared memory, which is then released at once (not when JAX lets go of it)
        batch = tuple(np.array(a, copy=True) for a in next(self._iterator))
        self.next_step += 1
        return batch

    def get_state(self) -> bytes:
        inner = self._iterator.get_state() if self._iterator is not None else self._pending_state
        return json.dumps({"start": self.start, "next_step": self.next_step, "num_workers": self._workers,
                           "grain": inner}).encode()

    def set_state(self, state: bytes) -> None:
        values = json.loads(state)
        self.close()
        self.start, self.next_step = int(values["start"]), int(values["next_step"])
        self._pending_state = values["grain"]
        if values.get("num_workers") != self._workers:   # Grain's state is its workers': start afresh at the step
            self.seek(self.next_step)

    def seek(self, step: int) -> None:
        """Read from `step` on (a fresh Grain iterator started there)."""
        self.close()
        self.start = self.next_step = int(step)
        self._pending_state = None

    def start_prefetch(self) -> None:
        """(Grain's handler calls this after `set_state`; the workers start with the first batch.)"""

    def close(self) -> None:
        if self._iterator is not None:
            getattr(self._iterator, "close", lambda: None)()
            self._iterator = None


def open_stream(name: str, data_dir: str | None, *, image_shape: tuple[int, int, int], host_transform: str,
                num_workers: int, mean: Sequence[float], std: Sequence[float]) -> StreamingDataset:
    """The prepared TFDS dataset `name` (the first of `data.tfds_search_dirs(data_dir)` that has it) as a stream.

    Raises `DatasetNotFoundError` when no directory has it or it lacks the train split or an evaluation split
    (`EVAL_SPLITS`), and `CorruptDatasetError` naming the shard when a record cannot be read (the first record of
    every shard and the last of each split are read here, so a truncated or foreign shard fails before any
    training; one damaged inside fails when it is read, with the same message)."""
    from oba_jax.experiment import data
    dirs = data.tfds_search_dirs(data_dir)
    found = [d for d in dirs if data.has_prepared_tfds(name, d)]
    if not found:
        raise data.DatasetNotFoundError(data.not_prepared_message(name, dirs))
    root = found[0]
    builder = _builder(name, root)
    splits = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
    evaluated = [s for s in EVAL_SPLITS if s in splits]
    if "train" not in splits or not evaluated:
        missing = "the 'train' split" if "train" not in splits else f"an evaluation split ({' or '.join(EVAL_SPLITS)})"
        raise data.DatasetNotFoundError(
            f"{builder.data_dir}: the prepared dataset {name!r} lacks {missing}; it has {sorted(splits) or 'no splits'}. "
            "Prepare it again with both (see README 'ImageNet')")
    features = builder.info.features
    if "label" not in features or not hasattr(features["label"], "num_classes") or "image" not in features:
        raise data.CorruptDatasetError(f"{builder.data_dir}: not an image-classification dataset (features "
                                       f"{sorted(features.keys())}; expected 'image' and a class 'label')")
    ds = StreamingDataset(name=name, folder=str(builder.data_dir), train_split="train", test_split=evaluated[0],
                          num_train=splits["train"], num_test=splits[evaluated[0]],
                          num_classes=int(features["label"].num_classes), image_shape=tuple(image_shape),
                          mean=tuple(mean), std=tuple(std), host_transform=host_transform,
                          num_workers=int(num_workers), source=f"tfds-stream:{root}")
    for split, n in ((ds.train_split, ds.num_train), (ds.test_split, ds.num_test)):
        read = _EvalExample(_Records(ds.folder, split), n, host_transform, ds.image_shape)
        for index in _shard_starts(builder.info.splits[split].shard_lengths) + [n - 1]:
            read(index)   # the first record of every shard and the last one: damage shows here, not hours later
    return ds


def _shard_of(folder: str, split: str, index: int) -> str:
    """The file of `split`'s shard that holds record `index` (all of them, if the dataset's info cannot say)."""
    files = split_files(folder, split)
    try:
        import tensorflow_datasets as tfds
        lengths = tfds.builder_from_directory(folder).info.splits[split].shard_lengths
        return files[int(np.searchsorted(np.cumsum(lengths), index, side="right"))]
    except Exception:   # (a message is being written: never fail while writing it)
        return ", ".join(files)


def _shard_starts(lengths: Sequence[int]) -> list[int]:
    """The index of each shard's first record."""
    return [int(start) for start, length in zip(np.cumsum([0, *lengths[:-1]]), lengths) if length]


def _builder(name: str, root: str):
    """TFDS' builder of the prepared `root/name/<version>` (the newest version), read from its files alone."""
    import tensorflow_datasets as tfds

    from oba_jax.experiment.data import prepared_tfds_folders
    return tfds.builder_from_directory(prepared_tfds_folders(name, root)[-1])


def split_files(folder: str, split: str) -> list[str]:
    """The basenames of `split`'s array_record shards in `folder` (`<name>-<split>.array_record-…`)."""
    import glob
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, f"*-{split}.array_record*")))
