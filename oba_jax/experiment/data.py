"""Datasets for oba-jax: small image datasets held in memory as uint8, and jittable preprocessing.

Sources for ``fashion_mnist`` / ``cifar10`` / ``cifar100``:

1. a prepared TFDS directory, read with ``tfds.data_source`` (array_record; TensorFlow is not needed);
2. the dataset's official files at a local path: Fashion-MNIST IDX (``.gz`` or raw), CIFAR binary or
   python versions, as the archive or extracted;
3. Fashion-MNIST only: the Debian package ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist).

Directories are searched in the order ``data_dir``, ``$OBA_JAX_DATA``, ``$TFDS_DATA_DIR``,
``~/tensorflow_datasets`` / ``~/.cache/oba_jax/<name>``, trying (1) before (2) in each; see
:func:`search_locations`.

Nothing is downloaded unless ``download=True`` is passed; a missing dataset raises
:class:`DatasetNotFoundError` listing every place searched and how to provide the data.
ImageNet (and any prepared TFDS dataset, with ``config.data.stream``) is streamed from disk by
:mod:`oba_jax.experiment.streaming` instead.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet2012", "synthetic")

# Per-channel mean/std in [0, 1] pixel units: the constants the paper's training recipes use.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}

# Module-level so tests (and unusual installs) can point it elsewhere.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
ENV_DATA_DIR = "OBA_JAX_DATA"

# Official files fetched only with download=True: (url, sha256). Checksums as in TFDS' url_checksums.
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
DOWNLOADS: dict[str, tuple[tuple[str, str], ...]] = {
    "fashion_mnist": (
        (_FASHION_URL + "train-images-idx3-ubyte.gz", "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        (_FASHION_URL + "train-labels-idx1-ubyte.gz", "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        (_FASHION_URL + "t10k-images-idx3-ubyte.gz", "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        (_FASHION_URL + "t10k-labels-idx1-ubyte.gz", "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    ),
    "cifar10": ((_CIFAR_URL + "cifar-10-binary.tar.gz", "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),),
    "cifar100": ((_CIFAR_URL + "cifar-100-binary.tar.gz", "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"),),
}


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A small dataset held in memory as uint8 NHWC images and int32 labels."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.train_images.shape[1:])

    @property
    def streams(self) -> bool:
        return False


class DatasetNotFoundError(Exception):
    """The dataset is in none of the places searched; the message says where those were and what to do."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but cannot be parsed; the message names the file."""


# ----------------------------------------------------------------------------- search locations


def _default_cache_dir(name: str) -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "oba_jax", name)


def tfds_search_dirs(data_dir: str | None) -> list[str]:
    """Directories that may hold a prepared TFDS dataset, in search order (no duplicates)."""
    dirs = [data_dir, os.environ.get(ENV_DATA_DIR), os.environ.get("TFDS_DATA_DIR"),
            os.path.join(os.path.expanduser("~"), "tensorflow_datasets")]
    return _unique(d for d in dirs if d)


def _unique(items) -> list[str]:
    out: list[str] = []
    for item in items:
        item = os.path.abspath(os.path.expanduser(item))
        if item not in out:
            out.append(item)
    return out


# ----------------------------------------------------------------------------- IDX (Fashion-MNIST)

_IDX_DTYPES = {0x08: np.uint8}
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def parse_idx(data: bytes, path: str = "<bytes>") -> np.ndarray:
    """Parses an IDX file (big-endian header: 0, 0, dtype code, ndim; then ndim uint32 dims)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise CorruptDatasetError(f"{path}: not an IDX file of uint8 (bad magic {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDatasetError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise CorruptDatasetError(f"{path}: IDX says shape {shape} ({expected} bytes) but file has {len(data)} bytes")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()


def check_labels(labels: np.ndarray, num_classes: int, path: str) -> np.ndarray:
    """`labels` as int32 if every one is a class index in [0, num_classes); else CorruptDatasetError naming
    `path` and the bad values (out-of-range labels once scored 100% test accuracy: no logit beats a label
    that has none)."""
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        values = np.unique(labels[bad])
        shown = ", ".join(str(int(v)) for v in values[:8]) + (", …" if len(values) > 8 else "")
        raise CorruptDatasetError(f"{path}: {int(bad.sum())} of {labels.size} labels are outside [0, {num_classes}) "
                                  f"(values {shown}): not a {num_classes}-class dataset's labels")
    return labels.astype(np.int32)


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file, gzipped (``.gz``) or raw."""
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise CorruptDatasetError(f"{path}: cannot read ({e})") from e
    return parse_idx(data, path)


