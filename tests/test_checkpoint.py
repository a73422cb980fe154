"""Checkpoints: every model family at non-default widths restores in a fresh process from the
checkpoint alone; the full train state (optimizer included) round-trips exactly."""

from __future__ import annotations

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
    model = build_model(spec, rngs=nnx.Rngs(seed))
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
    from models import input_shape
    from oba_jax.experiment.checkpoint import restore_model
    out = {}
    for family, workdir in json.loads(sys.argv[1]).items():
        model, extra = restore_model(workdir)
        x = np.linspace(-1, 1, int(np.prod((2,) + input_shape(model.spec))), dtype=np.float32)
        out[family] = {"logits": np.asarray(model(x.reshape((2,) + input_shape(model.spec)))).tolist(),
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
        expected[family] = np.asarray(model(jnp.asarray(x)))
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
