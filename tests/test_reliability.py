"""Issue 17: no silent reuse of stale stages (manifests), labels checked, config files and values that used
to pass or crash, out of memory, signals, and the pipeline registry. The CLI cases run `train.main` /
`prune.main` in this process (the same `run_cli` a subprocess runs, without paying for an interpreter and a
JAX import per case); tests/test_failures.py and tests/test_prune_pipeline.py run the subprocess ones."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

import prune
import train
from oba_jax.experiment import cli, manifest, pipelines
from oba_jax.experiment import config as config_lib
from oba_jax.experiment.training import MetricsLog, read_metrics, topk_correct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MLP_CONFIG = open(os.path.join(ROOT, "configs", "synthetic_mlp.py")).read()   # a tiny model in seconds


@pytest.fixture
def config_file(tmp_path):
    def write(text=MLP_CONFIG, name="c.py"):
        path = tmp_path / name
        path.write_text(text)
        return str(path)
    return write


def _cli(main, argv, capsys):
    status = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("WARNING:absl")]
    return status, lines


# ----------------------------------------------------------------------------- config files and values (items 5, 6, 8)


@pytest.mark.parametrize("body, fragment", [
    ("def get_config():\n    raise RuntimeError('no such cluster')\n", "get_config() in"),
    ("def get_config(size):\n    return None\n", "requires the arguments ['size']"),
    ("import sys\nsys.exit(0)\n", "called sys.exit(0) while being imported"),
    ("from oba_jax.experiment.config import default_sections\n"
     "def get_config():\n    c = default_sections()\n    del c['prune']\n    return c\n", "config.prune: missing"),
])
def test_broken_config_files_are_status_2_in_one_paragraph(config_file, tmp_path, capsys, body, fragment):
    status, lines = _cli(prune.main, ["--config", config_file(body), "--workdir", str(tmp_path / "w")], capsys)
    assert status == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override, fragment", [
    ("--config.finetune.epochs=inf", "config.finetune.epochs"),
    ("--config.optim.lr=inf", "config.optim.lr"),
    ("--config.finetune.lr=nan", "config.finetune.lr"),
    ("--config.train.epochs=0.0001", "config.train.epochs: 0.0001 epochs of 4 steps"),
    ("--config.finetune.epochs=0.0001", "config.finetune.epochs"),
    ("--config.data.synthetic.num_train=8", "config.data.synthetic.num_train"),
    ("--config.data.synthetic.num_train=0", "config.data.synthetic.num_train"),
    ("--config.data.synthetic.num_test=0", "config.data.synthetic.num_test"),
    ("--config.data.synthetic.num_trian=64", "config.data.synthetic.num_trian: unknown key"),
    ("--config.prune.ops_ratios=(0.5, 0.5)", "config.prune.ops_ratios"),
    ("--config.prune.ops_ratios=(0.5, 0.4999999)", "config.prune.ops_ratios"),
    ("--config.overwrite=maybe", "--config.overwrite"),
])
def test_bad_values_are_status_2_before_anything_runs(config_file, tmp_path, capsys, override, fragment):
    status, lines = _cli(prune.main, ["--config", config_file(), "--workdir", str(tmp_path / "w"), override], capsys)
    assert status == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "w" / "dense").exists()


def test_a_config_file_need_not_end_in_py(config_file):
    config = config_lib.load_config_file(config_file(name="experiment.cfg"))   # spec_from_file_location: None
    assert config.model.family == "mlp"


def test_compare_only_matters_in_unstructured_mode_and_runs_each_method_once():
    config = config_lib.load_config(os.path.join(ROOT, "configs", "fashion_mnist.py"),
                                    [("prune.importance", "magnitude")], num_devices=1)
    assert config.prune.compare == ("taylor", "magnitude")      # the shipped config: valid for a structured run
    assert config_lib.unstructured_methods(config.prune) == ("magnitude", "taylor")


# ----------------------------------------------------------------------------- manifests (item 1)


def _manifest(**inputs):
    return manifest.Manifest("structured", {"prune.importance": "oba", "dense_model": "aaa", **inputs},
                             {"dense_model": "/runs/A"})


def test_a_stage_is_reused_only_with_the_same_inputs(tmp_path, capsys):
    stage = str(tmp_path / "ops_0.5")
    assert manifest.claim_stage(stage, _manifest(), overwrite=False) is False      # new: claimed
    (tmp_path / "ops_0.5" / "checkpoints").mkdir()
    assert manifest.claim_stage(stage, _manifest(), overwrite=False) is True       # same inputs: reuse
    other = manifest.Manifest("structured", {"prune.importance": "random", "dense_model": "bbb"},
                              {"dense_model": "/runs/B"})
    with pytest.raises(config_lib.ConfigError) as err:
        manifest.claim_stage(stage, other, overwrite=False)
    message = str(err.value)
    assert stage in message and 'prune.importance ("oba" → "random")' in message
    assert "dense_model (the directory's came from /runs/A, this run's from /runs/B)" in message
    assert "--config.overwrite=true" in message and (tmp_path / "ops_0.5" / "checkpoints").is_dir()
    assert manifest.claim_stage(stage, other, overwrite=True) is False              # deleted, claimed afresh
    assert not (tmp_path / "ops_0.5" / "checkpoints").exists() and "deleting" in capsys.readouterr().err
    stored = json.loads((tmp_path / "ops_0.5" / manifest.MANIFEST_FILE).read_text())
    assert stored["inputs"]["prune.importance"] == "random"


def test_a_manifest_older_than_an_input_matches_that_inputs_old_value(tmp_path):
    """`train.compute_dtype` became an input later: a stage written before it was float32, and stays reusable."""
    stage = str(tmp_path / "ops_0.5")
    assert manifest.claim_stage(stage, _manifest(), overwrite=False) is False      # (no compute_dtype key)
    assert manifest.claim_stage(stage, _manifest(**{"train.compute_dtype": "float32"}), overwrite=False) is True
    with pytest.raises(config_lib.ConfigError, match=r'train.compute_dtype \("float32" → "bfloat16"\)'):
        manifest.claim_stage(stage, _manifest(**{"train.compute_dtype": "bfloat16"}), overwrite=False)


def test_a_stage_without_a_manifest_is_not_reused(tmp_path):
    (tmp_path / "ops_0.5" / "checkpoints").mkdir(parents=True)     # what the landed main left
    with pytest.raises(config_lib.ConfigError, match="no manifest.json"):
        manifest.claim_stage(str(tmp_path / "ops_0.5"), _manifest(), overwrite=False)


def test_stage_inputs_are_the_keys_that_determine_the_result():
    config = config_lib.default_sections()
    inputs = manifest.config_inputs(config, "structured")
    assert "prune.importance" in inputs and "finetune.lr" in inputs and "model.family" in inputs
    for cosmetic in ("train.log_every_steps", "prune.latency_repeats", "data.data_dir", "plot.enabled",
                     "prune.keep_ratio", "train.epochs"):
        assert cosmetic not in inputs
    assert "prune.keep_ratio" in manifest.config_inputs(config, "unstructured")
    assert "train.epochs" in manifest.config_inputs(config, "dense")
    a = {"w": np.arange(6.0).reshape(2, 3)}
    assert manifest.model_digest(a) == manifest.model_digest({"w": np.arange(6.0).reshape(2, 3)})
    assert manifest.model_digest(a) != manifest.model_digest({"w": np.arange(6.0).reshape(3, 2)})
    assert manifest.model_digest(a) != manifest.model_digest({"w": a["w"] + 1e-12})


# ----------------------------------------------------------------------------- labels (item 2), metrics log (item 4)


def test_an_out_of_range_label_is_never_correct():
    logits = jnp.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0], [5.0, 0.0, 0.0]])
    labels = jnp.array([200, -1, 0])
    np.testing.assert_array_equal(topk_correct(logits, labels, 1), [0, 0, 1])
    np.testing.assert_array_equal(topk_correct(logits, labels, 5), [0, 0, 1])


def test_a_torn_metrics_line_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "train_loss": 2.0}\n{"kind": "eval", "st')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1]
    assert "skipped 1 line(s)" in capsys.readouterr().err
    log = MetricsLog(str(tmp_path))               # a resumed run cuts the torn tail before appending
    assert "dropped a torn last line" in capsys.readouterr().err
    log.write({"kind": "train", "step": 2, "train_loss": 1.0})
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- out of memory, signals (items 7, 8)


def test_out_of_memory_is_status_9_naming_the_batch_sizes(config_file, tmp_path, capsys):
    # a real XLA allocation failure: a hidden layer of 2**36 units cannot be initialised
    status, lines = _cli(train.main, ["--config", config_file(), "--workdir", str(tmp_path / "w"),
                                      "--config.model.spec.hidden=(68719476736,)"], capsys)
    assert status == cli.OUT_OF_MEMORY == 9 and len(lines) == 1, lines
    assert lines[0].startswith("train.py: out of memory: RESOURCE_EXHAUSTED") and "train.batch_size=16" in lines[0]


def test_an_interrupted_score_run_does_not_promise_a_resume(capsys):
    def body(session):
        session.resumable = False
        raise KeyboardInterrupt
    assert cli.run_cli("prune.py", body) == cli.INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted" in err and "resume" not in err


def test_a_cli_called_from_other_code_never_ends_the_process(capsys):
    """`run_cli` leaves with os._exit when non-daemon threads (orbax's, after a failed write) would hold the
    process: right for the CLI's own process, fatal for a test runner or notebook that calls main() (it ended
    this suite's worker whenever some library had a non-daemon thread alive)."""
    import threading
    release = threading.Event()
    holder = threading.Thread(target=release.wait, daemon=False)
    holder.start()
    try:
        def body(session):
            raise config_lib.ConfigError("config.x: bad")
        previous = signal.getsignal(signal.SIGINT)
        assert cli.run_cli("prune.py", body) == 2
        assert signal.getsignal(signal.SIGINT) is previous      # handlers are the program's business
    finally:
        release.set()
        holder.join()
    assert "config.x: bad" in capsys.readouterr().err


def _wait_for_a_checkpoint(workdir, proc, seconds=120):
    """Until a step directory exists (checkpoints rotate: a given step may come and go between two looks)."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(workdir / "checkpoints") and any(d.isdigit() for d in os.listdir(workdir / "checkpoints")):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint in {workdir} after {seconds} s")


def test_sigterm_and_a_second_sigint_during_the_shutdown_end_cleanly(config_file, tmp_path):
    """SIGTERM: status 143, one message, the lock released. SIGINT twice: the second arrives while the first
    unwinds (the checkpoint manager closing) and must not turn into a traceback."""
    from oba_jax.experiment import lock as lock_lib
    cfg = config_file()
    procs = {}
    for name in ("term", "int"):
        workdir = tmp_path / name
        procs[name] = (workdir, subprocess.Popen(
            [sys.executable, "train.py", "--config", cfg, "--workdir", str(workdir), "--config.train.epochs=100000",
             "--config.train.checkpoint_every_steps=20"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=ROOT, **{cli.SHUTDOWN_GRACE_ENV: "20"})))
    results = {}
    try:
        for name, (workdir, proc) in procs.items():
            _wait_for_a_checkpoint(workdir, proc)
            if name == "term":
                proc.send_signal(signal.SIGTERM)
            else:
                proc.send_signal(signal.SIGINT)
                time.sleep(0.05)
                proc.send_signal(signal.SIGINT)
        for name, (workdir, proc) in procs.items():
            results[name] = (proc.wait(timeout=120), proc.stderr.read())
    finally:
        for _, proc in procs.values():
            proc.kill()
    for name, status, what in (("term", cli.TERMINATED, "terminated (SIGTERM)"), ("int", cli.INTERRUPTED, "interrupted")):
        code, stderr = results[name]
        lines = [line for line in stderr.splitlines() if line.startswith("train.py:")]
        assert code == status and "Traceback" not in stderr, stderr[-2000:]
        assert len(lines) == 1 and what in lines[0] and "re-run the same command to resume" in lines[0], lines
        with lock_lib.workdir_lock(str(procs[name][0])):     # released
            pass


STUCK_SHUTDOWN = """
import signal, sys, time
from oba_jax.experiment import cli
signal.signal(signal.SIGUSR1, lambda *_: None)   # a library's own handled signal: not a stop
def body(session):
    print("ready", flush=True)
    try:
        time.sleep(1000)
    finally:
        time.sleep(1000)                        # a cleanup that never ends
sys.exit(cli.run_cli("stuck.py", body, owns_process=True))
"""


def test_a_shutdown_that_hangs_is_ended_after_the_grace_period(tmp_path):
    """The first SIGTERM starts the clock (not another handled signal); a cleanup still running after
    $OBA_JAX_SHUTDOWN_GRACE_S ends with the signal's status and the one interruption message."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_SHUTDOWN)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=ROOT, **{cli.SHUTDOWN_GRACE_ENV: "1"}))
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1.5)
        assert proc.poll() is None, proc.stderr.read()
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        code, stderr = proc.wait(timeout=60), proc.stderr.read()
    finally:
        proc.kill()
    lines = [line for line in stderr.splitlines() if line.startswith("stuck.py:")]
    assert code == cli.TERMINATED and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and "terminated (SIGTERM)" in lines[0] and "within 1 s" in lines[0], lines
    assert 0.9 < time.time() - start < 30


