"""Failure behaviour (README "Failure behaviour"): no silent success on a diverged or corrupt state, one run
per workdir, a prompt exit when a checkpoint cannot be written, and one paragraph with a documented exit
status for every user error of train.py and prune.py."""
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oba_jax.experiment import lock as lock_lib
from oba_jax.experiment.progress import LineProgress
from oba_jax.experiment.training import topk_correct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/fashion_mnist.py", "--config.data.name=synthetic", "--config.model.spec.cfg=(8,'M',16)",
        "--config.data.synthetic.image_shape=(28,28,1)", "--config.data.synthetic.num_train=256",
        "--config.data.synthetic.num_test=64", "--config.train.batch_size=32", "--config.train.eval_batch_size=64"]


def _run(*args, timeout=300):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    return proc, time.perf_counter() - start


def _message(proc):
    """The CLI's own lines on stderr (absl's start-up warnings of a subprocess aside)."""
    return "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("WARNING:absl"))


def test_non_finite_logits_are_wrong():
    logits = jnp.array([[0.0, 1.0, 2.0], [jnp.nan, jnp.nan, jnp.nan], [3.0, jnp.inf, 0.0], [5.0, 1.0, 0.0]])
    labels = jnp.array([2, 0, 0, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels, 1), [1, 0, 0, 1])
    np.testing.assert_array_equal(topk_correct(logits, labels, 5), [1, 0, 0, 1])


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("diverged")
    proc, _ = _run("train.py", *TINY, "--workdir", str(workdir), "--config.train.max_steps=40",
                   "--config.optim.lr=3000", "--config.train.checkpoint_every_steps=4", "--config.train.log_every_steps=4")
    return workdir, proc


def test_a_diverged_run_stops_with_status_6_and_keeps_the_last_good_checkpoint(diverged):
    workdir, proc = diverged
    assert proc.returncode == 6, proc.stderr[-2000:]
    message = _message(proc)
    assert "training diverged: the " in message and "Traceback" not in proc.stderr
    step = int(message.split(" of step ")[1].split()[0] if " of step " in message else
               message.split("after step ")[1].split()[0])
    kept = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert kept and max(kept) < step and f"the last checkpoint (step {max(kept)}) is kept" in message
    from oba_jax.experiment.checkpoint import restore_model
    from flax import nnx
    model, _ = restore_model(str(workdir))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("train_accuracy") == 1.0 and not np.isfinite(r["train_loss"]) for r in records)
    assert "\r" not in proc.stderr                      # progress as lines, not redraws, when not a terminal
    progress = [line for line in proc.stderr.splitlines() if line.startswith(f"train {workdir.name}: ")]
    assert 1 <= len(progress) <= 12, proc.stderr[-2000:]


