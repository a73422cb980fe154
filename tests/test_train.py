"""Training library: optimizer, schedules, losses, metrics, data order, and 1 vs 4 devices."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from models import build_model
from oba_jax.experiment import config as config_lib, inputs, training as train_lib
from oba_jax.losses import cross_entropy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**train) -> ml_collections.ConfigDict:
    config = config_lib.default_sections()
    config.model.family = "mlp"
    config.model.spec.image_shape = (8, 8, 1)
    config.model.spec.hidden = (32,)
    config.data.synthetic.update(num_train=256, num_test=100, image_shape=(8, 8, 1), num_classes=10)
    config.optim.update(lr=0.05, weight_decay=0.0, schedule="constant")
    config.train.update(batch_size=32, eval_batch_size=64, progress_bar=False, **train)
    return config


def test_train_step_reduces_loss():
    config = small_config(epochs=3)
    dataset = train_lib.load_dataset_for(config)
    model = build_model(config_lib.model_spec(config), rngs=nnx.Rngs(0))
    parts, params, stats = train_lib.split_model(model)
    trainer = train_lib.make_trainer(config, parts, dataset)
    state = train_lib.create_state(trainer, params, stats)
    before = train_lib.evaluate(trainer, state.params, state.batch_stats, dataset.train_images, dataset.train_labels)
    state = train_lib.train_steps(trainer, state, 0, trainer.total_steps)
    after = train_lib.evaluate(trainer, state.params, state.batch_stats, dataset.train_images, dataset.train_labels)
    assert int(state.step) == trainer.total_steps == 24
    assert after["loss"] < 0.7 * before["loss"]
    assert after["top1"] > before["top1"]


def test_multistep_schedule_boundaries_are_epochs():
    optim = ml_collections.ConfigDict(dict(lr=0.1, schedule="multistep", milestones=(2, 4), gamma=0.1))
    sched = train_lib.learning_rate_schedule(optim, steps_per_epoch=10, total_steps=60)
    # Epoch e uses lr * gamma**(#milestones <= e), like PyTorch's MultiStepLR stepped per epoch.
    for step, expected in [(0, 0.1), (19, 0.1), (20, 0.01), (39, 0.01), (40, 0.001), (59, 0.001)]:
        assert float(sched(step)) == pytest.approx(expected, rel=1e-6), step


def test_cosine_and_constant_schedules():
    optim = ml_collections.ConfigDict(dict(lr=0.2, schedule="cosine", milestones=(), gamma=0.1))
    sched = train_lib.learning_rate_schedule(optim, steps_per_epoch=10, total_steps=100)
    for step in (0, 25, 50, 75, 100):
        assert float(sched(step)) == pytest.approx(0.1 * (1 + math.cos(math.pi * step / 100)), abs=1e-7)
    optim.schedule = "constant"
    assert float(train_lib.learning_rate_schedule(optim, 10, 100)(77)) == pytest.approx(0.2)


def test_sgd_matches_pytorch_coupled_weight_decay():
    optim = ml_collections.ConfigDict(dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=False))
    tx = train_lib.make_optimizer(optim, optax.constant_schedule(0.1))
    theta, buf = np.array([1.0, -2.0]), np.zeros(2)
    params = jnp.asarray(theta)
    state = tx.init(params)
    for g in ([0.5, 0.5], [-1.0, 2.0]):
        # torch.optim.SGD: d = g + wd*theta; buf = m*buf + d; theta -= lr*buf
        d = np.asarray(g) + 0.01 * theta
        buf = 0.9 * buf + d
        theta = theta - 0.1 * buf
        updates, state = tx.update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(np.asarray(params), theta, rtol=1e-6)


def test_label_smoothing_matches_hand_computation():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    labels = jnp.array([0])
    logp = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
    s = 0.3
    target = np.array([1 - s + s / 3, s / 3, s / 3])  # PyTorch's label_smoothing convention
    expected = -(target * logp).sum()
    got = float(cross_entropy(logits, labels, label_smoothing=s)[0])
    assert got == pytest.approx(expected, rel=1e-6)
    assert float(cross_entropy(logits, labels)[0]) == pytest.approx(-logp[0], rel=1e-6)
    assert got > -logp[0]  # smoothing penalises the confident correct prediction


def test_topk_correct_hand_example():
    logits = jnp.array([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0],   # label 0 is top-1
        [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0],   # label 5 is 5th -> top-5 only
        [0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.0],   # label 6 is 7th -> neither
        [0.5, 0.2, 0.9, 0.0, 0.0, 0.0, 0.0],   # label 0 is 2nd -> top-5 only
    ])
    labels = jnp.array([0, 5, 6, 0])
    np.testing.assert_array_equal(train_lib.topk_correct(logits, labels, 1), [1, 0, 0, 0])
    np.testing.assert_array_equal(train_lib.topk_correct(logits, labels, 5), [1, 1, 0, 1])
    # Fewer classes than k: everything is in the top-k.
    np.testing.assert_array_equal(train_lib.topk_correct(logits[:, :3], jnp.array([0, 2, 1, 1]), 5), [1, 1, 1, 1])


def test_evaluate_pads_last_batch_and_matches_direct_computation():
    config = small_config()
    config.train.eval_batch_size = 64  # 100 test examples -> a padded last batch
    dataset = train_lib.load_dataset_for(config)
    model = build_model(config_lib.model_spec(config), rngs=nnx.Rngs(1))
    parts, params, stats = train_lib.split_model(model)
    trainer = train_lib.make_trainer(config, parts, dataset)
    got = train_lib.evaluate(trainer, params, stats)
    x = (dataset.test_images.astype(np.float32) / 255.0 - np.asarray(dataset.mean)) / np.asarray(dataset.std)
    model.eval()
    logits = model(jnp.asarray(x, jnp.float32))
    labels = jnp.asarray(dataset.test_labels)
    assert got["loss"] == pytest.approx(float(jnp.mean(cross_entropy(logits, labels))), rel=1e-5)
    assert got["top1"] == pytest.approx(float(jnp.mean(train_lib.topk_correct(logits, labels, 1))))
    assert got["top5"] == pytest.approx(float(jnp.mean(train_lib.topk_correct(logits, labels, 5))))


def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    a = inputs.batch_indices(3, 2, 1, 100, 16)
    np.testing.assert_array_equal(a, inputs.batch_indices(3, 2, 1, 100, 16))
    assert not np.array_equal(a, inputs.batch_indices(3, 1, 1, 100, 16))
    epoch = np.concatenate([inputs.batch_indices(0, 0, i, 100, 16) for i in range(6)])
    assert len(set(epoch.tolist())) == 96  # no repeats within an epoch; the last 4 are dropped
    k1, k2 = train_lib.step_rng(0, 5), train_lib.step_rng(0, 5)
    np.testing.assert_array_equal(jax.random.key_data(k1), jax.random.key_data(k2))


def test_fit_returns_trained_model_without_workdir():
    config = small_config(epochs=1)
    dataset = train_lib.load_dataset_for(config)
    model = build_model(config_lib.model_spec(config), rngs=nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    trained, metrics = train_lib.fit(model, dataset, config, None)
    assert metrics["steps"] == 8 and 0.0 <= metrics["top1"] <= 1.0
    after = nnx.state(model, nnx.Param)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, after))  # input untouched
    assert type(trained) is type(model)


_DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from models import build_model
    from oba_jax.experiment import config as config_lib, training as train_lib
    config = config_lib.default_sections()
    config.model.family = "vgg"
    config.model.spec.update(cfg=(8, "M", 16), in_channels=3, image_size=8)
    config.data.synthetic.update(num_train=128, num_test=64, image_shape=(8, 8, 3), num_classes=10)
    config.data.augment = True
    config.optim.update(lr=0.05, schedule="cosine", label_smoothing=0.1)
    config.train.update(epochs=2, batch_size=16, eval_batch_size=32, progress_bar=False)
    config_lib.validate_config(config)
    dataset = train_lib.load_dataset_for(config)
    model = build_model(config_lib.model_spec(config), rngs=nnx.Rngs(0))
    parts, params, stats = train_lib.split_model(model)
    trainer = train_lib.make_trainer(config, parts, dataset)
    state = train_lib.create_state(trainer, params, stats)
    losses = []
    state = train_lib.train_steps(trainer, state, 0, trainer.total_steps,
                                  lambda s, st, m: losses.append(float(m["loss"])))
    ev = train_lib.evaluate(trainer, state.params, state.batch_stats)
    print(json.dumps({"devices": jax.device_count(), "losses": losses, "eval": ev}))
""")


