"""ImageNet input pipeline: a prepared TFDS ``imagenet2012`` read by random access, decoded and
augmented on the host by a thread pool, yielding uint8 NHWC 224x224 batches.

A thread pool (not processes) is enough because PIL's JPEG decode and resize release the GIL; it
also keeps the loader dependency-free (no grain needed). Every example's randomness comes from
``np.random.default_rng((seed, epoch, index))``, so batches do not depend on thread scheduling.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SIZE = 224
RESIZE_SIZE = 256


def decode_image(image: Any) -> Image.Image:
    """An RGB PIL image from encoded bytes (JPEG/PNG) or a decoded HWC uint8 array."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        pil = Image.open(io.BytesIO(bytes(image)))
    else:
        array = np.asarray(image, np.uint8)
        pil = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    return pil.convert("RGB")


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) as torchvision's RandomResizedCrop: 10 tries of a random area
    fraction and log-uniform aspect ratio, else a centre crop clamped to the allowed ratio."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(image: Any, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """RandomResizedCrop(size) + random horizontal flip -> uint8 (size, size, 3)."""
    pil = decode_image(image)
    top, left, h, w = random_resized_crop_box(pil.height, pil.width, rng)
    pil = pil.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    out = np.asarray(pil, np.uint8)
    return np.ascontiguousarray(out[:, ::-1]) if rng.random() < 0.5 else out


def eval_transform(image: Any, size: int = IMAGE_SIZE, resize: int = RESIZE_SIZE) -> np.ndarray:
    """Resize the short side to ``resize``, centre-crop ``size`` -> uint8 (size, size, 3)."""
    pil = decode_image(image)
    s = resize / min(pil.width, pil.height)
    new_w, new_h = max(size, round(pil.width * s)), max(size, round(pil.height * s))
    pil = pil.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(pil.crop((left, top, left + size, top + size)), np.uint8)


def _load_example(source: Sequence[dict], index: int, train: bool, seed: int, epoch: int,
                  size: int) -> tuple[np.ndarray, int]:
    record = source[index]
    if train:
        image = train_transform(record["image"], np.random.default_rng((seed, epoch, index)), size)
    else:
        image = eval_transform(record["image"], size)
    return image, int(record["label"])


def _batch_indices(n: int, batch_size: int, train: bool, seed: int, num_epochs: int | None):
    """(epoch, indices) per batch: train shuffles each epoch and drops the remainder; eval is one ordered pass."""
    epoch = 0
    while num_epochs is None or epoch < num_epochs:
        order = np.random.default_rng((seed, epoch)).permutation(n) if train else np.arange(n)
        stop = (n // batch_size) * batch_size if train else n
        for start in range(0, stop, batch_size):
            yield epoch, order[start:start + batch_size]
        epoch += 1
        if not train and num_epochs is None:
            return


def imagenet_loader(split: str, data_dir: str | None, batch_size: int, *, train: bool, seed: int = 0,
                    num_workers: int = 8, num_epochs: int | None = None, prefetch_batches: int = 2,
                    image_size: int = IMAGE_SIZE, source: Sequence[dict] | None = None,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(images uint8 (B, 224, 224, 3), labels int32 (B,))`` from ``imagenet2012`` ``split``.

    ``train=True``: endless (or ``num_epochs``) reshuffled passes with RandomResizedCrop + flip,
    incomplete last batch dropped. ``train=False``: one ordered pass, resize 256 / centre crop 224,
    last batch may be smaller. ``source`` replaces the TFDS split (any random-access sequence of
    ``{"image": bytes|array, "label": int}``), which is how tests run it on fake data.
    """
    if source is None:
        from oba_jax.experiment import data  # local import: TFDS is imported only when it is used

        dirs = data.tfds_search_dirs(data_dir)
        found = [d for d in dirs if data.has_prepared_tfds("imagenet2012", d)]
        if not found:
            data.load_dataset("imagenet2012", data_dir)  # raises DatasetNotFoundError with instructions
        source = data.tfds_source("imagenet2012", found[0], split)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    batches = _batch_indices(len(source), batch_size, train, seed, num_epochs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        pending: collections.deque = collections.deque()

        def submit_next() -> bool:
            item = next(batches, None)
            if item is None:
                return False
            epoch, indices = item
            pending.append([pool.submit(_load_example, source, int(i), train, seed, epoch, image_size)
                            for i in indices])
            return True

        for _ in range(1 + prefetch_batches):  # keep the workers busy on the next batches
            if not submit_next():
                break
        while pending:
            results = [f.result() for f in pending.popleft()]
            submit_next()
            yield np.stack([r[0] for r in results]), np.asarray([r[1] for r in results], np.int32)
