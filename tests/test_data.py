"""Tests for oba_jax.experiment.data and oba_jax.experiment.imagenet: every reader on tiny files in the official formats."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import socket
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from oba_jax.experiment import data, imagenet

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def isolated_locations(tmp_path_factory, monkeypatch):
    """Point every default search location at an empty dir, and make any network access fail, so
    tests see only the files they write and a download attempt is an error."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(home / "no-debian-package"))

    def no_network(*args, **kwargs):
        raise AssertionError("a test attempted network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def fake_split(rng, n, shape, num_classes):
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, num_classes, n).astype(np.int32)


def write_fashion(directory, *, compress: bool, n_train=7, n_test=5, seed=0):
    rng = np.random.default_rng(seed)
    tr, trl = fake_split(rng, n_train, (28, 28), 10)
    te, tel = fake_split(rng, n_test, (28, 28), 10)
    os.makedirs(directory, exist_ok=True)
    for stem, arr in (("train-images-idx3-ubyte", tr), ("train-labels-idx1-ubyte", trl),
                      ("t10k-images-idx3-ubyte", te), ("t10k-labels-idx1-ubyte", tel)):
        payload = idx_bytes(arr)
        if compress:
            with gzip.open(os.path.join(directory, stem + ".gz"), "wb") as f:
                f.write(payload)
        else:
            with open(os.path.join(directory, stem), "wb") as f:
                f.write(payload)
    return tr[..., None], trl, te[..., None], tel


def cifar_record_bytes(images, labels, coarse=None):
    rows = []
    for i, (img, lab) in enumerate(zip(images, labels)):
        prefix = bytes([coarse[i], lab]) if coarse is not None else bytes([lab])
        rows.append(prefix + img.transpose(2, 0, 1).tobytes())
    return b"".join(rows)


def make_cifar(name, seed=0, per_file=3):
    """Fake CIFAR splits: per_file images per train batch file, and a test file."""
    rng = np.random.default_rng(seed)
    k = 10 if name == "cifar10" else 100
    n_train_files = 5 if name == "cifar10" else 1
    train = [fake_split(rng, per_file, (32, 32, 3), k) for _ in range(n_train_files)]
    test = fake_split(rng, per_file + 1, (32, 32, 3), k)
    return train, test


def tar_gz(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def cifar10_binary_files(train, test, folder="cifar-10-batches-bin"):
    files = {f"{folder}/data_batch_{i + 1}.bin": cifar_record_bytes(*train[i]) for i in range(5)}
    files[f"{folder}/test_batch.bin"] = cifar_record_bytes(*test)
    return files


def python_batch(images, labels, label_key):
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return pickle.dumps({b"batch_label": b"x", label_key: [int(x) for x in labels], b"data": rows}, protocol=2)


def expected(train, test):
    return (np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]), test[0], test[1])


def assert_dataset(ds, train_images, train_labels, test_images, test_labels):
    np.testing.assert_array_equal(ds.train_images, train_images)
    np.testing.assert_array_equal(ds.train_labels, train_labels)
    np.testing.assert_array_equal(ds.test_images, test_images)
    np.testing.assert_array_equal(ds.test_labels, test_labels)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.test_images.dtype == np.uint8 and ds.test_labels.dtype == np.int32


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_idx(tmp_path, compress):
    arrays = write_fashion(tmp_path, compress=compress)
    ds = data.load_dataset("fashion_mnist", str(tmp_path))
    assert_dataset(ds, *arrays)
    assert ds.source == str(tmp_path) and ds.num_classes == 10
    assert ds.mean == (0.2860,) and ds.std == (0.3530,)


def test_fashion_mnist_found_in_name_subdir_and_env(tmp_path, monkeypatch):
    arrays = write_fashion(tmp_path / "fashion_mnist", compress=True)
    assert_dataset(data.load_dataset("fashion_mnist", str(tmp_path)), *arrays)
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path))
    assert_dataset(data.load_dataset("fashion_mnist"), *arrays)


def test_fashion_mnist_default_cache_dir(tmp_path):
    arrays = write_fashion(os.path.expanduser("~/.cache/oba_jax/fashion_mnist"), compress=True)
    assert_dataset(data.load_dataset("fashion_mnist"), *arrays)