def _run_devices(n: int) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    out = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_four_devices_give_the_same_loss_curve_as_one():
    one, four = _run_devices(1), _run_devices(4)
    assert one["devices"] == 1 and four["devices"] == 4
    assert len(one["losses"]) == len(four["losses"]) == 16
    # Same math, different reduction order (the gradient all-reduce, BN statistics): float tolerance.
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=2e-4, atol=2e-5)
    for k in ("loss", "top1", "top5"):
        assert four["eval"][k] == pytest.approx(one["eval"][k], rel=1e-3, abs=1e-3)


def test_masked_fine_tuning_keeps_pruned_weights_zero_through_checkpoint_and_resume(tmp_path):
    """Masks live in the optimizer state: a run stopped after step 4 and resumed to 8 keeps every pruned
    weight exactly 0, restores the masks from its checkpoint, and ends where an uninterrupted run ends."""
    from oba_jax.experiment.checkpoint import restore_masks
    dataset = train_lib.load_dataset_for(small_config())
    model = build_model(config_lib.model_spec(small_config()), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) < 0.4), nnx.state(model, nnx.Param))
    config = small_config(epochs=2, checkpoint_every_steps=3, max_steps=4)
    config.optim.update(weight_decay=1e-3, momentum=0.9)
    train_lib.fit(model, dataset, config, str(tmp_path / "run"), masks=masks)
    config.train.max_steps = 8
    resumed, metrics = train_lib.fit(model, dataset, config, str(tmp_path / "run"), masks=masks)
    straight, _ = train_lib.fit(model, dataset, config, str(tmp_path / "straight"), masks=masks)
    assert metrics["steps"] == 8
    leaves = zip(jax.tree.leaves(nnx.state(resumed, nnx.Param)), jax.tree.leaves(nnx.state(straight, nnx.Param)),
                 jax.tree.leaves(masks), jax.tree.leaves(nnx.state(model, nnx.Param)))
    for got, want, m, before in leaves:
        got, m = np.asarray(got), np.asarray(m)
        assert (got[~m] == 0).all()
        assert (got[m] != np.asarray(before)[m]).any()          # the kept weights trained
        np.testing.assert_array_equal(got, np.asarray(want))    # resume is exact
    stored, step = restore_masks(str(tmp_path / "run"))
    assert step == 8
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(masks)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_compute_trains_with_float32_parameters_and_scores_in_float32():
    """`train.compute_dtype=bfloat16`: every conv and dot of the train step runs in bf16 (BN statistics and
    the loss in float32), the parameters and optimizer state stay float32, the loss follows the float32
    run's, and importance scores of the trained model are float32."""
    import oba_jax
    config = small_config(epochs=1, compute_dtype="bfloat16")
    config.model.family = "vgg"
    config.model.spec = ml_collections.ConfigDict({"cfg": (8, "M", 16), "in_channels": 1, "image_size": 8})
    config_lib.validate_config(config)
    dataset = train_lib.load_dataset_for(config)
    model = build_model(config_lib.model_spec(config), rngs=nnx.Rngs(0))
    parts, params, stats = train_lib.split_model(model)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config.train.compute_dtype = dtype
        trainer = train_lib.make_trainer(config, parts, dataset)
        losses = []
        state = train_lib.train_steps(trainer, train_lib.create_state(trainer, params, stats), 0, 4,
                                      lambda s, st, m: losses.append(float(m["loss"])))
        runs[dtype] = (trainer, state, losses)
    trainer, state, losses = runs["bfloat16"]
    x = jnp.asarray(dataset.train_images[:4], jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p: train_lib.apply_model(trainer.parts, p, state.batch_stats, x, train=True))(
        state.params)
    products = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert len(products) == 3 and all(v.aval.dtype == jnp.bfloat16 for e in products for v in e.invars)
    assert jaxpr.out_avals[0].dtype == jnp.float32
    leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state))
    assert all(a.dtype == jnp.float32 for a in leaves if jnp.issubdtype(a.dtype, jnp.floating))
    np.testing.assert_allclose(losses, runs["float32"][2], rtol=3e-2)      # bf16 rounding, same trajectory
    assert losses != runs["float32"][2]                                   # and it did compute in bf16
    trained = train_lib.merge_model(parts, state.params, state.batch_stats)
    result = oba_jax.score_model(trained, [(x, jnp.asarray(dataset.train_labels[:4]))], "oba")
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(result.sum))
    with pytest.raises(config_lib.ConfigError, match="train.compute_dtype"):
        config_lib.validate_config(small_config(compute_dtype="float16"))
