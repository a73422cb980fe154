"""The streaming input (Grain over a prepared TFDS dataset): the same batches as in memory, by global step and per
process; training, evaluation and scoring read through it; the TF-free ImageNet preparation from the tars; bad
datasets fail with one clear message."""

from __future__ import annotations

import io
import os
import shutil
import tarfile

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from oba_jax.experiment import config as config_lib
from oba_jax.experiment import data, imagenet, inputs, streaming, training
from oba_jax.sharding import data_mesh



def _stream(data_dir: str, name: str = "fashion_mnist", shape=(8, 8, 1), transform: str = "none", workers: int = 0):
    return streaming.open_stream(name, data_dir, image_shape=shape, host_transform=transform, num_workers=workers,
                                 mean=(0.3,), std=(0.3,))


def _in_memory(arrays) -> data.ArrayDataset:
    return data.ArrayDataset("fashion_mnist", *arrays, num_classes=10, mean=(0.3,), std=(0.3,), source="test")


def _host(batch):
    return [np.asarray(jax.device_get(a)) for a in batch]


def test_streamed_batches_are_the_in_memory_ones_by_step_and_by_process(streamed_fashion):
    data_dir, arrays = streamed_fashion
    stream, memory = _stream(data_dir), _in_memory(arrays)
    assert (stream.num_train, stream.num_test, stream.num_classes, stream.image_shape) == (64, 10, 10, (8, 8, 1))
    mesh = data_mesh()
    common = dict(seed=3, batch_size=16, steps_per_epoch=4, num_steps=8, mesh=mesh)
    streamed, held = inputs.train_input(stream, **common), inputs.train_input(memory, **common)
    for step in (0, 1, 5, 2, 3, 4, 7):     # across the epoch boundary, and jumps back and forth
        a, b = _host(streamed.batch(step)), _host(held.batch(step))
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        epoch, in_epoch = divmod(step, 4)          # the documented order: a permutation of (seed, epoch)
        idx = np.random.default_rng((3, epoch)).permutation(64)[in_epoch * 16:(in_epoch + 1) * 16]
        np.testing.assert_array_equal(a[1], arrays[1][idx])
    streamed.close()
    # each of P processes reads its consecutive B/P examples of the global batch
    whole = streaming.train_batches(stream, seed=3, global_batch=16, steps_per_epoch=4, num_steps=8)
    parts = [streaming.train_batches(stream, seed=3, global_batch=16, steps_per_epoch=4, num_steps=8,
                                     process_index=p, process_count=2) for p in (0, 1)]
    for step in (1, 6):
        np.testing.assert_array_equal(np.concatenate([p[step][0] for p in parts]), whole[step][0])
    # evaluation: file order, the last batch padded with weight 0; examples by index
    for (x, y, w), (u, v, z) in zip(inputs.eval_batches(stream, 4, mesh), inputs.eval_batches(memory, 4, mesh),
                                    strict=True):
        for p, q in ((x, u), (y, v), (w, z)):
            np.testing.assert_array_equal(np.asarray(p), np.asarray(q))
    assert float(np.asarray(w).sum()) == 2.0
    images, labels = inputs.examples(stream, "test", [9, 0])
    np.testing.assert_array_equal(images, arrays[2][[9, 0]])
    np.testing.assert_array_equal(labels, arrays[3][[9, 0]])


