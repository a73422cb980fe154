"""The pipelines of `prune.py`, one per `prune.mode`, looked up once in `PIPELINES`.

Each module has `run(config, workdir) -> Report` (it writes WORKDIR/report.json and its plots),
`table(report) -> str` and `plot(report, workdir) -> [paths]`; the reports are the frozen records of
`reports`. Library code here raises (ConfigError and the rest of `cli.EXIT_STATUSES`), never exits.

| mode | module | resumable |
|---|---|---|
| oneshot, iterative | `structured` | yes: dense training and each fine-tuning resume from their checkpoints |
| unstructured | `unstructured` | yes |
| score | `score` | no: the scores are computed again |
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from types import ModuleType

import ml_collections

from oba_jax.experiment.config import ConfigError
from oba_jax.experiment.pipelines import reports, score, structured, unstructured
from oba_jax.experiment.pipelines.reports import REPORT_FILE, Report, load_report

__all__ = ["PIPELINES", "REPORT_FILE", "Pipeline", "load_report", "pipeline", "reports", "run", "table"]


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """One mode of `prune.py`."""

    mode: str
    run: Callable[[ml_collections.ConfigDict, str], Report]
    table: Callable[[Report], str]
    plot: Callable[[Report, str], list[str]]
    resumable: bool        # whether re-running an interrupted command continues its work


def _of(mode: str, module: ModuleType, resumable: bool) -> Pipeline:
    return Pipeline(mode, module.run, module.table, module.plot, resumable)


PIPELINES: dict[str, Pipeline] = {
    "oneshot": _of("oneshot", structured, True),
    "iterative": _of("iterative", structured, True),
    "unstructured": _of("unstructured", unstructured, True),
    "score": _of("score", score, False),
}


def pipeline(mode: str) -> Pipeline:
    """The pipeline of `prune.mode` (ConfigError naming the modes if there is none)."""
    if mode not in PIPELINES:
        raise ConfigError(f"config.prune.mode: {mode!r} is none of {tuple(PIPELINES)}")
    return PIPELINES[mode]


def run(config: ml_collections.ConfigDict, workdir: str) -> Report:
    """The experiment of `config` by its `prune.mode`; the report it wrote."""
    return pipeline(config.prune.mode).run(config, workdir)


def table(report: Report) -> str:
    return pipeline(report.mode).table(report)
