"""`prune.py --config ... --workdir ...` end to end on synthetic data: dense training, the schedule to the
target ops ratio, shrinking, fine-tuning, the report, the plots, restorable checkpoints, clear errors."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A wide second conv: each of its channels costs < 0.8% of the MACs, so a plan in the window [target - 0.01,
# target] always exists. With (16,'M',32) one channel was 2-6%, and whether the window existed among the nested
# plans depended on the trained weights, i.e. on the CPU's rounding (it did not on an AVX2-only AMD EPYC).
SMALL = ["--config.data.name=synthetic", "--config.data.synthetic.num_train=256", "--config.data.synthetic.num_test=64",
         "--config.train.epochs=1", "--config.train.batch_size=32", "--config.train.eval_batch_size=64",
         "--config.train.progress_bar=false", "--config.model.spec.cfg=(8,'M',128)",
         "--config.prune.score_batches=2", "--config.prune.score_batch_size=16", "--config.finetune.max_steps=4",
         "--config.prune.latency_repeats=3"]
KEYS = {"target_ops_ratio", "ops_ratio", "params_ratio", "macs_dense", "macs_pruned", "acc_dense", "acc_pruned",
        "acc_finetuned", "widths_before", "widths_after", "latency_dense_ms", "latency_pruned_ms", "history"}


def _prune(workdir, *extra):
    return subprocess.run([sys.executable, "prune.py", "--config", "configs/fashion_mnist.py", "--workdir", str(workdir),
                           *SMALL, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.fixture(scope="module")
def oneshot(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("oneshot")
    proc = _prune(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_oneshot_reaches_the_target_and_writes_the_report(oneshot):
    workdir, proc = oneshot
    report = json.loads((workdir / "report.json").read_text())
    (t,) = report["targets"]
    assert KEYS <= set(t) and t["target_ops_ratio"] == 0.5
    assert 0.49 <= t["ops_ratio"] <= 0.5 and t["params_ratio"] < 1 and t["macs_pruned"] < t["macs_dense"]
    assert t["history"][-1]["refined"] and len(t["history"]) < 50
    assert all(t["widths_after"][k] <= v for k, v in t["widths_before"].items())
    assert any(t["widths_after"][k] < v for k, v in t["widths_before"].items())
    assert (workdir / "widths.png").stat().st_size > 1000 and (workdir / "accuracy_vs_ops.png").stat().st_size > 1000
    assert "target ops ratio 0.5" in proc.stdout and "MACs / image" in proc.stdout
    assert (workdir / "dense" / "checkpoints").is_dir()


def test_the_pruned_checkpoint_restores_in_a_fresh_process(oneshot):
    workdir, _ = oneshot
    t = json.loads((workdir / "report.json").read_text())["targets"][0]
    script = ("import sys, json; from oba_jax.experiment.checkpoint import restore_model; import models; "
              "m, meta = restore_model(sys.argv[1]); print(json.dumps(models.spec_to_dict(m.spec)))")
    out = subprocess.run([sys.executable, "-c", script, t["checkpoint"]], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == t["spec"]
    assert [w for w in t["spec"]["cfg"] if w != "M"] == list(t["widths_after"].values())


def test_iterative_continues_from_each_fine_tuned_model(tmp_path, oneshot):
    dense_run = oneshot[0] / "dense"
    proc = _prune(tmp_path, "--config.prune.mode=iterative", "--config.prune.ops_ratios=(0.7, 0.4)",
                  f"--config.prune.pretrained={dense_run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    first, second = report["targets"]
    assert (first["target_ops_ratio"], second["target_ops_ratio"]) == (0.7, 0.4)
    assert 0.69 <= first["ops_ratio"] <= 0.7 and 0.39 <= second["ops_ratio"] <= 0.4
    assert all(second["widths_before"][k] == first["widths_after"][k] for k in first["widths_after"])
    assert not (tmp_path / "dense").exists()
    # a rerun reuses both stages: the second starts from the first's fine-tuned model, restored from its
    # checkpoint, whose digest must equal that of the model the first run fine-tuned in memory
    again = _prune(tmp_path, "--config.prune.mode=iterative", "--config.prune.ops_ratios=(0.7, 0.4)",
                   f"--config.prune.pretrained={dense_run}")
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((tmp_path / "report.json").read_text())["targets"]
    assert [t["acc_finetuned"] for t in rerun] == [first["acc_finetuned"], second["acc_finetuned"]]


@pytest.mark.parametrize("extra,status,message", [
    (["--config.prune.ops_ratios=(1.0,)"], 2, "prune.ops_ratios"),
    (["--config.prune.ops_ratios=(0.0,)"], 2, "prune.ops_ratios"),
    (["--config.prune.importance=obd"], 2, "unknown method 'obd'"),
    (["--config.prune.kinds=('neurons',)"], 2, "prune.kinds"),
    (["--config.prune.ignored_layers=('layers/0/conv', 'layers/1/conv')"], 2, "nothing to prune"),
    (["--config.prune.mode=iterative", "--config.prune.ops_ratios=(0.3, 0.6)"], 2, "decreasing"),
    (["--config.prune.mode=unstructured", "--config.prune.keep_ratio=0"], 2, "prune.keep_ratio"),
    (["--config.prune.ignored_layers=('layers/0/cnv',)"], 2, "['layers/0/cnv'] match no layer or group"),
    (["--config.prune.pretrained=/no/such"], 2, "config.prune.pretrained: '/no/such' is not a directory"),
    (["--config.prune.mode=unstructured", "--config.prune.n_m_exclude=()"], 2, "not a multiple of 4"),
    (["--config.prune.mode=unstructured", "--config.prune.exclude=('fc/kernl',)"], 2, "['fc/kernl'] match no parameter"),
    (["--config.prune.mode=unstructured", "--config.prune.exclude=('layers', 'fc')"], 2, "excludes every layer"),
])
def test_bad_configs_are_clear_errors_before_any_training(tmp_path, extra, status, message):
    proc = _prune(tmp_path, *extra)   # no prune.pretrained: a check made after the dense model would train it first
    assert proc.returncode == status, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "report.json").exists() and not (tmp_path / "dense").exists()


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, oneshot):
    proc = _prune(tmp_path, f"--config.prune.pretrained={oneshot[0] / 'dense'}", "--config.model.spec.cfg=(8,'M',16)")
    assert proc.returncode == 4 and "describes" in proc.stderr and "Traceback" not in proc.stderr


def test_unstructured_mode_masks_reports_plots_and_a_checkpoint_with_the_masks(tmp_path, oneshot):
    proc = _prune(tmp_path, f"--config.prune.pretrained={oneshot[0] / 'dense'}", "--config.prune.mode=unstructured",
                  "--config.prune.unstructured_steps=3", "--config.prune.report_keep_ratios=(0.9, 0.5, 0.1)",
                  "--config.prune.compare=('magnitude',)", "--config.finetune.max_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["mode"] == "unstructured" and report["methods"] == ["oba", "magnitude"]
    assert report["mask_forms"] == {"oba": "oba", "magnitude": "global"}     # each method in its standard form
    for method, r in report["results"].items():
        assert [pt["target_keep_ratio"] for pt in r["points"]] == [0.9, 0.5, 0.1]
        for pt in r["points"]:
            assert abs(pt["keep_ratio"] - pt["target_keep_ratio"]) < 1e-3 and 0 <= pt["acc"] <= 1
        assert len(r["history"]) == 3 and r["final"]["finetune_steps"] == 2
        assert r["n_m"]["pattern"] == "2:4" and r["n_m"]["layers"]["layers/1/conv/kernel"] == 0.5
        assert r["n_m"]["layers"]["layers/0/conv/kernel"] == 0.0    # n_m_exclude: one input channel
        assert set(r["final"]["layers"]) == set(report["scored_leaves"])
    assert (tmp_path / "accuracy_vs_keep.png").stat().st_size > 1000
    assert (tmp_path / "layer_sparsity.png").stat().st_size > 1000
    assert "2:4 one-shot" in proc.stdout and "magnitude" in proc.stdout
    # the fine-tuned checkpoint restores in a fresh process with its masks; pruned weights are exactly zero
    script = ("import sys, json, jax, numpy as np; from flax import nnx\n"
              "from oba_jax.experiment.checkpoint import restore_masks, restore_model\n"
              "m, _ = restore_model(sys.argv[1]); masks, step = restore_masks(sys.argv[1])\n"
              "p = jax.tree.leaves(nnx.state(m, nnx.Param)); k = jax.tree.leaves(masks)\n"
              "print(json.dumps([step, sum(int((np.asarray(a)[~np.asarray(b)] != 0).sum()) for a, b in zip(p, k)),"
              " sum(int((~np.asarray(b)).sum()) for b in k)]))")
    oba = report["results"]["oba"]
    assert oba["n_m"]["finetune_steps"] == 2 and oba["n_m"]["checkpoint"] != oba["final"]["checkpoint"]
    for record, kept in ((oba["final"], round(0.1 * oba["final"]["size"])), (oba["n_m"], oba["n_m"]["kept"])):
        out = subprocess.run([sys.executable, "-c", script, record["checkpoint"]], cwd=ROOT,
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        step, nonzero_pruned, pruned = json.loads(out.stdout.strip().splitlines()[-1])
        assert step == 2 and nonzero_pruned == 0
        assert pruned == record["size"] - record["kept"] and record["kept"] == kept
    assert "2:4 fine-tuned" in proc.stdout


def test_the_model_outline_has_the_built_models_shapes_and_no_values():
    import jax
    from flax import nnx
    from models import build_model
    from oba_jax.experiment import config as config_lib, runs
    config = config_lib.default_sections()
    config.model.family = "mlp"
    config.model.spec.image_shape = (8, 8, 1)
    config.model.spec.hidden = (16,)
    outline = nnx.state(runs.model_outline(config), nnx.Param)
    built = nnx.state(build_model(config_lib.model_spec(config), rngs=nnx.Rngs(0)), nnx.Param)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(outline))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), outline) == jax.tree.map(lambda a: (a.shape, a.dtype), built)


def _one_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.startswith("prune.py:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_a_rerun_reuses_its_stages_and_refuses_those_of_other_inputs(oneshot):
    """The landed main reused WORKDIR/ops_0.5 whatever produced it: a rerun with importance=magnitude reported
    the OBA-pruned model as magnitude's, with status 0."""
    workdir, _ = oneshot
    report = (workdir / "report.json").read_text()
    proc = _prune(workdir, "--config.prune.importance=magnitude")
    assert proc.returncode == 2
    message = _one_line(proc)
    assert f"{workdir / 'ops_0.5'} holds a stage of other inputs" in message
    assert 'prune.importance ("oba" → "magnitude")' in message and "--config.overwrite=true" in message
    assert (workdir / "report.json").read_text() == report        # nothing was written
    proc = _prune(workdir, f"--config.prune.pretrained={workdir / 'dense'}")   # the same model by another road
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train ops_0.5" not in proc.stderr                      # reused: nothing fine-tuned again
    assert json.loads((workdir / "report.json").read_text())["targets"][0]["acc_finetuned"] == \
        json.loads(report)["targets"][0]["acc_finetuned"]


