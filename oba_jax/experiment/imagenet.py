"""ImageNet on the host: the torchvision transforms the streaming input's workers apply to each image
(`oba_jax.experiment.streaming`), and `prepare`, the TFDS dataset written from the downloaded tars without
TensorFlow (`python -m oba_jax.experiment.imagenet prepare --manual-dir M --data-dir D`).
"""

from __future__ import annotations

import io
import math
import os
import tarfile
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


# ----------------------------------------------------------------------------- prepare, from the tars


TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"


def _as_rgb_jpeg(data: bytes) -> bytes:
    """JPEG bytes of an RGB image: ImageNet's few CMYK JPEGs and its one PNG are converted (as TFDS' builder
    does with TensorFlow), every other file is kept byte for byte."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG" and image.mode in ("RGB", "L"):
            return data
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=95)
        return out.getvalue()


def _train_examples(path: str):
    """(key, example) of the training tar: one inner tar per synset (`n01440764.tar`) of that class's JPEGs."""
    with tarfile.open(path, "r|") as outer:
        for member in outer:
            if not member.isfile() or not member.name.endswith(".tar"):
                continue
            synset = os.path.basename(member.name)[:-4]
            inner = io.BytesIO(outer.extractfile(member).read())
            with tarfile.open(fileobj=inner, mode="r:") as images:
                for image in images:
                    if image.isfile():
                        name = os.path.basename(image.name)
                        data = _as_rgb_jpeg(images.extractfile(image).read())
                        yield name, {"file_name": name, "image": data, "label": synset}


def _validation_examples(path: str, labels_file: str):
    """(key, example) of the validation tar, labelled by TFDS' `validation_labels.txt` (one synset per image, in
    the sorted order of the file names)."""
    with open(labels_file) as f:
        synsets = f.read().strip().splitlines()
    with tarfile.open(path, "r:") as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
        label = dict(zip(names, synsets))
        for name in names:
            data = _as_rgb_jpeg(tar.extractfile(name).read())
            yield name, {"file_name": name, "image": data, "label": label[name]}


def prepare(manual_dir: str, data_dir: str) -> str:
    """Writes the TFDS `imagenet2012` dataset (array_record) from the two tars in `manual_dir` into
    `data_dir/imagenet2012/<version>/`, without TensorFlow: TFDS' own builder with only the reading of the tars
    replaced (its features, class names and validation labels unchanged). Returns that directory."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as official

    from oba_jax.experiment.data import DatasetNotFoundError
    tars = {split: os.path.join(manual_dir, name) for split, name in (("train", TRAIN_TAR), ("validation", VAL_TAR))}
    missing = [p for p in tars.values() if not os.path.isfile(p)]
    if missing:
        raise DatasetNotFoundError(f"{', '.join(missing)}: not found; download {TRAIN_TAR} and {VAL_TAR} from "
                                   "https://image-net.org/download-images into --manual-dir")
    labels_file = os.fspath(tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt"))

    with tfds.core.registered.skip_registration():
        class Imagenet2012(official.Builder):
            name = "imagenet2012"
            __module__ = official.__name__   # TFDS finds the builder's files (class names, checksums) by module
            url_infos = None                 # nothing is downloaded (and reading the checksums needs another package)

            def _split_generators(self, dl_manager):
                return {"train": _train_examples(tars["train"]),
                        "validation": _validation_examples(tars["validation"], labels_file)}

        builder = Imagenet2012(data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return str(builder.data_dir)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from oba_jax.experiment.cli import run_cli
    parser = argparse.ArgumentParser(
        prog="python -m oba_jax.experiment.imagenet",
        description="ImageNet-1k from the downloaded tars to the prepared TFDS dataset the ImageNet configs stream.")
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help=f"write DATA_DIR/imagenet2012/<version>/ from {TRAIN_TAR} and {VAL_TAR}")
    prep.add_argument("--manual-dir", required=True, help=f"the directory holding {TRAIN_TAR} and {VAL_TAR}")
    prep.add_argument("--data-dir", required=True, help="where to write (pass it as --config.data.data_dir)")
    args = parser.parse_args(argv)

    def body(session) -> int:
        print(f"wrote {prepare(args.manual_dir, args.data_dir)}")
        return 0
    return run_cli("imagenet", body, owns_process=__name__ == "__main__")


if __name__ == "__main__":
    raise SystemExit(main())
