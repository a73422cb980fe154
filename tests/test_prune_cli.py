"""`prune.py score` end to end: train a tiny model with train.py, score its checkpoint through the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, check=True):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=400, check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    proc = _run("train.py", "--config", "configs/fashion_mnist.py", "--workdir", str(workdir),
                "--config.data.name=synthetic", "--config.train.epochs=1", "--config.train.batch_size=32",
                "--config.train.progress_bar=false", "--config.model.spec.cfg=(8,'M',16)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_score_cli_writes_scores_channels_graph_and_plot(trained, tmp_path):
    out = tmp_path / "scores"
    proc = _run("prune.py", "score", "--checkpoint", str(trained), "--num-batches", "3", "--batch-size", "16",
                "--parts", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "oba" in proc.stdout and str(out) in proc.stdout
    scores = np.load(out / "scores.npz")
    assert int(scores["count"]) == 3
    kernels = [k for k in scores.files if k.startswith("sum/") and k.endswith("kernel")]
    assert kernels and all(np.isfinite(scores[k]).all() for k in kernels)
    assert any(np.abs(scores[k]).max() > 0 for k in kernels)
    for part in ("upward", "downward", "parallel"):
        assert any(k.startswith(part + "/") for k in scores.files)
    channels = np.load(out / "channel_scores.npz")
    assert any(k.startswith("in/") for k in channels.files)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batches"] == 3 and summary["layers"] >= 3
    assert (out / "graph.dot").read_text().startswith("digraph")
    assert (out / "score_histogram.png").stat().st_size > 1000


def test_score_cli_bad_checkpoint_is_a_clear_error(tmp_path):
    proc = _run("prune.py", "score", "--checkpoint", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "cannot restore a model" in proc.stderr and "Traceback" not in proc.stderr


def test_score_cli_too_many_batches(trained, tmp_path):
    proc = _run("prune.py", "score", "--checkpoint", str(trained), "--num-batches", "100000", "--out", str(tmp_path))
    assert proc.returncode == 2 and "exceeds" in proc.stderr and "Traceback" not in proc.stderr