def test_explicit_data_dir_wins_over_defaults(tmp_path):
    write_fashion(os.path.expanduser("~/.cache/oba_jax/fashion_mnist"), compress=True, seed=0)
    given = write_fashion(tmp_path, compress=True, seed=1)
    ds = data.load_dataset("fashion_mnist", str(tmp_path))
    assert_dataset(ds, *given)
    assert ds.source == str(tmp_path)


def test_corrupt_idx_names_file(tmp_path):
    write_fashion(tmp_path, compress=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(data.CorruptDatasetError, match="train-images-idx3-ubyte"):
        data.load_dataset("fashion_mnist", str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"garbage!")
    with pytest.raises(data.CorruptDatasetError, match="idx"):
        data.read_idx(str(tmp_path / "t10k-labels-idx1-ubyte"))


def test_fashion_mnist_debian_package(monkeypatch):
    real = "/usr/share/datasets/fashion-mnist"
    if not os.path.isfile(os.path.join(real, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"{real} absent: install the Debian package dataset-fashion-mnist to run this test")
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", real)
    ds = data.load_dataset("fashion_mnist")
    assert ds.source == "debian package"
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
    for labels in (ds.train_labels, ds.test_labels):
        assert set(np.unique(labels).tolist()) == set(range(10))
    # The published normalisation constants match the real pixels.
    assert abs(ds.train_images.mean() / 255 - 0.2860) < 1e-3


# ----------------------------------------------------------------------------- CIFAR


def test_cifar10_binary_tar_gz(tmp_path):
    train, test = make_cifar("cifar10")
    tar_gz(tmp_path / "cifar-10-binary.tar.gz", cifar10_binary_files(train, test))
    ds = data.load_dataset("cifar10", str(tmp_path))
    assert_dataset(ds, *expected(train, test))
    assert ds.source.endswith("cifar-10-binary.tar.gz") and ds.num_classes == 10
    assert ds.mean == (0.4914, 0.4822, 0.4465)


def test_cifar10_binary_extracted(tmp_path):
    train, test = make_cifar("cifar10", seed=1)
    for name, payload in cifar10_binary_files(train, test).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(payload)
    assert_dataset(data.load_dataset("cifar10", str(tmp_path)), *expected(train, test))


@pytest.mark.parametrize("form", ["binary", "python"])
def test_labels_outside_the_classes_are_a_corrupt_file(tmp_path, form):
    """Labels are data: the landed main loaded CIFAR-10 batches labelled 57 and scored 100% test top-1 on them."""
    train, test = make_cifar("cifar10", seed=2)
    test = (test[0], np.where(np.arange(len(test[1])) == 1, 57, test[1]).astype(np.int32))
    if form == "binary":
        files = cifar10_binary_files(train, test)
    else:
        files = {f"cifar-10-batches-py/data_batch_{i + 1}": python_batch(*train[i], b"labels") for i in range(5)}
        files["cifar-10-batches-py/test_batch"] = python_batch(*test, b"labels")
    for name, payload in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(payload)
    with pytest.raises(data.CorruptDatasetError, match=r"test_batch(\.bin)?: 1 of 4 labels are outside \[0, 10\) "
                                                       r"\(values 57\)"):
        data.load_dataset("cifar10", str(tmp_path))


def test_fashion_labels_and_image_dims_are_checked(tmp_path):
    write_fashion(tmp_path / "a", compress=False)
    (tmp_path / "a" / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([1, 2, 200, 3, 255])))
    with pytest.raises(data.CorruptDatasetError, match=r"t10k-labels-idx1-ubyte: 2 of 5 labels .* \(values 200, 255\)"):
        data.load_dataset("fashion_mnist", str(tmp_path / "a"))
    write_fashion(tmp_path / "b", compress=False)
    (tmp_path / "b" / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((7, 14, 56))))
    with pytest.raises(data.CorruptDatasetError, match=r"train-images-idx3-ubyte: images of shape \(14, 56\)"):
        data.load_dataset("fashion_mnist", str(tmp_path / "b"))


