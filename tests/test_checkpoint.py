"""Checkpoints: every model family at non-default widths restores in a fresh process from the
checkpoint alone; the full train state (optimizer included) round-trips exactly."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import build_model, input_shape, make_spec
from oba_jax.experiment import checkpoint as ckpt_lib
from oba_jax.experiment import config as config_lib, training as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small instances with widths no named config produces (as pruning would).
SPECS = {
    "mlp": lambda: make_spec("mlp", image_shape=(8, 8, 1), hidden=(13, 7), num_classes=5),
    "vgg": lambda: make_spec("vgg", cfg=(6, "M", 11, "M", 9), image_size=8, num_classes=4),
    "resnet_cifar": lambda: make_spec("resnet_cifar", stage_widths=(5, 7, 9), blocks_per_stage=(1, 1, 1),
                                      block_widths=((3,), (6,), (4,)), image_size=8, num_classes=3),
    "resnet50": lambda: make_spec("resnet50", stem_width=6, stage_widths=(10, 12, 14, 16),
                                  blocks_per_stage=(1, 2, 1, 1),
                                  block_widths=(((3, 5),), ((4, 6), (5, 3)), ((7, 2),), ((3, 3),)),
                                  image_size=32, num_classes=6),
    "vit": lambda: make_spec("vit", image_size=16, patch_size=8, hidden_dim=12, num_layers=2,
                             num_heads=(2, 3), head_dim=(5, 4), mlp_dim=(9, 17), num_classes=7),
}


def _perturbed_model(spec, seed: int):
    """A model whose every param and batch stat differs from a fresh init (so a restore that silently
    re-initialised would fail the comparison)."""
    # jitted: one compiled init instead of one per parameter shape (half the time of eager init here)
    model = nnx.jit(lambda: build_model(spec, rngs=nnx.Rngs(seed)))()
    graphdef, params, stats, other = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    rng = np.random.default_rng(seed)  # numpy: eager jax.random would compile once per leaf shape
    params = jax.tree.map(lambda x: x + np.float32(0.01) * rng.standard_normal(x.shape, np.float32), params)
    stats = jax.tree.map(lambda x: jnp.abs(x + np.float32(0.3) * rng.standard_normal(x.shape, np.float32)), stats)
    return nnx.merge(graphdef, params, stats, other)


def _save_model(spec, model, workdir: str) -> None:
    config = config_lib.default_sections()
    parts, params, stats = train_lib.split_model(model)
    tx = train_lib.make_optimizer(config.optim, lambda step: 0.1)
    state = train_lib.TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params))
    manager = ckpt_lib.make_manager(workdir)
    ckpt_lib.save_state(manager, 3, state, spec=spec, config=config,
                        data_position={"epoch": 0, "step_in_epoch": 3})
    manager.wait_until_finished()
    manager.close()


_RESTORE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from flax import nnx
    from models import input_shape
    from oba_jax.experiment.checkpoint import restore_model
    out = {}
    for family, workdir in json.loads(sys.argv[1]).items():
        model, extra = restore_model(workdir)
        x = np.linspace(-1, 1, int(np.prod((2,) + input_shape(model.spec))), dtype=np.float32)
        logits = nnx.jit(lambda m, x: m(x))(model, x.reshape((2,) + input_shape(model.spec)))
        out[family] = {"logits": np.asarray(logits).tolist(),
                       "spec": extra["spec"], "step": extra["step"], "position": extra["data_position"]}
    print(json.dumps(out))
""")


def test_every_family_restores_in_a_fresh_process(tmp_path):
    expected, workdirs = {}, {}
    for family, make in SPECS.items():
        spec = make()
        model = _perturbed_model(spec, seed=123)
        workdirs[family] = str(tmp_path / family)
        _save_model(spec, model, workdirs[family])
        model.eval()
        shape = (2,) + input_shape(spec)
        x = np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32).reshape(shape)
        expected[family] = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _RESTORE_SCRIPT, json.dumps(workdirs)], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    restored = json.loads(out.stdout.strip().splitlines()[-1])
    from models import spec_to_dict
    for family, make in SPECS.items():
        assert restored[family]["spec"] == spec_to_dict(make()), family
        assert restored[family]["step"] == 3 and restored[family]["position"] == {"epoch": 0, "step_in_epoch": 3}
        np.testing.assert_allclose(restored[family]["logits"], expected[family], rtol=1e-5, atol=1e-5,
                                   err_msg=family)