def test_a_corrupt_newest_checkpoint_falls_back_with_a_warning_naming_both_steps(diverged, tmp_path):
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(diverged[0], workdir)
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    newest = workdir / "checkpoints" / str(steps[-1]) / "model"
    for dirpath, _, files in os.walk(newest):
        for f in files:
            if f not in ("_METADATA", "_sharding", "manifest.ocdbt") and "d" in dirpath.split(os.sep)[-1:]:
                path = os.path.join(dirpath, f)
                with open(path, "r+b") as fh:
                    data = bytearray(fh.read())
                    data[len(data) // 2:len(data) // 2 + 200] = bytes(255 - b for b in data[len(data) // 2:][:200])
                    fh.seek(0)
                    fh.write(data)
    proc, _ = _run("prune.py", *TINY, "--workdir", str(tmp_path / "s"), "--config.prune.mode=score",
                   f"--config.prune.pretrained={workdir}", "--config.prune.importance=magnitude",
                   "--config.prune.score_batches=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warning and f"step {steps[-1]}" in warning[0] and f"step {steps[-2]}" in warning[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_failed_checkpoint_write_exits_promptly(tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a filesystem that supports it)")
    subprocess.run(["chattr", "-i", str(probe)])
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", *TINY, "--workdir", str(workdir), "--config.train.epochs=400",
                             "--config.train.checkpoint_every_steps=40"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        deadline = time.time() + 120
        while not (workdir / "checkpoints" / "40").is_dir() and time.time() < deadline:
            time.sleep(0.2)
        subprocess.run(["chattr", "+i", str(workdir / "checkpoints")], check=True)
        made_unwritable = time.perf_counter()
        _, stderr = proc.communicate(timeout=120)   # the landed main took ~300 s here (an orbax barrier timeout)
        seconds = time.perf_counter() - made_unwritable
    finally:
        subprocess.run(["chattr", "-i", str(workdir / "checkpoints")])
        proc.kill()
    assert proc.returncode == 8, stderr[-2000:]
    assert seconds < 60
    lines = [line for line in stderr.splitlines() if not line.startswith(("WARNING:absl", "train run:"))]
    assert lines and lines[-1].startswith("train.py: file system error:"), lines
    # the first write after the chattr: usually step 80, later if training outran the polling loop
    failed_step = re.search(r"checkpoints/(\d+)", lines[-1])
    assert failed_step and int(failed_step.group(1)) > 40 and int(failed_step.group(1)) % 40 == 0, lines
    assert "Traceback" not in stderr


def test_a_workdir_is_one_runs_and_a_second_run_is_refused_at_once(tmp_path):
    with lock_lib.workdir_lock(str(tmp_path)):
        with lock_lib.workdir_lock(str(tmp_path)):      # re-entrant within a process
            pass
        for args in (["train.py", *TINY, "--workdir", str(tmp_path)], ["prune.py", *TINY, "--workdir", str(tmp_path)],
                     # a prune.pretrained that a running train.py holds (the landed main pruned its newest step)
                     ["prune.py", *TINY, "--workdir", str(tmp_path / "other"), f"--config.prune.pretrained={tmp_path}",
                      "--config.prune.score_batches=2"]):
            proc, seconds = _run(*args)
            assert proc.returncode == 7, proc.stderr[-2000:]
            message = _message(proc)
            assert "workdir in use" in message and f"pid {os.getpid()}" in message and "started" in message
            assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "other" / "dense").exists()
        assert f"config.prune.pretrained {tmp_path} is in use by another run" in message
    # a lock file left by a dead process (no flock held) is taken over
    (tmp_path / lock_lib.LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "start": "then"}))
    with lock_lib.workdir_lock(str(tmp_path)) as path:
        assert json.loads(open(path).read())["pid"] == os.getpid()


def _idx(array):
    array = np.asarray(array, np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes() + array.tobytes()


def _fashion_files(directory, *, test_labels=(1, 2, 3), image_shape=(28, 28)):
    """Four well-formed IDX files (3 images a split) with the given test labels and image dims."""
    directory.mkdir()
    images = _idx(np.zeros((3, *image_shape)))
    for name, payload in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", _idx([0, 1, 2])),
                          ("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", _idx(test_labels))):
        (directory / name).write_bytes(payload)
    return directory


def test_user_errors_are_one_paragraph_with_a_documented_status(tmp_path):
    data_dir = tmp_path / "fm"
    data_dir.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (data_dir / name).write_bytes(b"\x00\x00\x08\x03garbage")
    (tmp_path / "a_file").write_text("x")
    # the landed main: 100.00% test top-1 on labels 200 (no logit beats a label that has none), and an image
    # shape of the right byte count but the wrong dims blamed config.model.spec (status 2)
    bad_labels = _fashion_files(tmp_path / "labels", test_labels=(1, 200, 3))
    bad_dims = _fashion_files(tmp_path / "dims", image_shape=(14, 56))
    cases = [
        (["train.py", "--config", "configs/fashion_mnist.py", "--workdir", str(tmp_path / "w3"),
          f"--config.data.data_dir={bad_labels}"], 3, "1 of 3 labels are outside [0, 10) (values 200)",
         str(bad_labels / "t10k-labels-idx1-ubyte")),
        (["train.py", "--config", "configs/fashion_mnist.py", "--workdir", str(tmp_path / "w4"),
          f"--config.data.data_dir={bad_dims}"], 3, "images of shape (14, 56), not the 28×28",
         str(bad_dims / "train-images-idx3-ubyte")),
        (["train.py", "--config", "configs/fashion_mnist.py", "--workdir", str(tmp_path / "w1"),
          f"--config.data.data_dir={data_dir}"], 3, "dataset file corrupt", str(data_dir)),
        (["train.py", "--config", "configs/fashion_mnist.py", "--workdir", str(tmp_path / "w2"),
          "--config.data.data_dir=/no/such/dir"], 3, "is not a directory", "/no/such/dir"),
        (["train.py", *TINY, "--workdir", str(tmp_path / "a_file")], 8, "file system error", "a_file"),
        (["prune.py", *TINY, "--workdir", "", "--config.prune.mode=score"], 2, "--workdir: empty", ""),
    ]
    for args, status, first, where in cases:
        proc, _ = _run(*args)
        message = _message(proc)
        assert proc.returncode == status, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and len(message.strip().splitlines()) == 1, message
        assert first in message and where in message, message


