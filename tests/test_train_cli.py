"""train.py end to end: outputs in the workdir, clean errors, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny VGG on synthetic 8x8 images: 16 steps per epoch.
TINY = ["--config", os.path.join(REPO, "configs", "fashion_mnist.py"),
        "--config.data.name=synthetic", "--config.data.synthetic.num_train=256",
        "--config.data.synthetic.num_test=64", "--config.data.synthetic.image_shape=(8, 8, 1)",
        "--config.model.spec.cfg=(4, 'M', 8)", "--config.model.spec.image_size=8",
        "--config.train.batch_size=16", "--config.train.eval_batch_size=32",
        "--config.train.progress_bar=false", "--config.data.augment=true"]


def _env(tmp_path) -> dict:
    # HOME/data variables point at empty directories so no real dataset is found by accident.
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", HOME=str(tmp_path / "home"),
               OBA_JAX_DATA=str(tmp_path / "nodata"), TFDS_DATA_DIR=str(tmp_path / "nodata"))
    env.pop("XLA_FLAGS", None)
    return env


def _train(args, tmp_path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(REPO, "train.py"), *args], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300, **kw)


def test_cli_writes_metrics_checkpoint_and_plot(tmp_path):
    workdir = tmp_path / "run"
    out = _train(TINY + ["--workdir", str(workdir), "--config.train.max_steps=3",
                         "--config.train.log_every_steps=1"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test top-1" in out.stdout and "synthetic" in out.stdout
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert {"lr", "train_loss", "train_accuracy", "epoch", "wall_time"} <= set(train[0])
    assert any(r["kind"] == "eval" and {"eval_top1", "eval_top5", "eval_loss"} <= set(r) for r in records)
    assert (workdir / "checkpoints" / "3").is_dir()
    assert (workdir / "curves.png").stat().st_size > 1000


def test_cifar_without_data_exits_with_clear_message(tmp_path):
    out = _train(["--config", os.path.join(REPO, "configs", "cifar10_resnet32.py"),
                  "--workdir", str(tmp_path / "x")], tmp_path)
    assert out.returncode != 0
    assert "cifar10" in out.stderr and "not found" in out.stderr and "To provide it" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


@pytest.mark.parametrize("override, key", [("--config.optim.lr=-1", "optim.lr"), ("--config.nope=1", "nope")])
def test_bad_override_exits_naming_the_key(tmp_path, override, key):
    out = _train(TINY + ["--workdir", str(tmp_path / "x"), override], tmp_path)
    assert out.returncode == 2
    assert key in out.stderr and "Traceback" not in out.stderr


def _final_params(workdir) -> dict:
    from flax import nnx
    from oba_jax.experiment.checkpoint import restore_model
    model, extra = restore_model(str(workdir))
    state = nnx.state(model, nnx.Param)
    import jax
    return extra["step"], [np.asarray(x) for x in jax.tree.leaves(state)]


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return out


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, streamed_fashion):
    """On the streaming input (a prepared TFDS dataset read by a Grain worker process): the resumed run restores
    the input iterator's state from the checkpoint and ends with the weights of an uninterrupted run (which reads
    in its own process: the batches do not depend on the worker count)."""
    data_dir, _ = streamed_fashion          # 64 training images: 4 steps per epoch
    args = TINY + ["--config.data.name=fashion_mnist", "--config.data.stream=true", f"--config.data.data_dir={data_dir}",
                   "--config.train.epochs=24", "--config.train.checkpoint_every_steps=7",
                   "--config.train.log_every_steps=7"]
    total = 24 * 4
    reference = _train(args + ["--workdir", str(tmp_path / "ref"), "--config.data.num_workers=0"], tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    args = args + ["--config.data.num_workers=1"]

    workdir = tmp_path / "killed"
    ckpts = workdir / "checkpoints"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *args, "--workdir", str(workdir)],
                            cwd=REPO, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if ckpts.is_dir() else []
        steps = [s for s in steps if s < total]  # isdigit: only finished (renamed) step dirs are plain integers
        if steps and max(steps) >= 21:  # resume point 21+ = mid-epoch (4 steps per epoch)
            workers = _children(proc.pid)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_at = max(steps)
            break
        time.sleep(0.02)
    if killed_at is None:
        proc.kill()
        pytest.fail("the run finished (or hung) before it could be killed mid-run")
    assert workers, "the streamed run has a Grain worker process"
    gone = time.time() + 10                 # the workers notice their parent is gone (they poll each second)
    while time.time() < gone and any(os.path.exists(f"/proc/{pid}") for pid in workers):
        time.sleep(0.1)
    assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")], "Grain workers outlived the killed run"
    resumed = _train(args + ["--workdir", str(workdir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert (ckpts / str(total) / "input" / "process_0-of-1.json").is_file()
    ref_step, ref_params = _final_params(tmp_path / "ref")
    step, params = _final_params(workdir)
    assert ref_step == step == total
    for a, b in zip(ref_params, params):
        np.testing.assert_array_equal(a, b)  # same batches, same rng, same XLA program: bitwise equal
