"""`prune.py … --config.prune.mode=score` end to end: train a tiny model with train.py, score its checkpoint
through the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/fashion_mnist.py", "--config.data.name=synthetic", "--config.train.batch_size=32",
        "--config.train.progress_bar=false", "--config.model.spec.cfg=(8,'M',16)"]


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
                          check=False)


def _score(trained, workdir, *extra):
    return _run("prune.py", *TINY, "--workdir", str(workdir), "--config.prune.mode=score",
                f"--config.prune.pretrained={trained}", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    proc = _run("train.py", *TINY, "--workdir", str(workdir), "--config.train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def test_score_mode_writes_scores_channels_graph_plot_and_a_typed_report(trained, tmp_path):
    from oba_jax.experiment.pipelines import load_report
    proc = _score(trained, tmp_path, "--config.prune.score_batches=3", "--config.prune.score_batch_size=16",
                  "--config.prune.score_parts=true", "--config.prune.score_dtype=float64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "scores_oba"
    assert "oba" in proc.stdout and str(out) in proc.stdout
    scores = np.load(out / "scores.npz")
    assert int(scores["count"]) == 3
    kernels = [k for k in scores.files if k.startswith("sum/") and k.endswith("kernel")]
    assert kernels and all(np.isfinite(scores[k]).all() for k in kernels)
    assert all(scores[k].dtype == np.float64 for k in kernels)
    assert any(np.abs(scores[k]).max() > 0 for k in kernels)
    for part in ("upward", "downward", "parallel"):
        assert any(k.startswith(part + "/") for k in scores.files)
    channels = np.load(out / "channel_scores.npz")
    assert any(k.startswith("in/") for k in channels.files)
    report = load_report(str(tmp_path))
    assert (report.mode, report.method, report.batches, report.dtype) == ("score", "oba", 3, "float64")
    assert report.layers >= 3 and report.output == str(out)
    assert json.loads((tmp_path / "report.json").read_text())["per_leaf_abs_mean"] == report.per_leaf_abs_mean
    assert (out / "graph.dot").read_text().startswith("digraph")
    assert (out / "score_histogram.png").stat().st_size > 1000


def test_score_mode_bad_inputs_are_clear_errors(trained, tmp_path):
    for extra, message in (([], "config.prune.pretrained"),
                           (["--config.prune.score_batches=100000"], "exceeds"),
                           (["--config.prune.importance=magnitude", "--config.prune.score_parts=true"],
                            "prune.score_parts")):
        proc = _score(tmp_path / "missing" if not extra else trained, tmp_path / "w", *extra)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_the_old_score_subcommand_names_its_replacement(capsys):
    import prune
    assert prune.main(["score", "--checkpoint", "x"]) == 2
    assert "--config.prune.mode=score" in capsys.readouterr().err


def test_a_torn_metrics_line_does_not_break_a_rerun(trained, tmp_path):
    """A writer killed mid-line left metrics.jsonl without its last newline: the landed main ended every later
    run of that workdir in a JSONDecodeError traceback, after training."""
    import shutil
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 9')
    proc = _run("train.py", *TINY, "--workdir", str(workdir), "--config.train.epochs=1")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "dropped a torn last line" in proc.stderr
    assert all(json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())
