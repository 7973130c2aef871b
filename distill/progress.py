"""Feedback on long runs: training throughput (img/s), elapsed and remaining time.

On a terminal, `ThroughputBar` adds them to Lightning's progress bar. When stdout is a file or a
pipe (a batch job, `nohup`, a sweep trial's log), a progress bar writes carriage returns that show
nothing useful for minutes; `ProgressLog` prints one line every `every_s` seconds instead, plus one
after each validation:

    step 1200/5000 (24%)  epoch 3  312 img/s  elapsed 0:04:12  remaining 0:13:20  loss 0.1234
    validation at step 1200: student dice@best 0.8123  teacher dice@best 0.7900

img/s counts training images of all processes over the time since the last report, validation left
out; the remaining time extrapolates the run so far (validation included) to the step budget
(`trainer.estimated_stepping_batches`).
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


def format_duration(seconds: float) -> str:
    """H:MM:SS of a non-negative number of seconds."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class RunClock:
    """Training images and steps against wall time, for one fit."""

    def __init__(self, first_step: int = 0) -> None:
        self.start = self.since = time.perf_counter()
        self.first_step = first_step  # a resumed run's rate counts only its own steps
        self.images = 0  # since the last report
        self.validating = 0.0  # seconds spent validating since the last report
        self._validation_start: float | None = None

    def on_batch_end(self, trainer: pl.Trainer, batch: Any) -> None:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        self.images += len(images) * trainer.world_size

    def on_validation_start(self) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self) -> None:
        if self._validation_start is not None:
            self.validating += time.perf_counter() - self._validation_start
            self._validation_start = None

    def report(self, trainer: pl.Trainer) -> dict[str, float | None]:
        """{"img_s", "elapsed_s", "remaining_s" (None when the run has no step budget)}; starts a new window."""
        now = time.perf_counter()
        training = now - self.since - self.validating
        img_s = self.images / training if training > 0 else 0.0
        elapsed = now - self.start
        done, total = trainer.global_step - self.first_step, trainer.estimated_stepping_batches
        remaining = None
        if done > 0 and total != float("inf"):
            remaining = max(0.0, (total - trainer.global_step) * elapsed / done)
        self.since, self.images, self.validating = now, 0, 0.0
        return {"img_s": img_s, "elapsed_s": elapsed, "remaining_s": remaining}


class ThroughputBar(TQDMProgressBar):
    """Lightning's progress bar, with the run's img/s and remaining time next to the losses."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.clock = RunClock()
        self.shown: dict[str, str] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.clock = RunClock(trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.clock.on_batch_end(trainer, batch)
        if time.perf_counter() - self.clock.since >= 2.0:  # a stable rate, not one step's
            report = self.clock.report(trainer)
            self.shown = {"img/s": f"{report['img_s']:.0f}", "elapsed": format_duration(report["elapsed_s"])}
            if report["remaining_s"] is not None:
                self.shown["left"] = format_duration(report["remaining_s"])
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self.clock.on_validation_start()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.clock.on_validation_end()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, pl_module), **self.shown}


class ProgressLog(pl.Callback):
    """A progress line every `every_s` seconds and one after each validation, printed by rank 0 (see the module docstring)."""

    def __init__(self, every_s: float = 60.0, monitor: str = "val/student/dice@best"):
        self.every_s = every_s
        self.monitor = monitor
        self.clock = RunClock()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock = RunClock(trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.clock.on_batch_end(trainer, batch)
        if time.perf_counter() - self.clock.since >= self.every_s and trainer.is_global_zero:
            print(self.line(trainer, outputs), flush=True)

    def line(self, trainer: pl.Trainer, outputs: Any) -> str:
        report = self.clock.report(trainer)
        total = trainer.estimated_stepping_batches
        step = f"step {trainer.global_step}"
        if total != float("inf"):
            step += f"/{int(total)} ({100 * trainer.global_step / max(1, total):.0f}%)"
        parts = [step, f"epoch {trainer.current_epoch}", f"{report['img_s']:.0f} img/s"]
        parts.append(f"elapsed {format_duration(report['elapsed_s'])}")
        if report["remaining_s"] is not None:
            parts.append(f"remaining {format_duration(report['remaining_s'])}")
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")  # one host sync per report, not per step
        return "  ".join(parts)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.on_validation_start()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.on_validation_end()
        if trainer.state.fn != "fit" or trainer.sanity_checking or not trainer.is_global_zero:
            return
        scores = [
            f"{who} dice@best {float(value):.4f}"
            for who in ("student", "teacher")
            if (value := trainer.callback_metrics.get(self.monitor.replace("student", who))) is not None
        ]
        if scores:
            print(f"validation at step {trainer.global_step}: " + "  ".join(scores), flush=True)