def test_train_state_round_trips_exactly(tmp_path):
    config = config_lib.default_sections()
    config.model.family = "vgg"
    config.model.spec.update(cfg=(4, "M", 6), image_size=8)
    config.data.synthetic.update(num_train=64, num_test=16, image_shape=(8, 8, 3))
    config.train.update(batch_size=16, eval_batch_size=16, progress_bar=False, max_steps=3)
    dataset = train_lib.load_dataset_for(config)
    spec = config_lib.model_spec(config)
    parts, params, stats = train_lib.split_model(build_model(spec, rngs=nnx.Rngs(0)))
    trainer = train_lib.make_trainer(config, parts, dataset)
    state = train_lib.train_steps(trainer, train_lib.create_state(trainer, params, stats), 0, 3)
    manager = ckpt_lib.make_manager(str(tmp_path))
    ckpt_lib.save_state(manager, 3, state, spec=spec, config=config, data_position={"epoch": 0, "step_in_epoch": 3})
    manager.wait_until_finished()
    template = train_lib.create_state(trainer, params, stats)
    restored, meta = ckpt_lib.restore_state(manager, template, spec=spec)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, state)
    assert int(restored.step) == 3 and meta["config"]["train"]["batch_size"] == 16
    other = make_spec("vgg", cfg=(4, "M", 7), image_size=8)
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="different model"):
        ckpt_lib.restore_state(manager, template, spec=other)
    manager.close()
    assert ckpt_lib.read_meta(str(tmp_path))["data_position"] == {"epoch": 0, "step_in_epoch": 3}
    model, extra = ckpt_lib.restore_model(os.path.join(str(tmp_path), "checkpoints", "3"))
    assert extra["step"] == 3 and model.spec == spec


def test_flatten_names_are_readable():
    model = build_model(SPECS["vgg"](), rngs=nnx.Rngs(0))
    names = set(ckpt_lib.flatten_named(nnx.state(model, nnx.Param), "params"))
    assert "params/layers/0/conv/kernel" in names and "params/fc/bias" in names


# ----------------------------------------------------------------------------- corrupt checkpoints


def _random_bits(rng, shape) -> jax.Array:
    """Finite float32s of random bits: incompressible, so orbax's zstd stores their bytes verbatim."""
    bits = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
    bits[(bits >> 23) & 0xFF == 0xFF] ^= np.uint32(1 << 30)  # no inf/NaN
    return jnp.asarray(bits.view(np.float32))


def _saved_steps(workdir: str, steps=(1, 2)):
    """Saves a tiny MLP train state of random params at each of ``steps``;
    returns ``(spec, manager, template, {step: state})``."""
    spec = make_spec("mlp", image_shape=(8, 8, 1), hidden=(32,), num_classes=5)
    _, params, stats = train_lib.split_model(build_model(spec, rngs=nnx.Rngs(0)))
    tx = train_lib.make_optimizer(config_lib.default_sections().optim, lambda step: 0.1)
    manager, states = ckpt_lib.make_manager(workdir), {}
    for step in steps:
        rng = np.random.default_rng(step)
        p = jax.tree.map(lambda x, rng=rng: _random_bits(rng, x.shape), params)
        states[step] = train_lib.TrainState(jnp.asarray(step, jnp.int32), p, stats, tx.init(p))
        ckpt_lib.save_state(manager, step, states[step], spec=spec, data_position={"epoch": 0, "step_in_epoch": step})
    manager.wait_until_finished()
    return spec, manager, train_lib.TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params)), states


def _step_dir(workdir: str, step: int) -> str:
    return os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step))


def _flip_kernel_bytes(workdir: str, step: int, state, n: int = 200) -> str:
    """Inverts ``n`` bytes of the first layer's kernel where they lie verbatim in an array data file of ``step``
    (so the damage is silent to orbax/zstd and only a checksum can catch it); returns that file."""
    needle = np.asarray(state.params["layers"][0]["kernel"][...]).tobytes()[1000:1000 + n]
    for root, _, files in os.walk(os.path.join(_step_dir(workdir, step), "model")):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                data = bytearray(f.read())
            at = data.find(needle)
            if at >= 0:
                data[at:at + n] = bytes(b ^ 0xFF for b in data[at:at + n])
                with open(path, "wb") as f:
                    f.write(data)
                return path
    raise AssertionError("the kernel's bytes are stored in no data file verbatim")


def _largest_data_file(workdir: str, step: int) -> str:
    root = os.path.join(_step_dir(workdir, step), "model")
    files = [os.path.join(r, f) for r, _, fs in os.walk(root) if os.path.basename(r) == "d" for f in fs]
    return max(files, key=os.path.getsize)


def _assert_same_state(restored, expected) -> None:
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, expected)


def test_corrupt_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path):
    workdir = str(tmp_path)
    spec, manager, template, states = _saved_steps(workdir)
    _flip_kernel_bytes(workdir, 2, states[2])
    with pytest.warns(ckpt_lib.CorruptCheckpointWarning) as caught:
        restored, meta = ckpt_lib.restore_state(manager, template, spec=spec)
    _assert_same_state(restored, states[1])
    assert meta["step"] == 1 and "checksums" not in meta
    message = str(caught[0].message)
    assert "step 2" in message and "restored step 1" in message and "params/layers/0/kernel" in message, message
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="does not match the checksum"):
        ckpt_lib.restore_state(manager, template, step=2, spec=spec)  # an explicit step never falls back
    manager.close()