def _find_idx(directory: str, stem: str) -> str | None:
    for candidate in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def read_fashion_mnist_dir(directory: str) -> dict[str, np.ndarray] | None:
    """Reads the four Fashion-MNIST IDX files from ``directory``; None if any is absent."""
    paths = {key: _find_idx(directory, stem) for key, stem in _FASHION_FILES.items()}
    if any(p is None for p in paths.values()):
        return None
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise CorruptDatasetError(f"{paths[split + '_images']}: images of shape {images.shape[1:]}, not the "
                                      "28×28 of Fashion-MNIST")
        if labels.ndim != 1 or len(images) != len(labels):
            raise CorruptDatasetError(
                f"{paths[split + '_images']}: images {images.shape} do not match labels {labels.shape}")
        arrays[f"{split}_images"] = images[..., None]  # NHWC with one channel
        arrays[f"{split}_labels"] = check_labels(labels, NUM_CLASSES["fashion_mnist"], paths[f"{split}_labels"])
    return arrays


# ----------------------------------------------------------------------------- CIFAR

# name -> (binary dir, binary train files, binary test file, label bytes before the image and which
#          one is the label we use, python dir, python train files, python test file, label key)
_CIFAR_LAYOUT = {
    "cifar10": dict(
        bin_dir="cifar-10-batches-bin", bin_train=[f"data_batch_{i}.bin" for i in range(1, 6)],
        bin_test=["test_batch.bin"], label_bytes=1, label_index=0,
        py_dir="cifar-10-batches-py", py_train=[f"data_batch_{i}" for i in range(1, 6)],
        py_test=["test_batch"], label_key=b"labels", archive="cifar-10"),
    "cifar100": dict(
        bin_dir="cifar-100-binary", bin_train=["train.bin"], bin_test=["test.bin"],
        label_bytes=2, label_index=1,  # each record: coarse label, fine label, image; we use fine
        py_dir="cifar-100-python", py_train=["train"], py_test=["test"], label_key=b"fine_labels",
        archive="cifar-100"),
}


def parse_cifar_binary(data: bytes, label_bytes: int, label_index: int, path: str = "<bytes>"):
    """Parses CIFAR binary records: ``label_bytes`` label bytes then 3072 bytes of CHW 32x32 RGB."""
    record = label_bytes + 3 * 32 * 32
    if len(data) == 0 or len(data) % record:
        raise CorruptDatasetError(f"{path}: size {len(data)} is not a multiple of the {record}-byte CIFAR record")
    rows = np.frombuffer(data, np.uint8).reshape(-1, record)
    labels = rows[:, label_index].astype(np.int32)
    images = rows[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python batches but refuses any global other than numpy's array rebuilders,
    so a malicious file in a data directory cannot execute code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
                ("numpy._core.numeric", "_frombuffer"),
                ("_codecs", "encode")}  # how Python 3 writes bytes in protocol-2 pickles (re-saved batches)

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def parse_cifar_python(data: bytes, label_key: bytes, path: str = "<bytes>"):
    """Parses one pickled CIFAR python batch: ``data`` (N, 3072) CHW rows and a list of labels."""
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
        rows = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[label_key], np.int32)
    except Exception as e:  # any unpickling/shape failure means the file is not a CIFAR batch
        raise CorruptDatasetError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from e
    if rows.ndim != 2 or rows.shape[1] != 3072 or len(rows) != len(labels):
        raise CorruptDatasetError(f"{path}: data {rows.shape} / labels {labels.shape} are not CIFAR-shaped")
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def _concat(parts):
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _cifar_from_files(files: dict[str, bytes], layout: dict, origin: str, binary: bool, num_classes: int):
    """Builds the train/test arrays from the member files of one CIFAR version (binary or python)."""
    def checked(images, labels, where):
        return images, check_labels(labels, num_classes, where)

    if binary:
        def parse(fname):
            where = f"{origin}:{fname}"
            return checked(*parse_cifar_binary(files[fname], layout["label_bytes"], layout["label_index"], where), where)
        train_names, test_names = layout["bin_train"], layout["bin_test"]
    else:
        def parse(fname):
            where = f"{origin}:{fname}"
            return checked(*parse_cifar_python(files[fname], layout["label_key"], where), where)
        train_names, test_names = layout["py_train"], layout["py_test"]
    train, test = _concat([parse(f) for f in train_names]), _concat([parse(f) for f in test_names])
    return dict(train_images=train[0], train_labels=train[1], test_images=test[0], test_labels=test[1])


