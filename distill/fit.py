"""`python -m distill.fit --config configs/fit/X.yaml [--loss.kd_alpha=0.5 ...]`: train, then report honestly.

A LightningCLI without subcommands (overrides come exactly as a W&B agent passes them). The loss is
its own top-level section, `loss:`, built from the loss-term registry: `--loss.<term>.weight`,
`--loss.<term>.<option>` for every registered term, and the mixing settings (`--loss.kd_alpha`).
The flow:
fit -> reload the best checkpoint (by the student's validation Dice at its chosen threshold) ->
validate -> test at the threshold frozen on validation -> per split, metrics_<split>.json,
per_image_<split>.csv, curves_<split>.png and overlays_<split>.png (`distill.report.write_outputs`,
as `evaluate` writes them) -> a side-by-side table of teacher and student at every threshold.
Everything lands in <runs_dir>/<run_name>/.
"""

from __future__ import annotations

import netrc
import os
import shutil
import signal
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from itertools import chain, count
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import Namespace
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from distill.cli import none_as_null, reports_user_errors
from distill.data.datamodule import VesselDataModule
from distill.errors import ConfigError, DistillError
from distill.losses import LossSettings, loss_terms
from distill.module import DistillModule
from distill.progress import ProgressLog, ThroughputBar
from distill.report import WHO, format_table, write_outputs
from distill.students import count_parameters

MONITOR = "val/student/dice@best"
RUN_MARKER = ".distill-run"  # in every run directory fit claims: what fit may clear without --overwrite
# What a fit that failed before its first checkpoint leaves: the marker, the config, the logger's files.
FAILED_ATTEMPT_ENTRIES = {RUN_MARKER, "config.yaml", "logs", "wandb", "checkpoints"}
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


def add_loss_arguments(parser: LightningArgumentParser) -> None:
    """The `loss` section: LossSettings, then `loss.<term>.weight` and each registered term's options.

    Built from the registry when the parser is, so a term registered before `main()` runs (a test,
    a launcher script) is configurable, trained and logged like the built-in ones. Linked into
    `model.loss` as a plain dict (what the checkpoint's hyperparameters hold).
    """
    parser.add_class_arguments(LossSettings, "loss", instantiate=False)
    for name, term in loss_terms().items():
        parser.add_argument(
            f"--loss.{name}.weight",
            type=float | None,
            default=term.default_weight,
            help=f"weight of {name} (null: off; 0: logged without gradient)",
        )
        parser.add_class_arguments(term, f"loss.{name}", instantiate=False, sub_configs=False)
    parser.link_arguments("loss", "model.loss", compute_fn=_as_dict)


def _as_dict(section: Namespace) -> dict:
    return section.as_dict()


