"""oba-jax pruning CLI: the experiment a config describes, by its `prune.mode` (`oba_jax.experiment.pipelines`).

    python prune.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist [--config.KEY=VALUE ...]

trains the dense model into WORKDIR/dense first unless `prune.pretrained` names a train.py workdir, then
runs the mode's pipeline and writes WORKDIR/report.json, its plots and a table on stdout:

- `oneshot` (default) / `iterative`: channels pruned to every target of `prune.ops_ratios`, each fine-tuned
  into WORKDIR/ops_<target>;
- `unstructured`: the progressive mask schedule to `prune.keep_ratio` for `prune.importance` and every
  method of `prune.compare`, the one-shot `prune.n_m` point, masked fine-tuning into
  WORKDIR/unstructured_<method> and n_m_<method>;
- `score`: the importance scores of the dense model in WORKDIR/scores_<importance> (scores.npz,
  channel_scores.npz, graph.txt/.dot, score_histogram.png), e.g. of a trained checkpoint:

    python prune.py --config configs/fashion_mnist.py --workdir runs/fm_scores --config.prune.mode=score \\
        --config.prune.pretrained=runs/fashion_mnist/dense --config.prune.importance=oba

A stage directory is reused only when its manifest shows the same inputs; otherwise the run stops naming the
keys that differ (`--config.overwrite=true` deletes it and runs the stage again). User errors end with one
paragraph on stderr and the exit statuses of train.py (oba_jax.experiment.cli): 2 invalid config, 3 dataset
missing or corrupt, 4 a checkpoint of another model, 5 a corrupt checkpoint, 6 a diverged fine-tuning, 7
WORKDIR (or prune.pretrained) held by another run, 8 a file system error, 9 out of memory, 130 interrupted,
143 terminated.
"""
from __future__ import annotations

import os
import sys

SCORE_SUBCOMMAND_GONE = (
    "'prune.py score' is now the score mode of the config-driven CLI: prune.py --config CONFIG --workdir DIR "
    "--config.prune.mode=score --config.prune.pretrained=TRAIN_WORKDIR [--config.prune.importance=oba "
    "--config.prune.score_batches=20 --config.prune.score_batch_size=64 --config.prune.score_dtype=float64 "
    "--config.prune.score_parts=true --config.prune.first_order=true]")


def main(argv: list[str] | None = None, *, owns_process: bool = False) -> int:
    from oba_jax.experiment.cli import run_cli
    argv = sys.argv[1:] if argv is None else argv

    def body(session) -> int:
        from oba_jax.experiment import config as config_lib
        if argv[:1] == ["score"]:
            raise config_lib.ConfigError(SCORE_SUBCOMMAND_GONE)
        workdir, config = config_lib.config_from_cli(argv, prog="prune.py", description=__doc__,
                                                     workdir_help="directory for the dense run, stages, report, plots",
                                                     sections=("prune", "finetune"))
        session.config = config
        from oba_jax.experiment import pipelines
        from oba_jax.experiment.lock import workdir_lock
        pipeline = pipelines.pipeline(config.prune.mode)
        # a mode that reuses nothing still resumes the dense training it starts with (no prune.pretrained)
        session.resumable = pipeline.resumable or config.prune.pretrained is None
        with workdir_lock(workdir):
            report = pipeline.run(config, workdir)
        print(pipeline.table(report))
        print(f"report: {os.path.join(workdir, pipelines.REPORT_FILE)}")
        return 0
    return run_cli("prune.py", body, owns_process=owns_process)


if __name__ == "__main__":
    sys.exit(main(owns_process=True))