def test_cifar10_pixel_layout(tmp_path):
    """One hand-built record: label 7, red channel 1s, green 2s, blue 3s, except pixel (row 0, col 1)."""
    img = np.zeros((32, 32, 3), np.uint8) + np.array([1, 2, 3], np.uint8)
    img[0, 1] = (200, 100, 50)
    chw = img.transpose(2, 0, 1).tobytes()
    assert chw[1] == 200 and chw[1024 + 1] == 100  # plane-major, row-major: the official layout
    images, labels = data.parse_cifar_binary(bytes([7]) + chw, 1, 0)
    assert labels.tolist() == [7]
    np.testing.assert_array_equal(images[0], img)


def test_cifar10_python_tar_gz(tmp_path):
    train, test = make_cifar("cifar10", seed=2)
    files = {f"cifar-10-batches-py/data_batch_{i + 1}": python_batch(*train[i], b"labels") for i in range(5)}
    files["cifar-10-batches-py/test_batch"] = python_batch(*test, b"labels")
    tar_gz(tmp_path / "cifar-10-python.tar.gz", files)
    assert_dataset(data.load_dataset("cifar10", str(tmp_path)), *expected(train, test))


def test_cifar100_python_fine_labels(tmp_path):
    train, test = make_cifar("cifar100", seed=3)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for fname, (images, labels) in (("train", train[0]), ("test", test)):
        rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        coarse = [int(x) // 5 for x in labels]
        (folder / fname).write_bytes(pickle.dumps(
            {b"data": rows, b"fine_labels": [int(x) for x in labels], b"coarse_labels": coarse}, protocol=2))
    ds = data.load_dataset("cifar100", str(tmp_path))
    assert_dataset(ds, *expected(train, test))
    assert ds.num_classes == 100 and ds.std == (0.2675, 0.2565, 0.2761)


def test_cifar100_binary_fine_labels(tmp_path):
    train, test = make_cifar("cifar100", seed=4)
    coarse = lambda labels: [int(x) // 5 for x in labels]  # noqa: E731
    tar_gz(tmp_path / "cifar-100-binary.tar.gz", {
        "cifar-100-binary/train.bin": cifar_record_bytes(*train[0], coarse=coarse(train[0][1])),
        "cifar-100-binary/test.bin": cifar_record_bytes(*test, coarse=coarse(test[1]))})
    assert_dataset(data.load_dataset("cifar100", str(tmp_path)), *expected(train, test))


def test_cifar_python_pickle_with_code_is_refused(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    evil = pickle.dumps({b"data": os.getcwd, b"fine_labels": []})  # a global outside numpy
    (folder / "train").write_bytes(evil)
    (folder / "test").write_bytes(evil)
    with pytest.raises(data.CorruptDatasetError, match="cifar-100-python"):
        data.load_dataset("cifar100", str(tmp_path))


def test_corrupt_cifar_archive_names_file(tmp_path):
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(data.CorruptDatasetError, match="cifar-10-binary.tar.gz"):
        data.load_dataset("cifar10", str(tmp_path))


# ----------------------------------------------------------------------------- TFDS prepared dir


def test_tfds_prepared_dir_read_without_tensorflow(tmp_path):
    """Prepare a tiny fashion_mnist in array_record with TFDS itself (images given as PNG bytes so
    TFDS need not encode them with TensorFlow), then read it back through load_dataset."""
    import tensorflow_datasets as tfds

    def png(value: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(np.full((28, 28), value, np.uint8)).save(buf, format="png")
        return buf.getvalue()

    with tfds.core.registered.skip_registration():  # the real fashion_mnist builder stays registered
        class FashionMnist(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("3.0.1")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(28, 28, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10)}), supervised_keys=("image", "label"))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(6), "test": self._generate_examples(4)}

            def _generate_examples(self, n):
                for i in range(n):
                    yield i, {"image": png(10 * i + 1), "label": i}

        FashionMnist(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    if "tensorflow" in sys.modules:
        pytest.skip("tensorflow is importable here, so 'reads without tensorflow' cannot be checked")
    ds = data.load_dataset("fashion_mnist", str(tmp_path))
    assert "tensorflow" not in sys.modules
    assert ds.source == f"tfds:{tmp_path}"
    for images, labels, n in ((ds.train_images, ds.train_labels, 6), (ds.test_images, ds.test_labels, 4)):
        assert images.shape == (n, 28, 28, 1) and images.dtype == np.uint8
        assert sorted(labels.tolist()) == list(range(n))  # TFDS stores records shuffled
        for image, label in zip(images, labels):
            assert (image == 10 * label + 1).all()


# ----------------------------------------------------------------------------- missing data, download


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "cifar100"])
def test_missing_dataset_error_lists_places_and_downloads_nothing(tmp_path, monkeypatch, name):
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "env"))
    (tmp_path / "given").mkdir()
    with pytest.raises(data.DatasetNotFoundError) as info:
        data.load_dataset(name, str(tmp_path / "given"))
    message = str(info.value)
    for place in (tmp_path / "given", tmp_path / "given" / name, tmp_path / "env",
                  os.path.expanduser(f"~/.cache/oba_jax/{name}"), os.path.expanduser("~/tensorflow_datasets")):
        assert str(place) in message
    assert "download=True" in message and "--config.data.data_dir" in message
    if name == "fashion_mnist":
        assert "apt-get install dataset-fashion-mnist" in message and data.DEBIAN_FASHION_MNIST_DIR in message
    else:
        assert "https://www.cs.toronto.edu/~kriz/" in message
    assert not os.path.exists(os.path.expanduser(f"~/.cache/oba_jax/{name}"))