class DistillCLI(LightningCLI):
    """LightningCLI that owns the run directory, the loss section, the best-checkpoint callback and the logger."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None, help="default: a timestamp")
        parser.add_argument("--runs_dir", type=str, default="students", help="runs land in runs_dir/run_name")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="resume training from it")
        parser.add_argument("--wandb", type=bool, default=True, help="log to W&B when wandb is installed")
        parser.add_argument(
            "--overwrite",
            type=bool,
            nargs="?",
            const=True,
            default=False,
            help="clear runs_dir/run_name first if it holds a run (--overwrite, or --overwrite=true)",
        )
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
        add_loss_arguments(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """As Lightning's, without its warning about `args` beside a command line: `main` always
        passes the whole command line itself (with a W&B agent's None spelled null)."""
        self.config = parser.parse_args(args)

    @property
    def run_dir(self) -> Path:
        name = self.config.get("run_name") or os.environ.get(_RUN_NAME_ENV)
        if not name:  # a timestamp, with -2, -3, ... when a run of this second exists
            stamp, runs = time.strftime("%Y%m%d-%H%M%S"), Path(self.config["runs_dir"])
            names = chain([stamp], (f"{stamp}-{i}" for i in count(2)))
            name = next(n for n in names if not (runs / n).exists())
        if name in (".", "..") or any(sep in name for sep in ("/", "\\")):
            raise ConfigError(
                f"--run_name {name!r} must be a plain folder name (no '.', '..' or path separator); "
                "put the folder elsewhere with --runs_dir"
            )
        os.environ[_RUN_NAME_ENV] = name
        return Path(self.config["runs_dir"]) / name

    def _claim_run_dir(self, run_dir: Path) -> None:
        """Never mix two runs in one directory, and never delete what fit did not write.

        A run directory (`is_run_dir`) is refused unless this run resumes it (--ckpt_path inside it)
        or --overwrite clears it; one that holds only what a failed attempt of fit leaves
        (FAILED_ATTEMPT_ENTRIES, with the marker) is cleared; anything else that is not empty is
        refused, --overwrite or not. Rank 0 only (the others follow it). Claimed directories get the
        marker.
        """
        if rank_zero_only.rank != 0:
            return
        ckpt_path = self.config["ckpt_path"]
        if ckpt_path and not Path(ckpt_path).is_file():
            raise ConfigError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
        if ckpt_path and not zipfile.is_zipfile(ckpt_path):
            raise ConfigError(
                f"--ckpt_path {ckpt_path}: not a checkpoint (give a .ckpt that distill.fit wrote)"
            )
        if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
            raise ConfigError(
                f"{run_dir} is a file or a symbolic link: pick another --run_name or --runs_dir"
            )
        if run_dir.is_dir() and any(run_dir.iterdir()):
            held = ", ".join(sorted(p.name for p in run_dir.iterdir() if p.name != RUN_MARKER))
            resumes = resumes_in(run_dir, ckpt_path)
            if not is_run_dir(run_dir):
                if not (run_dir / RUN_MARKER).is_file() or not _only_a_failed_attempt(run_dir):
                    raise ConfigError(
                        f"{run_dir} holds files that distill.fit did not write ({held}): pick another "
                        "--run_name or --runs_dir"
                    )
                print(f"note: {run_dir} held only what a failed attempt left ({held}); cleared", flush=True)
                shutil.rmtree(run_dir)
            elif self.config["overwrite"]:
                if resumes:
                    raise ConfigError(
                        f"--overwrite would delete {ckpt_path}, the checkpoint to resume from: drop one of the two"
                    )
                shutil.rmtree(run_dir)
            elif resumes:
                derived = sorted(
                    p.name for p in run_dir.iterdir() if p.name.startswith("eval_") or p.suffix == ".onnx"
                )
                if derived:
                    print(
                        f"note: {', '.join(derived)} in {run_dir} came from this run's earlier checkpoints; "
                        "run distill.evaluate / distill.export again when it has finished",
                        flush=True,
                    )
            else:
                last = run_dir / "checkpoints" / "last.ckpt"
                resume = f"resume it with --ckpt_path {last}, " if last.is_file() else ""
                given = f" (--ckpt_path {ckpt_path} is another run's)" if ckpt_path else ""
                raise ConfigError(
                    f"{run_dir} already holds a run ({held}){given}: {resume}pick a new --run_name, or pass "
                    "--overwrite to clear it first"
                )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_MARKER).touch()

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        run_dir = self.run_dir
        self._claim_run_dir(run_dir)
        trainer_config = self.config_init.get("trainer") or {}
        callbacks = trainer_config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        best = ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best",
            monitor=MONITOR,
            mode="max",
            save_top_k=1,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        # Not save_last=True: Lightning writes that copy only when `best` improves, so a run killed
        # long after its best epoch would resume from there. This one is rewritten at every
        # validation (after `best`, so it holds best's updated state).
        last = ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="last", save_top_k=1, enable_version_counter=False
        )
        kwargs["callbacks"] = [*callbacks, best, last, *self._progress(trainer_config, kwargs)]
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
        # A resumed run logs beside the earlier rows (Lightning's CSV writer would replace them).
        version = (
            f"resumed-{time.strftime('%Y%m%d-%H%M%S')}"
            if resumes_in(run_dir, self.config["ckpt_path"])
            else ""
        )
        return CSVLogger(save_dir=str(run_dir), name="logs", version=version)


