"""`bench/fidelity.py` and `bench/compare.py` run end to end on a tiny trained model and write their tables
(smoke tests: the numbers are not asserted, only that each table has a row per method)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

MLP = os.path.join(ROOT, "configs", "synthetic_mlp.py")


@pytest.fixture(scope="module")
def trained_mlp(tmp_path_factory):
    from oba_jax.experiment import config as config_lib
    from oba_jax.experiment import training
    workdir = str(tmp_path_factory.mktemp("mlp") / "dense")
    training.train_and_evaluate(config_lib.load_config(MLP), workdir)
    return workdir


def test_fidelity_writes_channel_set_and_weight_tables(trained_mlp, tmp_path):
    import fidelity
    out = str(tmp_path / "fid")
    report = fidelity.main(["--config", MLP, "--pretrained", trained_mlp, "--out", out, "--held-out", "32",
                            "--channels", "8", "--weights", "6", "--sets", "4", "--set-size", "3",
                            "--random-seeds", "2"])
    assert report["channels"] == 8 and len(report["channel_truth"]) == 8
    rows = {"oba", "oba (eval BN)", "oba + first order", "fastoba", "taylor", "taylor (eval BN)", "magnitude", "random"}
    assert set(report["channels_by_method"]) == rows and set(report["sets"]) == rows
    assert set(report["weights"]["methods"]) == rows | {"−θ·g, eval BN (signed)"}
    text = open(os.path.join(out, "fidelity.md")).read()
    assert "| oba (eval BN) |" in text and "pooled ρ (max)" in text
    assert json.load(open(os.path.join(out, "fidelity.json")))["held_out"] == 32
    assert os.path.getsize(os.path.join(out, "channels.png")) > 0 and os.path.getsize(os.path.join(out, "weights.png")) > 0
    import jax
    assert not jax.config.jax_enable_x64   # the float64 part does not leak into the process


def test_compare_runs_every_method_through_both_pipelines(trained_mlp, tmp_path):
    import compare
    out = str(tmp_path / "cmp")
    argv = ["--config", MLP, "--pretrained", trained_mlp, "--out", out, "--seeds", "1", "--methods", "oba,random",
            "--targets", "0.5", "--keeps", "0.5", "--finetune-steps", "1", "--config.prune.steps=3",
            "--config.prune.latency_repeats=1", "--config.prune.unstructured_steps=2"]
    summary = compare.main(argv)
    assert set(summary["structured"]) == {"oba", "random"}
    assert summary["structured"]["random"]["0.5"]["acc_pruned"]["n"] == 1
    assert set(summary["unstructured"]) == {"oba", "random"}
    assert {"keep 0.5", "2:4", "2:4, fine-tuned"} <= set(summary["unstructured"]["oba"])
    text = open(os.path.join(out, "compare.md")).read()
    assert "| random | 0.5 |" in text and "| oba |" in text
    # --tables-only rebuilds the same tables from the reports on disk, running nothing
    again = compare.main([*argv, "--tables-only"])
    assert again["structured"] == summary["structured"] and again["unstructured"] == summary["unstructured"]


def test_a_seeded_method_is_scored_with_prune_seed():
    """compare.py's seeds reach the random method's scores in both pipelines (`runs.method_options`)."""
    from oba_jax.experiment import config as config_lib
    from oba_jax.experiment.runs import method_options
    config = config_lib.load_config(MLP, [("prune.seed", "3")])
    assert method_options(config, "random") == {"seed": 3}
    assert method_options(config, "oba") == {} and method_options(config, "taylor") == {}


def test_summarise_results_reads_both_outputs_and_marks_what_is_missing(tmp_path):
    """The README's cross-architecture tables: one column per directory, '–' where a directory lacks a run."""
    import summarise_results
    stat = lambda m, s=0.0: {"mean": m, "std": s, "n": 3}   # noqa: E731
    full, empty = tmp_path / "vgg", tmp_path / "vit"
    full.mkdir(), empty.mkdir()
    (full / "fidelity.json").write_text(json.dumps({
        "channels_by_method": {"oba": {"per_group_mean": {"spearman": 0.25, "kendall": 0.2}}},
        "sets": {"oba": {"per group 0.25": 1.5}},
        "weights": {"methods": {"oba": {"sets": {"spearman": 0.875, "kendall": 0.7}}}}}))
    (full / "compare.json").write_text(json.dumps({
        "methods": ["oba"], "structured": {"oba": {"0.5": {"acc_finetuned": stat(87.91, 0.18)}}},
        "unstructured": {"oba": {"keep 0.5": stat(87.35, 1.83), "2:4, fine-tuned": stat(89.71, 0.07)}}}))
    lines = summarise_results.fidelity_table([str(full), str(empty)]) + summarise_results.compare_tables([str(full)])
    assert "| oba | 0.25 | – | 1.50 | – | 0.88 | – |" in lines
    assert "| oba | 87.9 ± 0.2 |" in lines
    assert "| oba | 87.3 ± 1.8 | – | – | 89.7 ± 0.1 |" in lines


def test_bad_arguments_are_usage_errors_before_any_work(tmp_path, capsys):
    import compare
    import fidelity
    for main, extra in ((compare.main, ["--methods", "oba,nope"]), (compare.main, []), (fidelity.main, [])):
        pretrained = str(tmp_path) if extra else str(tmp_path / "missing")
        with pytest.raises(SystemExit) as e:
            main(["--config", MLP, "--pretrained", pretrained, "--out", str(tmp_path / "out"), *extra])
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "['nope'] are not importance methods" in err and "is not a directory" in err
    assert not (tmp_path / "out").exists()