def test_download_flag_fetches_verifies_and_reads(tmp_path, monkeypatch):
    train, test = make_cifar("cifar10", seed=5)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, payload in cifar10_binary_files(train, test).items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    payload = archive.getvalue()
    import hashlib
    url = "https://example.invalid/cifar-10-binary.tar.gz"
    monkeypatch.setitem(data.DOWNLOADS, "cifar10", ((url, hashlib.sha256(payload).hexdigest()),))
    fetched = []

    def fake_urlopen(u):
        fetched.append(u)
        return io.BytesIO(payload)

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)
    ds = data.load_dataset("cifar10", download=True)
    assert fetched == [url]
    assert_dataset(ds, *expected(train, test))
    assert ds.source == os.path.expanduser("~/.cache/oba_jax/cifar10/cifar-10-binary.tar.gz")
    data.load_dataset("cifar10", download=True)  # already there: nothing fetched again
    assert fetched == [url]

    monkeypatch.setitem(data.DOWNLOADS, "cifar10", ((url, "0" * 64),))
    with pytest.raises(data.CorruptDatasetError, match="sha256"):
        data.download_official_files("cifar10", str(tmp_path / "other"), urlopen=fake_urlopen)


def test_imagenet_load_dataset_points_to_the_stream(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="oba_jax.experiment.imagenet prepare"):
        data.load_dataset("imagenet2012", str(tmp_path))
    (tmp_path / "imagenet2012" / "5.1.0").mkdir(parents=True)
    (tmp_path / "imagenet2012" / "5.1.0" / "dataset_info.json").write_text("{}")
    from oba_jax.experiment.config import ConfigError       # status 2 in the CLIs, not a traceback
    with pytest.raises(ConfigError, match=r"does not fit in memory; stream it.*data\.stream=true"):
        data.load_dataset("imagenet2012", str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("mnist")


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_and_learnable():
    a = data.load_dataset("synthetic", image_shape=(8, 8, 2), num_classes=5, num_train=200, num_test=50, seed=3)
    b = data.synthetic_dataset(image_shape=(8, 8, 2), num_classes=5, num_train=200, num_test=50, seed=3)
    c = data.synthetic_dataset(image_shape=(8, 8, 2), num_classes=5, num_train=200, num_test=50, seed=4)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.train_images.shape == (200, 8, 8, 2) and a.train_images.dtype == np.uint8
    assert a.train_labels.dtype == np.int32 and 0 <= a.train_labels.min() and a.train_labels.max() < 5
    assert len(a.mean) == len(a.std) == 2 and a.source == "synthetic"
    # Learnable: nearest class mean (estimated on train) classifies test well above chance (20%).
    x = a.train_images.reshape(200, -1).astype(np.float32)
    centers = np.stack([x[a.train_labels == k].mean(0) for k in range(5)])
    test_x = a.test_images.reshape(50, -1).astype(np.float32)
    predicted = np.argmin(((test_x[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    assert (predicted == a.test_labels).mean() > 0.9


# ----------------------------------------------------------------------------- preprocess_batch

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def test_preprocess_normalises_without_augment():
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    out = jax.jit(lambda x: data.preprocess_batch(x, None, augment=False, mean=MEAN, std=STD))(images)
    assert out.dtype == jnp.float32 and out.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(out, (images / 255.0 - np.array(MEAN)) / np.array(STD), rtol=1e-5, atol=1e-5)


def test_preprocess_augment_deterministic_and_shifted_copies():
    n = 64
    images = np.random.default_rng(1).integers(1, 256, (n, 32, 32, 3), dtype=np.uint8)  # no zeros: padding is visible
    fn = jax.jit(lambda x, k: data.preprocess_batch(x, k, augment=True, mean=(0.0,) * 3, std=(1.0,) * 3))
    key = jax.random.key(0)
    out = np.asarray(fn(images, key))
    np.testing.assert_array_equal(out, np.asarray(fn(images, key)))
    assert not np.array_equal(out, np.asarray(fn(images, jax.random.key(1))))
    assert out.dtype == np.float32 and out.shape == images.shape

    # Every output is one of the (9 x 9 offsets) x (flip or not) crops of the zero-padded input.
    raw = np.round(out * 255).astype(np.int64)
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0))).astype(np.int64)
    seen_flip = seen_plain = seen_shift = False
    for i in range(n):
        matches = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)
                   if np.array_equal(raw[i], (lambda c: c[:, ::-1] if f else c)(padded[i, dy:dy + 32, dx:dx + 32]))]
        assert len(matches) == 1, f"example {i} is not a padded crop/flip of its input"
        dy, dx, f = matches[0]
        seen_flip |= f
        seen_plain |= not f
        seen_shift |= (dy, dx) != (4, 4)
    assert seen_flip and seen_plain and seen_shift