def test_another_pretrained_model_is_refused_naming_both(tmp_path, oneshot):
    """Pretrained A, then B of the same architecture in the same workdir: the landed main mixed B's dense
    accuracy with A's fine-tuned one, status 0."""
    import shutil
    other = tmp_path / "other_dense"
    shutil.copytree(oneshot[0] / "dense", other)
    trained = subprocess.run([sys.executable, "train.py", "--config", "configs/fashion_mnist.py", "--workdir", str(other),
                              *SMALL[:8], "--config.train.epochs=2"], cwd=ROOT, capture_output=True, text=True,
                             timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))   # 8 more steps: another model
    assert trained.returncode == 0, trained.stderr[-3000:]
    proc = _prune(oneshot[0], f"--config.prune.pretrained={other}")
    assert proc.returncode == 2
    message = _one_line(proc)
    assert f"dense_model (the directory's came from {oneshot[0] / 'dense'}, this run's from {other})" in message


def test_a_round_to_that_cannot_be_met_is_blamed_on_round_to(tmp_path, oneshot):
    proc = _prune(tmp_path, f"--config.prune.pretrained={oneshot[0] / 'dense'}", "--config.prune.round_to=4096")
    assert proc.returncode == 2
    message = _one_line(proc)
    assert "config.prune.round_to (4096)" in message and "lower prune.round_to" in message
