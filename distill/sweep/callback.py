"""The Lightning side of a local sweep: `--trainer.callbacks+=distill.sweep.callback.SweepReporter`.

Kept apart from `distill.sweep.runner` so that the sweep runner does not import Lightning.
"""

from __future__ import annotations

import lightning.pytorch as pl

from distill.errors import ConfigError
from distill.sweep.runner import TrialReporter


class SweepReporter(pl.Callback):
    """Each validation epoch, send the sweep's metric to the study; stop training when pruned."""

    def __init__(self) -> None:
        self.reporter = TrialReporter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metric = self.reporter.metric
        if not metric or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if metric not in trainer.callback_metrics:
            raise ConfigError(
                f"sweep metric {metric!r} was not logged; logged metrics are: {sorted(trainer.callback_metrics)}"
            )
        if self.reporter.report(float(trainer.callback_metrics[metric])):
            trainer.should_stop = True
