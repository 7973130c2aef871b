"""`python -m distill.fit --config configs/fit/X.yaml [--model.kd.alpha=0.5 ...]`: train, then report honestly.

A LightningCLI without subcommands (overrides come exactly as a W&B agent passes them). The flow:
fit -> reload the best checkpoint (by the student's validation Dice at its chosen threshold) ->
validate (metrics_val.json) -> test at the threshold frozen on validation (metrics_test.json) ->
curves_val.png, overlays_val.png -> a side-by-side table of teacher and student at every threshold.
Everything lands in <runs_dir>/<run_name>/.
"""

from __future__ import annotations

import netrc
import os
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import DDPStrategy

from distill.data.datamodule import VesselDataModule
from distill.errors import ConfigError, DistillError
from distill.module import WHO, DistillModule
from distill.progress import ProgressLog, ThroughputBar
from distill.report import format_table, write_metrics
from distill.students import count_parameters
from distill.viz import plot_curves, plot_overlays

MONITOR = "val/student/dice@best"
_RUN_NAME_ENV = "DISTILL_RUN_NAME"  # so that DDP ranks started later agree on a timestamped name
# Lightning warns when an epoch has fewer batches than log_every_n_steps, as if logging restarted
# each epoch; it counts steps over the whole run (and so does DistillModule), so short epochs of a
# steps-based schedule lose no logs.
WRONG_LOGGING_INTERVAL_WARNING = (
    r"The number of training batches \(\d+\) is smaller than the logging interval"
)


def _wandb_offline() -> bool:
    """Offline unless WANDB_MODE says otherwise or the user is logged in (an API key in env or ~/.netrc)."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode != "online"
    if os.environ.get("WANDB_API_KEY"):
        return False
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is None
    except (FileNotFoundError, netrc.NetrcParseError):
        return True


class DistillCLI(LightningCLI):
    """LightningCLI that owns the run directory, the best-checkpoint callback and the logger."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None, help="default: a timestamp")
        parser.add_argument("--runs_dir", type=str, default="students", help="runs land in runs_dir/run_name")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume training from it")
        parser.add_argument("--wandb", type=bool, default=True, help="log to W&B when wandb is installed")
        parser.add_argument(
            "--progress_every_s",
            type=float,
            default=60.0,
            help="when stdout is not a terminal: seconds between progress lines (img/s, elapsed, remaining)",
        )
        parser.add_argument(
            "--ddp_timeout_s",
            type=float,
            default=600.0,
            help="multi-process runs fail when a collective waits this long (a process stopped making progress)",
        )

    @property
    def run_dir(self) -> Path:
        name = self.config.get("run_name") or os.environ.get(_RUN_NAME_ENV)
        if not name:
            name = time.strftime("%Y%m%d-%H%M%S")
        os.environ[_RUN_NAME_ENV] = name
        return Path(self.config["runs_dir"]) / name

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        run_dir = self.run_dir
        trainer_config = self.config_init.get("trainer") or {}
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        best = ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best",
            monitor=MONITOR,
            mode="max",
            save_top_k=1,
            save_last=True,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        kwargs["callbacks"] = [*callbacks, best, *self._progress(trainer_config, kwargs)]
        kwargs["default_root_dir"] = str(run_dir)
        if trainer_config.get("logger") in (None, True):
            kwargs["logger"] = self._make_logger(run_dir)
        trainer = super().instantiate_trainer(**kwargs)
        strategy = trainer.strategy
        if isinstance(strategy, DDPStrategy) and strategy._timeout == default_pg_timeout:
            # Lightning's default waits 30 minutes; the process group is made in fit, from this value.
            strategy._timeout = timedelta(seconds=self.config["ddp_timeout_s"])
        return trainer

    def _progress(self, trainer_config: dict, kwargs: dict) -> list[pl.Callback]:
        """img/s and remaining time: in the progress bar on a terminal, as periodic lines in a log."""
        if sys.stdout.isatty():
            return [ThroughputBar()] if trainer_config.get("enable_progress_bar") is not False else []
        kwargs["enable_progress_bar"] = False
        return [ProgressLog(every_s=self.config["progress_every_s"], monitor=MONITOR)]

    def _make_logger(self, run_dir: Path) -> Logger:
        if self.config["wandb"]:
            try:
                from lightning.pytorch.loggers import WandbLogger
            except ImportError:
                WandbLogger = None  # noqa: N806
            if WandbLogger is not None and _wandb_available():
                run_dir.mkdir(parents=True, exist_ok=True)
                return WandbLogger(
                    project=os.environ.get("WANDB_PROJECT", "vessel-distill"),
                    name=run_dir.name,
                    group=os.environ.get("WANDB_RUN_GROUP"),
                    save_dir=str(run_dir),
                    offline=_wandb_offline(),
                )
        return CSVLogger(save_dir=str(run_dir), name="logs", version="")


