"""Train a model from a config file.

    python train.py --config configs/fashion_mnist.py --workdir runs/fmnist [--config.optim.lr=0.05 ...]

Re-running the same command with the same --workdir resumes from the latest checkpoint there.
A user error ends the run with a one-paragraph message (no traceback) and an exit status
(oba_jax.experiment.cli): 2 invalid config, 3 dataset missing or corrupt, 4 --workdir holds another
model's checkpoints, 5 every checkpoint there is corrupt, 6 the loss diverged (NaN/inf), 7 another run
holds --workdir, 8 a file system error (not writable, disk full), 130 interrupted.
"""

from __future__ import annotations

import sys


def result_table(config, metrics: dict) -> str:
    """A short human-readable summary of a finished run."""
    rows = [
        ("dataset", f"{metrics['dataset']} ({metrics['dataset_source']})"),
        ("model", f"{metrics['model']} ({config.model.family})"),
        ("parameters", f"{metrics['num_params']:,}"),
        ("epochs", f"{metrics['epochs']:g} ({metrics['steps']} steps)"),
        ("test top-1", f"{100 * metrics['top1']:.2f}%"),
        ("test top-5", f"{100 * metrics['top5']:.2f}%"),
        ("test loss", f"{metrics['loss']:.4f}"),
        ("wall time", f"{metrics['wall_time']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line] + [f"{k.ljust(width)} | {v}" for k, v in rows] + [line])


def main(argv: list[str], *, owns_process: bool = False) -> int:
    from oba_jax.experiment.cli import run_cli

    def body(session) -> int:
        from oba_jax.experiment import config as config_lib
        workdir, config = config_lib.config_from_cli(
            argv, prog="train.py", description=__doc__.split("\n\n")[0],
            workdir_help="directory for checkpoints, metrics.jsonl and plots")
        session.config = config
        from oba_jax.experiment import training as train_lib
        from oba_jax.experiment.lock import workdir_lock
        with workdir_lock(workdir):   # before the data is loaded: a second run is refused at once
            metrics = train_lib.train_and_evaluate(config, workdir)
        print(result_table(config, metrics))
        return 0
    return run_cli("train.py", body, owns_process=owns_process)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], owns_process=True))
