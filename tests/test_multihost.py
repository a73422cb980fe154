"""Multi-host, run: two `prune.py` processes on this machine joined by `jax.distributed` (a localhost
coordinator, one CPU device each, gloo collectives) stream their shards of a dataset from disk and train, score,
prune and fine-tune what one process does,
write each checkpoint, log, plot and the report once, and their checkpoints restore in a single process."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from oba_jax.experiment.checkpoint import restore_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic_mlp.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _prune(workdir, *extra):
    """prune.py on the tiny synthetic MLP: dense training, scores, the schedule, fine-tuning, the report."""
    return [sys.executable, os.path.join(REPO, "prune.py"), "--config", CONFIG, "--workdir", str(workdir),
            "--config.train.progress_bar=false", *extra]


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one CPU device per process
    return dict(env, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")


def _records(workdir):
    keep = ("kind", "step", "train_loss", "train_accuracy", "eval_loss", "eval_top1")
    return [{k: r[k] for k in keep if k in r} for r in map(json.loads, open(workdir / "metrics.jsonl"))]


def _without(report, keys=("latency_dense_ms", "latency_pruned_ms", "checkpoint", "dense_checkpoint")):
    if isinstance(report, dict):
        return {k: _without(v) for k, v in report.items() if k not in keys}
    return [_without(v) for v in report] if isinstance(report, list) else report


def test_two_processes_prune_what_one_does_and_write_once(tmp_path, streamed_fashion):
    """On a streamed dataset (a prepared TFDS one read from disk): each process reads its half of every global
    batch, and saves its own input iterator state with the checkpoint."""
    port = _free_port()
    stream = ["--config.data.name=fashion_mnist", "--config.data.stream=true",
              f"--config.data.data_dir={streamed_fashion[0]}"]
    joined = [*stream, "--config.train.distributed=true", f"--config.train.coordinator_address=localhost:{port}",
              "--config.train.num_processes=2"]
    procs = [subprocess.Popen(_prune(tmp_path / "two", *joined, f"--config.train.process_id={i}"), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
             for i in range(2)]
    single = subprocess.run(_prune(tmp_path / "one", *stream), env=_env(), capture_output=True, text=True,
                            timeout=300, cwd=str(tmp_path))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert single.returncode == 0, single.stderr[-2000:]
    # the same training curves, scores, schedule, accuracies and sizes (the report), written once
    two, one = (json.load(open(tmp_path / d / "report.json")) for d in ("two", "one"))
    assert _without(two) == _without(one)
    for stage in ("dense", "ops_0.5"):
        a, b = _records(tmp_path / "two" / stage), _records(tmp_path / "one" / stage)
        assert [r["kind"] for r in a] == [r["kind"] for r in b]                 # one log, no record twice
        for ra, rb in zip(a, b):
            assert ra.keys() == rb.keys() and all(np.isclose(ra[k], rb[k], rtol=1e-5) for k in ra if k != "kind")
        assert len(os.listdir(tmp_path / "two" / stage / "checkpoints")) == 1
        (step,) = os.listdir(tmp_path / "two" / stage / "checkpoints")
        saved = os.listdir(tmp_path / "two" / stage / "checkpoints" / step / "input")
        assert sorted(f for f in saved if f.startswith("process_")) == ["process_0-of-2.json", "process_1-of-2.json"]
    assert not list((tmp_path / "two").rglob("*.tmp"))
    for stage in ("dense", "ops_0.5"):                                          # restored in this one process
        restored, _ = restore_model(str(tmp_path / "two" / stage))
        reference, _ = restore_model(str(tmp_path / "one" / stage))
        for a, b in zip(jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(reference))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_an_unreachable_coordinator_is_one_message_and_status_2(tmp_path):
    port = _free_port()   # nobody listens there
    out = subprocess.run(_prune(tmp_path / "w", "--config.train.distributed=true",
                                f"--config.train.coordinator_address=localhost:{port}",
                                "--config.train.num_processes=2", "--config.train.process_id=1",
                                "--config.train.initialization_timeout_s=1"),
                         env=_env(), capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"could not join the run at localhost:{port}" in out.stderr and "Traceback" not in out.stderr


_SCORE = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
import oba_jax
from nets import mlp_apply, mlp_params
rng = np.random.default_rng(0)
x, y = rng.normal(size=(2, 8, 6)).astype(np.float32), rng.integers(0, 3, (2, 8))
result = oba_jax.score(mlp_apply, mlp_params((6, 5, 4, 3)), (x, y))   # each batch sharded over both processes
if jax.process_index() == 0:
    json.dump({p: np.asarray(v).tolist() for p, v in result.by_path().items()}, open(sys.argv[3], "w"))
"""


def test_scores_of_two_processes_equal_one_process_on_the_same_global_batches(tmp_path):
    import oba_jax
    from nets import mlp_apply, mlp_params
    address = f"localhost:{_free_port()}"
    env = dict(_env(), PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    procs = [subprocess.Popen([sys.executable, "-c", _SCORE, address, str(i), str(tmp_path / "scores.json")],
                              env=env, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path)) for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(2, 8, 6)).astype(np.float32), rng.integers(0, 3, (2, 8))
    expected = oba_jax.score(mlp_apply, mlp_params((6, 5, 4, 3)), (x, y)).by_path()
    got = json.load(open(tmp_path / "scores.json"))
    assert set(got) == set(expected)
    for path, value in expected.items():
        np.testing.assert_allclose(got[path], value, rtol=1e-5, atol=1e-7, err_msg=path)


def test_a_bad_initialization_timeout_is_a_config_error():
    import pytest
    from oba_jax.experiment import config as config_lib
    config = config_lib.default_sections()
    config.train.update(distributed=True, initialization_timeout_s=0)
    with pytest.raises(config_lib.ConfigError, match="train.initialization_timeout_s: must be a positive int"):
        config_lib.initialize_distributed(config)