@pytest.mark.parametrize("free_kb", [20, 150])   # tensorstore's error (a ValueError) at 20 kB, orbax's OSError at 150
def test_a_full_disk_is_status_8_in_one_line_naming_the_path(tmp_path, free_kb):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        (disk / "filler").write_bytes(bytes((1024 - free_kb) * 1024))
        proc, _ = _run("train.py", *TINY, "--workdir", str(disk / "run"), "--config.train.max_steps=16",
                       "--config.train.checkpoint_every_steps=8")
    finally:
        subprocess.run(["umount", str(disk)])
    lines = [line for line in _message(proc).splitlines() if not line.startswith("train run:")]
    assert proc.returncode == 8 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("train.py: file system error: No space left on device ("), lines
    assert str(disk / "run") in lines[0]


def test_tensorstore_write_errors_are_os_errors_naming_the_step():
    from oba_jax.experiment.checkpoint import as_os_error
    inner = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/w/checkpoints/8.orbax-checkpoint-tmp/model.'
                       'orbax-checkpoint-tmp/_sharding": Failed to write 2713 bytes: No space left on device '
                       "[os_error_code='28']")
    try:
        try:
            raise inner
        except ValueError as err:
            raise RuntimeError("Encountered error while writing") from err
    except RuntimeError as outer:
        found = as_os_error(outer)
    assert (found.errno, found.strerror, found.filename) == (28, os.strerror(28), "/w/checkpoints/8")
    assert as_os_error(ValueError("DATA_LOSS: bad bytes")) is None


def test_resume_past_max_steps_reports_the_true_step_and_changed_settings_are_named(tmp_path, capsys):
    from flax import nnx
    from models import build_model
    from oba_jax.experiment import config as config_lib, training
    config = config_lib.default_sections()
    config.model.family = "mlp"
    config.model.spec.image_shape = (8, 8, 1)
    config.model.spec.hidden = (16,)
    config.data.synthetic.update(num_train=128, num_test=64, image_shape=(8, 8, 1))
    config.train.update(batch_size=32, eval_batch_size=64, progress_bar=False, max_steps=8, epochs=4)
    dataset = training.load_dataset_for(config)
    model = build_model(config_lib.model_spec(config), rngs=nnx.Rngs(0))
    training.fit(model, dataset, config, str(tmp_path))
    capsys.readouterr()
    config.train.max_steps = 4
    config.optim.lr = 0.05
    _, metrics = training.fit(model, dataset, config, str(tmp_path))
    err = capsys.readouterr().err
    assert metrics["steps"] == 8
    assert "at step 8, already past the 4 steps" in err and "optim.lr=0.05" in err and "optim.lr=0.1" in err
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["kind"], last["step"]) == ("eval", 8)      # the resumed run's evaluation, under its true step


def test_line_progress_prints_a_line_per_tenth_and_the_end():
    import io
    out = io.StringIO()
    bar = LineProgress(100, "train", "img", lines=10, file=out)
    for _ in range(100):
        bar.update(1)
    bar.set_postfix(loss="0.1")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("train: 100/100 img (100%)") and "\r" not in out.getvalue()


def test_scores_name_the_bad_batch_and_never_return_non_finite_values():
    import nets
    import oba_jax
    p = nets.mlp_params((6, 5, 3))
    x, y = jnp.ones((4, 6)), jnp.zeros(4, int)
    with pytest.raises(FloatingPointError, match="non-finite"):
        oba_jax.score(nets.mlp_apply, jax.tree.map(lambda a: a.at[0].set(jnp.nan), p), None, "magnitude")
    with pytest.raises(ValueError, match="empty batch"):
        oba_jax.score(nets.mlp_apply, p, [(x[:0], y[:0])])
    with pytest.raises(ValueError, match=r"batch 1: inputs of shape \[\(4, 7\)\]"):
        oba_jax.score(nets.mlp_apply, p, [(x, y), (jnp.ones((4, 7)), y)])
    with pytest.raises(ValueError, match="leading axes must agree"):
        oba_jax.score(nets.mlp_apply, p, (jnp.ones((3, 4, 6)), jnp.zeros((2, 4), int)))