def test_a_signal_that_lands_in_a_gc_callback_or_a_finaliser_is_not_raised_there():
    """Raised there, the interrupt is printed as 'Exception ignored' and dropped, and the run goes on (seen
    in a fresh-clone run: a SIGTERM inside jax's _xla_gc_callback). The handler recognises those frames and
    leaves the run to the shutdown watch."""
    import gc
    seen = []

    def callback(phase, info):
        if phase == "start" and not seen:
            seen.append(sys._getframe())

    class Finalised:
        def __del__(self):
            seen.append(sys._getframe())

    gc.callbacks.append(callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(callback)
    assert seen and cli._raise_is_swallowed(seen[0]) is False   # no longer registered
    gc.callbacks.append(callback)
    try:
        assert cli._raise_is_swallowed(seen[0])
    finally:
        gc.callbacks.remove(callback)
    Finalised()
    assert len(seen) == 2 and cli._raise_is_swallowed(seen[1])
    assert not cli._raise_is_swallowed(sys._getframe())


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf", "nan"])
def test_a_bad_shutdown_grace_is_a_config_error(monkeypatch, value):
    monkeypatch.setenv(cli.SHUTDOWN_GRACE_ENV, value)
    with pytest.raises(config_lib.ConfigError, match=cli.SHUTDOWN_GRACE_ENV):
        cli.shutdown_grace_s()
    monkeypatch.setenv(cli.SHUTDOWN_GRACE_ENV, "2.5")
    assert cli.shutdown_grace_s() == 2.5


# ----------------------------------------------------------------------------- the structure


def test_the_registry_has_one_pipeline_per_mode():
    assert tuple(pipelines.PIPELINES) == ("oneshot", "iterative", "unstructured", "score")
    for mode, p in pipelines.PIPELINES.items():
        assert p.mode == mode and callable(p.run) and callable(p.table) and callable(p.plot)
    assert not pipelines.pipeline("score").resumable and pipelines.pipeline("oneshot").resumable
    with pytest.raises(config_lib.ConfigError, match="config.prune.mode"):
        pipelines.pipeline("nope")


def test_no_library_module_exits_the_interpreter():
    """(A module's `if __name__ == "__main__":` block is a program, `python -m …`: it may exit.)"""
    import ast
    offenders = []
    for folder, _, files in os.walk(os.path.join(ROOT, "oba_jax")):
        for name in (f for f in files if f.endswith(".py")):
            tree = ast.parse(open(os.path.join(folder, name)).read())
            library = [node for node in tree.body if not (isinstance(node, ast.If)
                                                           and ast.unparse(node.test) == "__name__ == '__main__'")]
            offenders += [f"{name}:{node.lineno}" for top in library for node in ast.walk(top)
                          if isinstance(node, ast.Call) and ast.unparse(node.func) in ("sys.exit", "exit", "quit")]
    assert not offenders


def test_reading_a_checkpoint_leaves_the_interpreters_hooks_alone(tmp_path):
    from flax import nnx
    from models import build_model, make_spec
    from oba_jax.experiment import checkpoint as ckpt_lib, training
    spec = make_spec("mlp", image_shape=(4, 4, 1), hidden=(4,), num_classes=3)
    model = build_model(spec, rngs=nnx.Rngs(0))
    parts, params, stats = training.split_model(model)
    manager = ckpt_lib.make_manager(str(tmp_path))
    state = training.TrainState(jnp.zeros((), jnp.int32), params, stats, ())
    ckpt_lib.save_state(manager, 1, state, spec=spec)
    manager.wait_until_finished()
    manager.close()
    hook = sys.unraisablehook
    filters = {name: list(logging.getLogger(name).filters) for name in ("asyncio", "concurrent.futures")}
    ckpt_lib.restore_model(str(tmp_path))
    assert sys.unraisablehook is hook
    assert filters == {name: list(logging.getLogger(name).filters) for name in filters}


def test_an_interrupt_inside_a_checkpoint_save_stays_an_interrupt(tmp_path, monkeypatch):
    """A signal landing inside orbax's save, before its writer thread starts, made the manager's close raise
    "cannot join thread before it is started", which replaced the KeyboardInterrupt with a traceback (seen once
    in a fresh-clone CI run of the SIGTERM test)."""
    from flax import nnx
    from models import build_model
    from oba_jax.experiment import checkpoint as ckpt_lib, training
    config = config_lib.load_config(os.path.join(ROOT, "configs", "synthetic_mlp.py"),
                                    [("train.checkpoint_every_steps", "2")], num_devices=1)
    make_manager = ckpt_lib.make_manager

    def broken_manager(workdir):
        manager = make_manager(workdir)
        real_close = manager.close

        def close():
            real_close()
            raise RuntimeError("cannot join thread before it is started")
        manager.close = close
        return manager

    def interrupted_save(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ckpt_lib, "make_manager", broken_manager)
    monkeypatch.setattr(ckpt_lib, "save_state", interrupted_save)
    model = build_model(config_lib.model_spec(config), rngs=nnx.Rngs(0))
    with pytest.raises(KeyboardInterrupt):
        training.fit(model, training.load_dataset_for(config), config, str(tmp_path))
