"""Train a model from a config file.

    python train.py --config configs/fashion_mnist.py --workdir runs/fmnist [--config.optim.lr=0.05 ...]

Re-running the same command with the same --workdir resumes from the latest checkpoint there.
Exits with status 2 and a one-paragraph message (no traceback) when the config is invalid and
status 3 when the dataset is missing, 4 when --workdir holds another model's checkpoints.
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


def main(argv: list[str]) -> int:
    from oba_jax.experiment import config as config_lib

    try:
        workdir, config = config_lib.config_from_cli(
            argv, prog="train.py", description=__doc__.split("\n\n")[0],
            workdir_help="directory for checkpoints, metrics.jsonl and plots")
    except config_lib.ConfigError as e:
        print(f"train.py: invalid configuration: {e}", file=sys.stderr)
        return 2

    from oba_jax.experiment import training as train_lib
    from oba_jax.experiment.checkpoint import CheckpointMismatchError
    from oba_jax.experiment.data import DatasetNotFoundError
    try:
        metrics = train_lib.train_and_evaluate(config, workdir)
    except DatasetNotFoundError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 3
    except CheckpointMismatchError as e:
        print(f"train.py: cannot resume: {e}", file=sys.stderr)
        return 4
    except config_lib.ConfigError as e:
        print(f"train.py: invalid configuration: {e}", file=sys.stderr)
        return 2
    print(result_table(config, metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
