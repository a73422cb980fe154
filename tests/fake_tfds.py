"""Tiny datasets written in TFDS' real prepared format (array_record shards, dataset_info.json, features.json) by
TFDS itself, without TensorFlow: the images go in as encoded bytes, which TFDS stores as they are."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format=fmt)
    return buf.getvalue()


def write(data_dir: str, name: str, version: str, splits: dict[str, list[tuple[bytes, int]]], *, num_classes: int,
          encoding: str, shape: tuple | None = None, num_shards: int | None = None) -> str:
    """Writes `splits` ({split: [(encoded image, label)]}) as the prepared TFDS dataset `data_dir/name/version/`
    (the builder is not registered, so a real dataset of the same name stays as TFDS has it). Returns that folder."""
    import tensorflow_datasets as tfds

    dataset_name = name
    with tfds.core.registered.skip_registration():
        class Builder(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version(version)
            name = dataset_name

            def _info(self):
                image = (tfds.features.Image(shape=shape, encoding_format=encoding) if shape is not None
                         else tfds.features.Image(encoding_format=encoding))
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": image, "label": tfds.features.ClassLabel(num_classes=num_classes)}),
                    supervised_keys=("image", "label"))

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(examples) for split, examples in splits.items()}

            def _generate_examples(self, examples):
                for i, (image, label) in enumerate(examples):
                    yield i, {"image": image, "label": label}

        builder = Builder(data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=num_shards))
    return str(builder.data_dir)


def fixed_size(data_dir: str, *, num_train: int, num_test: int, shape=(8, 8, 1), num_classes: int = 10, seed: int = 0,
               name: str = "fashion_mnist"):
    """A fixed-size dataset (PNG, lossless) under a real dataset's name, and its arrays in the order of the files
    (TFDS shuffles the records it writes), read back with TFDS' own reader:
    `(folder, (train_images, train_labels, test_images, test_labels))`."""
    import tensorflow_datasets as tfds
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", num_train), ("test", num_test)):
        labels = rng.integers(0, num_classes, n)
        images = np.clip(labels[:, None, None, None] * 20 + rng.integers(0, 60, (n, *shape)), 0, 255).astype(np.uint8)
        splits[split] = [(encoded(x, "png"), int(y)) for x, y in zip(images, labels)]
    folder = write(data_dir, name, "3.0.1", splits, num_classes=num_classes, encoding="png", shape=shape)
    arrays = []
    for split in ("train", "test"):
        records = list(tfds.builder_from_directory(folder).as_data_source(split))
        arrays += [np.stack([r["image"] for r in records]).astype(np.uint8),
                   np.asarray([r["label"] for r in records], np.int32)]
    return folder, tuple(arrays)


def imagenet_like(data_dir: str, *, num_train: int = 24, num_validation: int = 6, num_classes: int = 10,
                  used_classes: int = 4, seed: int = 0) -> str:
    """`imagenet2012` in its real on-disk format: JPEGs of varying sizes, labels among the first `used_classes` of
    `num_classes` (the committed pretrained fixtures have 10 classes)."""
    rng = np.random.default_rng(seed)

    def examples(n):
        return [(encoded(rng.integers(0, 256, (40 + 8 * (i % 4), 48 + 4 * (i % 3), 3), dtype=np.uint8), "jpeg"),
                 int(i % used_classes)) for i in range(n)]

    return write(data_dir, "imagenet2012", "5.1.0", {"train": examples(num_train), "validation": examples(num_validation)},
                 num_classes=num_classes, encoding="jpeg")