def test_training_on_a_stream_resumes_from_its_saved_iterator_and_equals_training_in_memory(streamed_fashion, tmp_path,
                                                                                            capsys):
    """6 steps from memory against 3 + 3 from disk with a checkpoint between (the resume restores the Grain
    iterator's state from the checkpoint's `input` item): the same parameters, bit for bit. A damaged input state
    costs only itself: a warning, and the stream starts afresh at the step."""
    from models import build_model
    data_dir, arrays = streamed_fashion
    config = config_lib.default_sections()
    config.model.family = "mlp"
    config.model.spec.update(image_shape=(8, 8, 1), hidden=(16,), num_classes=10)
    config.train.update(batch_size=16, epochs=2, progress_bar=False, checkpoint_every_steps=100, eval_batch_size=8)
    config.plot.enabled = False
    model = build_model(config_lib.model_spec(config), rngs=nnx.Rngs(0))

    config.train.max_steps = 6
    held, held_metrics = training.fit(model, _in_memory(arrays), config, None)
    config.train.max_steps = 3
    training.fit(model, _stream(data_dir), config, str(tmp_path))
    saved = tmp_path / "checkpoints" / "3" / "input" / "process_0-of-1.json"
    assert b'"next_step": 3' in saved.read_bytes()
    shutil.copytree(tmp_path / "checkpoints", tmp_path / "damaged" / "checkpoints")
    (tmp_path / "damaged" / saved.relative_to(tmp_path)).write_text("{not json")
    config.train.max_steps = 6
    for workdir in (tmp_path, tmp_path / "damaged"):
        capsys.readouterr()
        streamed, streamed_metrics = training.fit(model, _stream(data_dir), config, str(workdir))
        for a, b in zip(jax.tree.leaves(nnx.state(held, nnx.Param)), jax.tree.leaves(nnx.state(streamed, nnx.Param))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert held_metrics["top1"] == streamed_metrics["top1"] and held_metrics["loss"] == streamed_metrics["loss"]
        assert ("input iterator state" in capsys.readouterr().err) == (workdir != tmp_path)


def _tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _image_bytes(seed: int, fmt: str, mode: str = "RGB") -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (20 + seed, 24, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).convert(mode).save(out, format=fmt)
    return out.getvalue()


def test_imagenet_prepared_from_the_tars_without_tensorflow(tmp_path, capsys):
    """`python -m oba_jax.experiment.imagenet prepare` on tars laid out as image-net.org's: TFDS' own imagenet2012
    (class names, validation labels) that the ImageNet configs stream; a CMYK JPEG and a PNG become RGB JPEGs."""
    manual = tmp_path / "manual"
    manual.mkdir()
    synsets = ["n01443537", "n01440764"]                # classes 1 and 0 of TFDS' labels.txt
    with tarfile.open(manual / imagenet.TRAIN_TAR, "w") as outer:
        for k, synset in enumerate(synsets):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                _tar_member(t, f"{synset}_1.JPEG", _image_bytes(k, "JPEG"))
                _tar_member(t, f"{synset}_2.JPEG", _image_bytes(k + 2, "PNG") if k else _image_bytes(k + 2, "JPEG", "CMYK"))
            _tar_member(outer, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual / imagenet.VAL_TAR, "w") as tar:
        for k in (3, 1, 2):
            _tar_member(tar, f"ILSVRC2012_val_{k:08d}.JPEG", _image_bytes(k, "JPEG"))
    out = tmp_path / "tfds"
    assert imagenet.main(["prepare", "--manual-dir", str(manual), "--data-dir", str(out)]) == 0
    ds = _stream(str(out), "imagenet2012", (16, 16, 3), "imagenet")
    assert (ds.num_train, ds.num_test, ds.num_classes, ds.test_split) == (4, 3, 1000, "validation")

    import tensorflow_datasets as tfds
    folder = tfds.builder_from_directory(ds.folder)
    names = folder.info.features["label"].names
    train = list(folder.as_data_source("train", decoders={"image": tfds.decode.SkipDecoding()}))
    assert sorted((r["file_name"].decode(), int(r["label"])) for r in train) == [
        ("n01440764_1.JPEG", 0), ("n01440764_2.JPEG", 0), ("n01443537_1.JPEG", 1), ("n01443537_2.JPEG", 1)]
    for r in train:
        assert Image.open(io.BytesIO(r["image"])).format == "JPEG" and Image.open(io.BytesIO(r["image"])).mode == "RGB"
    # TFDS' validation labels: one synset per image in the sorted order of the file names (the first three lines)
    first = ["n01751748", "n09193705", "n02105855"]
    val = {r["file_name"].decode(): names[int(r["label"])] for r in folder.as_data_source("validation")}
    assert val == {f"ILSVRC2012_val_{k:08d}.JPEG": first[k - 1] for k in (1, 2, 3)}
    images, labels = inputs.examples(ds, "test", range(3))
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8

    capsys.readouterr()
    assert imagenet.main(["prepare", "--manual-dir", str(tmp_path / "none"), "--data-dir", str(out)]) == 3
    err = capsys.readouterr().err
    assert imagenet.TRAIN_TAR in err and "image-net.org" in err and "Traceback" not in err


def test_a_dataset_without_an_evaluation_split_or_with_a_damaged_shard_is_refused(fake_imagenet, tmp_path):
    import fake_tfds
    only_train = tmp_path / "only_train"
    fake_tfds.write(str(only_train), "imagenet2012", "5.1.0",
                    {"train": [(fake_tfds.encoded(np.zeros((8, 8, 3), np.uint8), "jpeg"), 0)]},
                    num_classes=10, encoding="jpeg")
    with pytest.raises(data.DatasetNotFoundError, match=r"lacks an evaluation split \(validation or test\).*\['train'\]"):
        _stream(str(only_train), "imagenet2012", (16, 16, 3), "imagenet")

    damaged = tmp_path / "damaged"
    shutil.copytree(fake_imagenet, damaged)
    shard = next((damaged / "imagenet2012" / "5.1.0").glob("imagenet2012-train.array_record-*"))
    shard.write_bytes(shard.read_bytes()[:200])               # a truncated download
    with pytest.raises(data.CorruptDatasetError, match=r"'train' split cannot be read.*imagenet2012-train\.array_record"):
        _stream(str(damaged), "imagenet2012", (16, 16, 3), "imagenet")
    with pytest.raises(data.DatasetNotFoundError, match="imagenet2012"):
        _stream(str(tmp_path / "nothing_here"), "imagenet2012", (16, 16, 3), "imagenet")

    # three shards, the middle one damaged: found when the stream opens (every shard's first record is read) …
    images = [(fake_tfds.encoded(np.full((8, 8, 3), k, np.uint8), "jpeg"), k % 10) for k in range(12)]
    sharded = tmp_path / "sharded"
    folder = fake_tfds.write(str(sharded), "imagenet2012", "5.1.0", {"train": images, "validation": images[:3]},
                             num_classes=10, encoding="jpeg", num_shards=3)
    stream = _stream(str(sharded), "imagenet2012", (16, 16, 3), "imagenet")
    middle = sorted(p for p in os.listdir(folder) if "-train.array_record" in p)[1]
    intact = open(os.path.join(folder, middle), "rb").read()
    open(os.path.join(folder, middle), "wb").write(intact[:100])
    with pytest.raises(data.CorruptDatasetError, match=f"its shard {middle} is damaged"):
        _stream(str(sharded), "imagenet2012", (16, 16, 3), "imagenet")
    # … and, damaged after that, when the training stream reaches it: the same message, not a reader's traceback
    with pytest.raises(data.CorruptDatasetError, match=f"record .* of the 'train' split cannot be read.*{middle}"):
        for step in range(6):
            streaming.train_batches(stream, seed=0, global_batch=2, steps_per_epoch=6, num_steps=6)[step]