def _wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def _log_pictures_and_tables(
    logger: Logger | None, reports: dict[str, dict], pictures: dict[str, Path]
) -> None:
    """Per-threshold tables and the PNGs for W&B dashboards; the CSV logger has the scalars already."""
    if logger is None or type(logger).__name__ != "WandbLogger":
        return
    for split, report in reports.items():
        columns = ["threshold"] + [f"{who}/{name}" for who in WHO if who in report for name in report[who]]
        rows = [
            [t] + [report[who][name][i] for who in WHO if who in report for name in report[who]]
            for i, t in enumerate(report["thresholds"])
        ]
        logger.log_table(key=f"{split}/thresholds", columns=columns, data=rows)
    for key, path in pictures.items():
        logger.log_image(key=key, images=[str(path)])


@contextmanager
def _collective_timeout_explained(trainer: pl.Trainer, timeout_s: float) -> Iterator[None]:
    """A timed-out collective (gloo raises it; NCCL's watchdog aborts with its own log line) says what it means."""
    try:
        yield
    except RuntimeError as error:
        if trainer.world_size == 1 or "timed out" not in str(error).lower():
            raise
        raise DistillError(
            f"rank {trainer.global_rank}: a collective operation across the {trainer.world_size} processes waited "
            f"{timeout_s:.0f} s (--ddp_timeout_s) for another process, which stopped making progress: it "
            "crashed, hung, or is far slower; its own output says which. The original error follows."
        ) from error


def main(args: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the whole flow; returns {"val": report, "test": report} (the metrics.json bodies)."""
    cli = DistillCLI(
        DistillModule,
        VesselDataModule,
        run=False,
        seed_everything_default=0,
        save_config_callback=None,
        args=args,
        parser_kwargs={"description": __doc__.split("\n")[0]},
    )
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    run_dir = Path(trainer.default_root_dir)
    if model.loss.kd.alpha > 0 and not data.has_teacher:
        raise ConfigError(
            f"model.kd.alpha={model.loss.kd.alpha} needs a teacher cache: set data.cache_dir, "
            "or --model.kd.alpha=0 for a ground-truth-only baseline"
        )
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        cli.parser.save(cli.config, run_dir / "config.yaml", overwrite=True, multifile=False)

    with _collective_timeout_explained(trainer, cli.config["ddp_timeout_s"]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=WRONG_LOGGING_INTERVAL_WARNING)
        trainer.fit(model, datamodule=data, ckpt_path=cli.config["ckpt_path"])
    best = Path(trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path)
    if not best.is_file():
        raise ConfigError(f"no checkpoint was written under {run_dir / 'checkpoints'}: did validation run?")

    reports: dict[str, dict[str, Any]] = {}
    trainer.validate(model, datamodule=data, ckpt_path=str(best), verbose=False)
    reports["val"] = model.results["val"]
    overlay_samples = model.overlay_samples
    trainer.test(model, datamodule=data, ckpt_path=str(best), verbose=False)
    reports["test"] = model.results["test"]
    if not trainer.is_global_zero:
        return reports

    params = count_parameters(model.student)
    for split, report in reports.items():
        write_metrics(run_dir / f"metrics_{split}.json", report, params, best)
    pictures = {
        "val/curves": plot_curves(reports["val"], run_dir / "curves_val.png"),
        "val/overlays": plot_overlays(
            overlay_samples, reports["val"]["chosen_threshold"], run_dir / "overlays_val.png"
        ),
    }
    _log_pictures_and_tables(trainer.logger, reports, pictures)
    print(f"\n{format_table(reports['val'])}\n")
    test_at = reports["test"]["at_chosen"]
    print(
        "test at the frozen thresholds: "
        + "  ".join(
            f"{who} dice {test_at[who]['dice']:.4f} recall {test_at[who]['recall']:.4f}" for who in test_at
        )
    )
    print(f"run: {run_dir}  (best checkpoint {best}, {params / 1e6:.2f}M student parameters)")
    return reports


if __name__ == "__main__":
    main()