def test_set_aside_corrupt_lets_a_resumed_run_save_that_step_again(tmp_path):
    workdir = str(tmp_path)
    spec, manager, template, states = _saved_steps(workdir)
    _flip_kernel_bytes(workdir, 2, states[2])
    with pytest.warns(ckpt_lib.CorruptCheckpointWarning, match=r"2\.corrupt"):
        restored, _ = ckpt_lib.restore_state(manager, template, spec=spec, set_aside_corrupt=True)
    assert manager.all_steps() == [1] and os.path.isdir(_step_dir(workdir, 2) + ".corrupt")
    ckpt_lib.save_state(manager, 2, restored, spec=spec)  # orbax would skip this save were step 2 still there
    manager.wait_until_finished()
    assert manager.latest_step() == 2
    manager.close()


def test_restore_model_falls_back_from_a_corrupt_newest_checkpoint(tmp_path):
    workdir = str(tmp_path)
    _, manager, _, states = _saved_steps(workdir)
    manager.close()
    _flip_kernel_bytes(workdir, 2, states[2])
    with pytest.warns(ckpt_lib.CorruptCheckpointWarning, match="step 2 and restored step 1"):
        model, extra = ckpt_lib.restore_model(workdir)
    assert extra["step"] == 1
    np.testing.assert_array_equal(np.asarray(model.layers[0].kernel[...]),
                                  np.asarray(states[1].params["layers"][0]["kernel"][...]))
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="does not match the checksum"):
        ckpt_lib.restore_model(_step_dir(workdir, 2))  # a step dir names the step: no fallback


def test_only_checkpoint_corrupt_is_an_error_naming_its_step_dir(tmp_path):
    workdir = str(tmp_path)
    spec, manager, template, states = _saved_steps(workdir, steps=(1,))
    _flip_kernel_bytes(workdir, 1, states[1])
    with pytest.raises(ckpt_lib.CorruptCheckpointError) as err:
        ckpt_lib.restore_state(manager, template, spec=spec)
    assert f"checkpoint step 1 in {_step_dir(workdir, 1)} is corrupt" in str(err.value)
    assert "'params/layers/0/kernel'" in str(err.value)
    manager.close()
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="params/layers/0/kernel"):
        ckpt_lib.restore_model(workdir)


def test_truncated_file_is_one_clear_error(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    spec, manager, template, _ = _saved_steps(workdir, steps=(1,))
    path = _largest_data_file(workdir, 1)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:16])  # every array in it fails to read
    # orbax's event loop leaves the sibling reads' exceptions to sys.unraisablehook ("Exception ignored in:
    # <coroutine ...>" tracebacks on stderr); pytest installs its own hook, so record what reaches it.
    noise = []
    monkeypatch.setattr(sys, "unraisablehook", noise.append)
    ckpt_lib.filter_orbax_noise()   # what the CLIs install for their process (library calls never do)
    with pytest.raises(ckpt_lib.CorruptCheckpointError) as err:
        ckpt_lib.restore_state(manager, template, spec=spec)
    gc.collect()
    assert not noise, [str(u.exc_value)[:200] for u in noise]
    manager.close()
    assert err.value.__cause__ is None and err.value.__suppress_context__
    message = str(err.value)
    assert f"checkpoint step 1 in {_step_dir(workdir, 1)} is corrupt" in message and "\n" not in message
    assert os.path.join(_step_dir(workdir, 1), "model") in message, message  # the underlying reader's error


def test_unparsable_meta_is_an_error_naming_the_file(tmp_path):
    workdir = str(tmp_path)
    spec, manager, template, _ = _saved_steps(workdir, steps=(1,))
    meta_file = os.path.join(_step_dir(workdir, 1), "meta", "metadata")
    assert os.path.isfile(meta_file)
    with open(meta_file, "w") as f:
        f.write('{"step": 1, "spec": ')
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match=f"metadata file {meta_file} ") as err:
        ckpt_lib.restore_state(manager, template, spec=spec)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    manager.close()
    for read in (ckpt_lib.read_meta, ckpt_lib.restore_model):
        with pytest.raises(ckpt_lib.CorruptCheckpointError, match=f"metadata file {meta_file} "):
            read(workdir)


def test_checkpoint_without_checksums_restores_unverified(tmp_path):
    """Checkpoints written before checksums existed still restore."""
    workdir = str(tmp_path)
    spec, manager, template, states = _saved_steps(workdir, steps=(1,))
    meta_file = os.path.join(_step_dir(workdir, 1), "meta", "metadata")
    with open(meta_file) as f:
        meta = json.load(f)
    assert set(meta["checksums"]) == {"model", "train"} and "params/layers/0/kernel" in meta["checksums"]["model"]
    del meta["checksums"]
    with open(meta_file, "w") as f:
        json.dump(meta, f)
    restored, _ = ckpt_lib.restore_state(manager, template, spec=spec)
    _assert_same_state(restored, states[1])
    manager.close()