def _read_cifar_dir_files(directory: str, names: Sequence[str]) -> dict[str, bytes] | None:
    paths = {n: os.path.join(directory, n) for n in names}
    if not all(os.path.isfile(p) for p in paths.values()):
        return None
    out = {}
    for n, p in paths.items():
        with open(p, "rb") as f:
            out[n] = f.read()
    return out


def _read_cifar_tar(path: str, names: Sequence[str]) -> dict[str, bytes]:
    """Reads the named members (by basename) from a CIFAR ``.tar.gz`` without extracting it."""
    wanted, out = set(names), {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                base = os.path.basename(member.name)
                if member.isfile() and base in wanted:
                    out[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorruptDatasetError(f"{path}: cannot read archive ({e})") from e
    missing = wanted - set(out)
    if missing:
        raise CorruptDatasetError(f"{path}: archive lacks {sorted(missing)}")
    return out


def read_cifar_dir(name: str, directory: str) -> tuple[dict[str, np.ndarray], str] | None:
    """Reads CIFAR-10/100 from ``directory`` in any official form; returns (arrays, path) or None.

    Looked for, in order: extracted binary dir, extracted python dir (as a subdirectory or the
    files directly in ``directory``), then ``<archive>-binary.tar.gz`` and ``<archive>-python.tar.gz``.
    """
    layout = _CIFAR_LAYOUT[name]
    for binary in (True, False):
        subdir, names = ((layout["bin_dir"], layout["bin_train"] + layout["bin_test"]) if binary
                         else (layout["py_dir"], layout["py_train"] + layout["py_test"]))
        for d in (os.path.join(directory, subdir), directory):
            files = _read_cifar_dir_files(d, names)
            if files is not None:
                return _cifar_from_files(files, layout, d, binary, NUM_CLASSES[name]), d
    for binary in (True, False):
        names = layout["bin_train"] + layout["bin_test"] if binary else layout["py_train"] + layout["py_test"]
        kind = "binary" if binary else "python"
        for ext in (".tar.gz", ".tgz", ".tar"):
            path = os.path.join(directory, f"{layout['archive']}-{kind}{ext}")
            if os.path.isfile(path):
                return _cifar_from_files(_read_cifar_tar(path, names), layout, path, binary, NUM_CLASSES[name]), path
    return None


# ----------------------------------------------------------------------------- TFDS prepared dirs


def prepared_tfds_folders(name: str, directory: str) -> list[str]:
    """The prepared ``directory/<name>/[<config>/]<version>/`` folders (those with a ``dataset_info.json``), oldest
    version first (found without importing TFDS)."""
    infos = (glob.glob(os.path.join(directory, name, "*", "dataset_info.json"))
             + glob.glob(os.path.join(directory, name, "*", "*", "dataset_info.json")))

    def version(folder: str) -> tuple:
        parts = os.path.basename(folder).split(".")
        return tuple(int(p) if p.isdigit() else -1 for p in parts), folder
    return sorted((os.path.dirname(p) for p in infos), key=version)


def has_prepared_tfds(name: str, directory: str) -> bool:
    """True when ``directory/<name>/<version>/dataset_info.json`` exists (checked without importing TFDS)."""
    return bool(prepared_tfds_folders(name, directory))


def tfds_source(name: str, directory: str, split: str, **kwargs):
    """A random-access source over a prepared TFDS split; never downloads, never imports TensorFlow."""
    import tensorflow_datasets as tfds  # imported lazily: ~1 s and only needed for this source

    return tfds.data_source(name, split=split, data_dir=directory, download=False, **kwargs)


def _source_to_arrays(source, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for start in range(0, len(source), chunk):
        keys = list(range(start, min(start + chunk, len(source))))
        records = source.__getitems__(keys) if hasattr(source, "__getitems__") else [source[k] for k in keys]
        images += [np.asarray(r["image"], np.uint8) for r in records]
        labels += [int(r["label"]) for r in records]
    return np.stack(images), np.asarray(labels, np.int32)


def read_tfds_dir(name: str, directory: str) -> dict[str, np.ndarray]:
    """Reads both splits of a prepared TFDS dataset into uint8/int32 arrays."""
    out = {}
    for split in ("train", "test"):
        try:
            images, labels = _source_to_arrays(tfds_source(name, directory, split))
        except Exception as e:  # tfds raises assorted errors for half-written / mismatched dirs
            raise CorruptDatasetError(
                f"{os.path.join(directory, name)}: prepared TFDS dataset could not be read ({type(e).__name__}: {e})") from e
        out[f"{split}_images"] = images
        out[f"{split}_labels"] = check_labels(labels, NUM_CLASSES[name], f"{os.path.join(directory, name)} ({split})")
    return out


# ----------------------------------------------------------------------------- download (opt-in)


def download_official_files(name: str, directory: str,
                            urlopen: Callable[[str], Any] | None = None) -> None:
    """Fetches the official files of ``name`` into ``directory``, verifying each sha256.

    Used only with ``load_dataset(..., download=True)``. We fetch the original files rather than
    ``tfds`` download_and_prepare because preparing image datasets with TFDS needs TensorFlow
    (to PNG-encode the images), which this project does not require.
    """
    urlopen = urlopen or urllib.request.urlopen  # looked up per call so tests can replace it
    os.makedirs(directory, exist_ok=True)
    for url, sha256 in DOWNLOADS[name]:
        path = os.path.join(directory, url.rsplit("/", 1)[1])
        if os.path.isfile(path) and _sha256(path) == sha256:
            continue
        tmp = path + ".part"
        with urlopen(url) as response, open(tmp, "wb") as f:
            while block := response.read(1 << 20):
                f.write(block)
        if _sha256(tmp) != sha256:
            os.remove(tmp)
            raise CorruptDatasetError(f"{url}: downloaded file has the wrong sha256 (expected {sha256})")
        os.replace(tmp, path)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- load_dataset


def _how_to_provide(name: str) -> str:
    cache = _default_cache_dir(name)
    lines = []
    if name == "fashion_mnist":
        lines.append("  - apt-get install dataset-fashion-mnist   (Debian/Ubuntu; files land in "
                     f"{DEBIAN_FASHION_MNIST_DIR})")
        lines.append("  - put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                     f"t10k-labels-idx1-ubyte.gz (from {_FASHION_URL}) in DIR")
    else:
        archive = _CIFAR_LAYOUT[name]["archive"]
        lines.append(f"  - download {archive}-binary.tar.gz (or {archive}-python.tar.gz) from "
                     f"{_CIFAR_URL} and put it (or its extracted folder) in DIR")
    lines.append(f"    where DIR is {cache}, or ${ENV_DATA_DIR}, or pass data_dir=DIR "
                 f"(CLI: --config.data.data_dir=DIR)")
    lines.append(f"  - or a prepared TFDS dir: DIR/{name}/<version>/ (tfds build {name} --data_dir=DIR "
                 "--file_format=array_record, on a machine with TensorFlow)")
    lines.append(f"  - or load_dataset({name!r}, download=True) to fetch the official files into {cache}")
    return "\n".join(lines)


def load_dataset(name: str, data_dir: str | None = None, *, download: bool = False,
                 **synthetic_kwargs) -> ArrayDataset:
    """Loads a small dataset into memory from the first source that has it (see module docstring).

    ``synthetic_kwargs`` go to :func:`synthetic_dataset` when ``name == "synthetic"``.
    Raises :class:`DatasetNotFoundError` when no source has the data and ``download`` is False.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if name == "synthetic":
        return synthetic_dataset(**synthetic_kwargs)
    if synthetic_kwargs:
        raise TypeError(f"unexpected arguments for {name}: {sorted(synthetic_kwargs)}")
    if data_dir is not None and not download and not os.path.isdir(os.path.expanduser(data_dir)):
        # a place the user names must exist; only the default search order falls back
        raise DatasetNotFoundError(f"data_dir {data_dir!r} (config.data.data_dir / --data-dir) is not a directory; "
                                   f"pass the directory that holds {name!r}, or leave data_dir unset to search the "
                                   "default locations")
    if name == "imagenet2012":
        return _imagenet_not_in_memory(data_dir)

    searched: list[str] = []
    arrays, source = _find_local(name, data_dir, searched)
    if arrays is None and download:
        target = os.path.abspath(os.path.expanduser(data_dir)) if data_dir else _default_cache_dir(name)
        download_official_files(name, target)
        arrays, source = _find_local(name, target, [])
    if arrays is None:
        raise DatasetNotFoundError(
            f"dataset {name!r} not found (no download was attempted: pass download=True to allow one).\n"
            "Searched:\n" + "\n".join(f"  - {s}" for s in searched) + "\nTo provide it:\n" + _how_to_provide(name))
    mean, std = NORMALIZATION[name]
    return ArrayDataset(name=name, num_classes=NUM_CLASSES[name], mean=mean, std=std, source=source, **arrays)


def search_locations(name: str, data_dir: str | None) -> list[tuple[str, str]]:
    """Every ``(kind, directory)`` looked at for ``name``, in order; kind is "tfds", "raw" or "debian".

    An explicit ``data_dir`` comes first, then ``$OBA_JAX_DATA``, ``$TFDS_DATA_DIR`` and the home
    defaults, so the directory the user named wins over anything found by default; within one
    directory a prepared TFDS dataset is preferred to the official files.
    """
    home_tfds = os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    locations: list[tuple[str, str]] = []
    for root in (data_dir, os.environ.get(ENV_DATA_DIR)):
        if root:
            locations += [("tfds", root), ("raw", root), ("raw", os.path.join(root, name))]
    if os.environ.get("TFDS_DATA_DIR"):
        locations.append(("tfds", os.environ["TFDS_DATA_DIR"]))
    locations += [("tfds", home_tfds), ("raw", _default_cache_dir(name))]
    if name == "fashion_mnist":
        locations.append(("debian", DEBIAN_FASHION_MNIST_DIR))
    out: list[tuple[str, str]] = []
    for kind, d in locations:
        item = (kind, os.path.abspath(os.path.expanduser(d)))
        if item not in out:
            out.append(item)
    return out


def _find_local(name: str, data_dir: str | None, searched: list[str]):
    """Tries every local source in order, appending each place looked at to ``searched``."""
    archive = _CIFAR_LAYOUT[name]["archive"] if name in _CIFAR_LAYOUT else ""
    for kind, d in search_locations(name, data_dir):
        if kind == "tfds":
            searched.append(f"prepared TFDS dataset in {os.path.join(d, name)}/<version>/")
            if has_prepared_tfds(name, d):
                return read_tfds_dir(name, d), f"tfds:{d}"
        elif kind == "debian":
            searched.append(f"Debian package dataset-fashion-mnist: {d}")
            arrays = read_fashion_mnist_dir(d) if os.path.isdir(d) else None
            if arrays is not None:
                return arrays, "debian package"
        elif name == "fashion_mnist":
            searched.append(f"Fashion-MNIST IDX files (.gz or raw) in {d}")
            arrays = read_fashion_mnist_dir(d) if os.path.isdir(d) else None
            if arrays is not None:
                return arrays, d
        else:
            searched.append(f"{archive}-binary.tar.gz / {archive}-python.tar.gz or extracted batches in {d}")
            found = read_cifar_dir(name, d) if os.path.isdir(d) else None
            if found is not None:
                return found
    return None, None


def not_prepared_message(name: str, dirs: Sequence[str]) -> str:
    """What to do when no directory holds a prepared TFDS `name` (the only form a streamed dataset takes)."""
    how = ("download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org into "
           "MANUAL, then run `python -m oba_jax.experiment.imagenet prepare --manual-dir MANUAL --data-dir DIR` "
           "(no TensorFlow needed; or, with TensorFlow, `tfds build imagenet2012 --manual_dir=MANUAL --data_dir=DIR "
           "--file_format=array_record`) and pass data_dir=DIR" if name == "imagenet2012" else
           f"run `tfds build {name} --data_dir=DIR --file_format=array_record` and pass data_dir=DIR")
    return (f"dataset {name!r} not found as a prepared TFDS dataset (no download was attempted).\nSearched:\n"
            + "\n".join(f"  - {d}/{name}/<version>/" for d in dirs) + f"\nTo provide it: {how} "
            "(CLI: --config.data.data_dir=DIR).")


def _imagenet_not_in_memory(data_dir: str | None):
    dirs = tfds_search_dirs(data_dir)
    found = [d for d in dirs if has_prepared_tfds("imagenet2012", d)]
    if not found:
        raise DatasetNotFoundError(not_prepared_message("imagenet2012", dirs))
    from oba_jax.experiment.config import ConfigError   # (config imports this module lazily: no cycle)
    raise ConfigError(
        f"config.data.stream: imagenet2012 (found in {found[0]}) does not fit in memory; stream it "
        "(--config.data.stream=true, as configs/imagenet_*.py do), or from your own code with "
        "oba_jax.experiment.streaming.open_stream")


# ----------------------------------------------------------------------------- synthetic


def synthetic_dataset(*, num_train: int = 512, num_test: int = 256, image_shape: tuple[int, ...] = (32, 32, 3),
                      num_classes: int = 10, seed: int = 0) -> ArrayDataset:
    """Deterministic images whose labels are learnable: each class has a fixed random template, and an
    image is its class template plus Gaussian noise (so a linear model separates them well above chance)."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0.0, 1.0, size=(num_classes, *image_shape))

    def make(n: int):
        labels = rng.integers(0, num_classes, size=n).astype(np.int32)
        noise = rng.normal(0.0, 0.25, size=(n, *image_shape))
        images = np.clip(np.round((0.2 + 0.6 * templates[labels] + noise) * 255.0), 0, 255).astype(np.uint8)
        return images, labels

    train_images, train_labels = make(num_train)
    test_images, test_labels = make(num_test)
    pixels = train_images.reshape(-1, image_shape[-1]).astype(np.float64) / 255.0
    return ArrayDataset(
        name="synthetic", train_images=train_images, train_labels=train_labels, test_images=test_images,
        test_labels=test_labels, num_classes=num_classes,
        mean=tuple(float(m) for m in pixels.mean(0)), std=tuple(float(max(s, 1e-3)) for s in pixels.std(0)),
        source="synthetic")


# ----------------------------------------------------------------------------- preprocessing (in jit)

CROP_PADDING = 4


def random_crop_flip(images: jax.Array, rng: jax.Array, padding: int = CROP_PADDING) -> jax.Array:
    """Per-example random crop of the zero-padded image (offsets 0..2*padding) and random horizontal flip.

    Zero padding is applied to the raw pixels, as torchvision's ``RandomCrop(32, padding=4)`` does
    before normalisation, so the paper's CIFAR recipe is reproduced.
    """
    n, h, w, _ = images.shape
    crop_key, flip_key = jax.random.split(rng)
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * padding + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def preprocess_batch(images: jax.Array, rng: jax.Array | None, *, augment: bool,
                     mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """uint8 NHWC -> normalised float32 NHWC; with ``augment``, pad-4 random crop + flip first.

    Pure and jittable (``augment``, ``mean``, ``std`` are static Python values); all randomness
    comes from ``rng``.
    """
    if augment:
        if rng is None:
            raise ValueError("preprocess_batch(augment=True) needs an rng key")
        images = random_crop_flip(images, rng)
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