def test_random_crop_flip_known_example():
    """An image of the column index: a flip reverses columns; a shift by the offset moves them and
    fills with zero padding. Check the offset the key draws against the result."""
    col = np.tile(np.arange(1, 9, dtype=np.uint8)[None, :, None], (8, 1, 1))[None]  # (1, 8, 8, 1) cols 1..8
    key = jax.random.key(42)
    out = np.asarray(data.random_crop_flip(jnp.asarray(col), key))[0, :, :, 0]
    crop_key, flip_key = jax.random.split(key)
    dy, dx = np.asarray(jax.random.randint(crop_key, (1, 2), 0, 9))[0]
    flip = bool(jax.random.bernoulli(flip_key, 0.5, (1,))[0])
    padded_row = np.concatenate([np.zeros(4), np.arange(1, 9), np.zeros(4)])
    expected_row = padded_row[dx:dx + 8][::-1] if flip else padded_row[dx:dx + 8]
    rows_valid = (np.arange(8) + dy >= 4) & (np.arange(8) + dy < 12)
    expected = np.where(rows_valid[:, None], expected_row[None, :], 0)
    np.testing.assert_array_equal(out, expected)


def test_preprocess_augment_needs_rng():
    with pytest.raises(ValueError, match="rng"):
        data.preprocess_batch(np.zeros((1, 4, 4, 1), np.uint8), None, augment=True, mean=(0.0,), std=(1.0,))


# ----------------------------------------------------------------------------- ImageNet transforms


def test_imagenet_eval_transform_is_center_crop():
    image = np.zeros((256, 512, 3), np.uint8)
    image[:, 256 - 112:256 + 112] = 255  # the centre 224 columns are white
    out = imagenet.eval_transform(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out.min() == 255


def test_imagenet_random_resized_crop_box_in_bounds():
    rng = np.random.default_rng(0)
    for h, w in [(300, 400), (50, 1000), (224, 224)]:
        for _ in range(50):
            top, left, ch, cw = imagenet.random_resized_crop_box(h, w, rng)
            assert 0 <= top and 0 <= left and 0 < ch and 0 < cw and top + ch <= h and left + cw <= w


def test_a_data_dir_the_user_names_must_exist(tmp_path):
    """Only the default search order falls back; a named place that is not there is an error at once."""
    with pytest.raises(data.DatasetNotFoundError, match="is not a directory"):
        data.load_dataset("fashion_mnist", str(tmp_path / "no" / "such"))