def is_run_dir(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run fit made: its marker or its config.yaml, with a checkpoint or
    metrics of fit's names (what runs made before the marker existed hold)."""
    made = (run_dir / RUN_MARKER).is_file() or (run_dir / "config.yaml").is_file()
    saved = any((run_dir / "checkpoints" / name).is_file() for name in ("best.ckpt", "last.ckpt"))
    return made and (saved or any((run_dir / f"metrics_{split}.json").is_file() for split in ("val", "test")))


def _only_a_failed_attempt(run_dir: Path) -> bool:
    """Whether `run_dir` holds nothing but what fit writes before its first checkpoint."""
    for entry in run_dir.iterdir():
        if entry.is_symlink() or entry.name not in FAILED_ATTEMPT_ENTRIES:
            return False
        if entry.name == "checkpoints" and any(entry.iterdir()):
            return False
    return True


def resumes_in(run_dir: Path, ckpt_path: str | None) -> bool:
    """Whether --ckpt_path continues the run in `run_dir` (a checkpoint inside it)."""
    return bool(ckpt_path) and Path(ckpt_path).resolve().is_relative_to(run_dir.resolve())


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
    """A timed-out collective says what it means (gloo raises one; NCCL's watchdog aborts the process
    with its own "Watchdog caught collective operation timeout" line)."""
    try:
        yield
    except RuntimeError as error:
        if trainer.world_size == 1 or not any(
            word in str(error).lower() for word in ("timed out", "timeout")
        ):
            raise
        raise DistillError(
            f"rank {trainer.global_rank}: a collective operation across the {trainer.world_size} processes waited "
            f"{timeout_s:.0f} s (--ddp_timeout_s) for another process, which stopped making progress: it "
            f"crashed, hung, or is far slower; its own output says which ({type(error).__name__}: "
            f"{str(error).strip().splitlines()[-1]})"
        ) from error


def main(args: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Run the whole flow; returns {"val": report, "test": report} (the metrics.json bodies).

    `args` (default: the command line) may spell null as Python's `None`, as a W&B agent does.
    """
    inherited_name = os.environ.get(_RUN_NAME_ENV)  # set by the rank that started this one
    try:
        return _fit(args)
    finally:
        if inherited_name is None:  # the next fit in this process (a notebook, a loop) names its own run
            os.environ.pop(_RUN_NAME_ENV, None)


def _fit(args: list[str] | None) -> dict[str, dict[str, Any]]:
    cli = DistillCLI(
        DistillModule,
        VesselDataModule,
        run=False,
        seed_everything_default=0,
        save_config_callback=None,
        # The module's own AdamW + warm-up/cosine (model.lr, model.weight_decay, model.warmup_fraction):
        # Lightning's --optimizer/--lr_scheduler would replace them and ignore those settings silently.
        auto_configure_optimizers=False,
        args=none_as_null(sys.argv[1:] if args is None else args),
        parser_kwargs={"description": __doc__.split("\n")[0], "prog": "python -m distill.fit"},
    )
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    run_dir = Path(trainer.default_root_dir)
    start_method = getattr(trainer.strategy, "_start_method", "popen")
    if start_method != "popen":
        raise ConfigError(
            f"--trainer.strategy: ranks started by {start_method} (ddp_spawn, ddp_fork, ddp_notebook) cannot "
            "hand their validation and test scores back to fit: use --trainer.strategy=ddp"
        )
    if model.hparams.cuda_graph:
        if data.crop_size is None:
            raise ConfigError(
                "model.cuda_graph=true replays one batch shape, and with data.crop_size null training batches "
                "take the images' sizes: set data.crop_size (e.g. 256), or model.cuda_graph=false"
            )
        model.check_cuda_graph(trainer)
    if model.hparams.compile and data.crop_size is None:
        rank_zero_warn(
            "model.compile with data.crop_size null: training batches take the images' sizes, and every "
            "new size compiles the step again (torch stops compiling after 8 and runs it eagerly); set "
            "data.crop_size for one training shape"
        )
    needing = model.loss.terms_needing("teacher_logits")
    if needing and not data.has_teacher:
        raise ConfigError(
            f"loss terms {needing} need a teacher cache (loss.kd_alpha={model.loss.settings.kd_alpha}): "
            "set data.cache_dir, or --loss.kd_alpha=0 for a ground-truth-only baseline"
        )
    needing = model.loss.terms_needing("skeleton")
    if needing and not data.skeletons:
        raise ConfigError(f"loss terms {needing} need ground-truth skeletons: set data.skeletons=true")
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        config = cli.config.clone()
        config["overwrite"] = False  # reusing this file must never clear a run directory
        # A resumed run keeps the config.yaml that made its checkpoints; its own goes beside it.
        name = "config.resumed.yaml" if resumes_in(run_dir, cli.config["ckpt_path"]) else "config.yaml"
        cli.parser.save(config, run_dir / name, overwrite=True, multifile=False)

    with _collective_timeout_explained(trainer, cli.config["ddp_timeout_s"]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=WRONG_LOGGING_INTERVAL_WARNING)
        last = run_dir / "checkpoints" / "last.ckpt"
        with _stop_explained(
            trainer,
            lambda: (
                f"at step {trainer.global_step}"
                + (f"; resume with --ckpt_path {last}" if last.is_file() else "")
            ),
        ):
            trainer.fit(model, datamodule=data, ckpt_path=cli.config["ckpt_path"])
    # This run's best.ckpt, not the callback's best_model_path: a run started from another run's
    # checkpoint restores that run's path and score.
    best = run_dir / "checkpoints" / "best.ckpt"
    reports: dict[str, dict[str, Any]] = {}
    overlay_samples: dict[str, dict[str, Any]] = {}
    with _stop_explained(
        trainer,
        lambda: (
            f"while scoring {best} (training had finished): score it with "
            f"python -m distill.evaluate --ckpt {best} --split val, and --split test"
        ),
    ):
        if not best.is_file():
            best = run_dir / "checkpoints" / "last.ckpt"
            rank_zero_info(
                f"note: no best.ckpt in {run_dir} (training stopped at step {trainer.global_step} before its "
                "first validation, or started from another run's checkpoint and never beat its score): the "
                f"final weights are scored, saved as {best}"
            )
            trainer.validate(model, datamodule=data, verbose=False)  # chooses the thresholds test uses
            trainer.save_checkpoint(best)
        trainer.validate(model, datamodule=data, ckpt_path=str(best), verbose=False)
        reports["val"], overlay_samples["val"] = model.results["val"], model.overlay_samples
        trainer.test(model, datamodule=data, ckpt_path=str(best), verbose=False)
        reports["test"], overlay_samples["test"] = model.results["test"], model.overlay_samples
    if not trainer.is_global_zero:
        return reports

    params = count_parameters(model.student)
    pictures = {}
    for split, report in reports.items():
        written = write_outputs(run_dir, report, params, best, overlay_samples[split], suffix=f"_{split}")
        pictures.update(
            {f"{split}/{kind}": written[kind] for kind in ("curves", "overlays") if kind in written}
        )
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


@contextmanager
def _stop_explained(trainer: pl.Trainer, where: Callable[[], str]) -> Iterator[None]:
    """Exit 143 on SIGTERM and 130 on Ctrl-C, saying `where()` (what was stopped and what to run next).

    Lightning ends a trainer call stopped by SIGTERM with a SystemExit without a code ("success" to
    schedulers) and one stopped by Ctrl-C with exit status 1.
    """
    try:
        yield
    except SystemExit as stop:
        sigterm = isinstance(stop, SIGTERMException)
        if not (sigterm or trainer.interrupted):
            raise
        how = "SIGTERM" if sigterm else "Ctrl-C"
        print(f"error: stopped by {how} {where()}", file=sys.stderr)
        raise SystemExit(128 + (signal.SIGTERM if sigterm else signal.SIGINT)) from stop


@reports_user_errors
def _command_line(args: list[str] | None = None) -> int:
    """`python -m distill.fit`: a mistake in the config prints `error: ...` and exits 2."""
    main(args)
    return 0


if __name__ == "__main__":
    sys.exit(_command_line())
