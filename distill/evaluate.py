"""Evaluate a trained student on a split, beside the teacher: `python -m distill.evaluate --ckpt PATH`.

    python -m distill.evaluate --ckpt students/demo/checkpoints/best.ckpt --split test
    python -m distill.evaluate --ckpt ... --split test --threshold-from val   # re-choose on val first
    python -m distill.evaluate --ckpt ... --split test --threshold 0.4        # a fixed operating point
    python -m distill.evaluate --ckpt ... --views d4                          # also over the 8 D4 views
    python -m distill.evaluate compare students/run_a students/run_b          # runs side by side

Data, cache, precision and test-time views default to the run's own `config.yaml` (beside
`checkpoints/`), so a checkpoint is evaluated on what it was trained against, and gives the numbers
`fit` reported, unless flags say otherwise (`--data-format`, `--data-root`, `--reader-option K=V`,
`--cache-dir`: the names `cache_teacher` uses; `--precision`, `--views`). A path flag given `None` or
`null` (a W&B agent's null) means no path, as in `distill.fit`: `--cache-dir None` scores the student
without the teacher, `--out None` writes where it would by default. Writes `metrics.json` (the
contract in docs/DESIGN.md), `per_image.csv`, `curves.png`, `overlays.png` (as `fit` writes them,
`distill.report.write_outputs`) and `report.md` that ties them together.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from distill.cache import teacher_differences
from distill.cli import (
    add_deprecated_alias,
    key_value,
    optional_path,
    probability,
    reports_user_errors,
    views_flag,
)
from distill.errors import CacheError, ConfigError
from distill.report import LABELS, WHO

THRESHOLD_SOURCES = ("ckpt", "val")
# Data options a run's config.yaml may hold that VesselDataModule no longer takes. Each changed only
# how fast batches were made, never which: dropped when a run is scored again.
REMOVED_DATA_OPTIONS = ("gil_switch_interval",)


def run_config(ckpt: Path) -> dict[str, Any]:
    """The resolved config.yaml that `distill.fit` saved beside the checkpoint's folder, if any."""
    path = ckpt.resolve().parent.parent / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def build_datamodule(ckpt: Path, overrides: dict[str, Any]) -> Any:
    """VesselDataModule from the run's data config, with `overrides` (data_root, cache_dir...) in place of
    the run's settings; `cache_dir: None` scores without the teacher.

    `overrides["reader_options"]` is merged key by key into the run's reader options, which are
    dropped when `data_format` names another format than the run's (they were that reader's).
    """
    from distill.data.datamodule import VesselDataModule

    data = dict(run_config(ckpt).get("data") or {})
    overrides = dict(overrides)
    if overrides.get("data_format", data.get("data_format")) != data.get("data_format"):
        data["reader_options"] = {}
    reader_options = {**(data.get("reader_options") or {}), **overrides.pop("reader_options", {})}
    data.update(overrides)
    if reader_options:
        data["reader_options"] = reader_options
    if "data_root" not in data:
        raise ConfigError(
            f"{ckpt}: no config.yaml beside the run to take the data from; pass --data-format and --data-root"
        )
    data.setdefault("num_workers", 0)
    for option in REMOVED_DATA_OPTIONS:  # in the config.yaml of older runs
        data.pop(option, None)
    return VesselDataModule(**data)


def evaluate(
    ckpt: str | Path,
    split: str = "test",
    out: str | Path | None = None,
    threshold: float | None = None,
    threshold_from: str = "ckpt",
    data_overrides: dict[str, Any] | None = None,
    accelerator: str = "auto",
    views: list[str] | None = None,
    precision: str | None = None,
) -> dict[str, Any]:
    """Run the student (and the cached teacher) over `split`; write the report files; return metrics.

    `views` (view names, `d4` = all 8) also scores the student averaged over them ("student_views"); its
    threshold is the run's when fit used the same `model.test_views`, else it is chosen on val first.
    `precision` is a Lightning precision ("32-true", "bf16-mixed"); default: the run's trainer.precision.
    """

    from distill.metrics import DEFAULT_THRESHOLDS
    from distill.module import DistillModule
    from distill.report import write_outputs
    from distill.students import count_parameters, load_student

    ckpt = Path(ckpt)
    if split not in ("val", "test"):
        raise ConfigError(f"--split {split!r}: evaluate takes val or test (train batches are augmented)")
    if threshold_from not in THRESHOLD_SOURCES:
        raise ConfigError(f"--threshold-from {threshold_from!r}: choose from {THRESHOLD_SOURCES}")
    _, info = load_student(ckpt)  # refuses foreign checkpoints with a clear message
    grid = sorted(
        set(info.get("thresholds") or DEFAULT_THRESHOLDS) | ({threshold} if threshold is not None else set())
    )
    overrides: dict[str, Any] = {"thresholds": tuple(grid)}
    if views:
        overrides["test_views"] = views
    model = DistillModule.load_from_checkpoint(str(ckpt), map_location="cpu", **overrides)
    data = build_datamodule(ckpt, data_overrides or {})
    trainer = evaluation_trainer(
        accelerator, precision or (run_config(ckpt).get("trainer") or {}).get("precision") or "32-true"
    )
    with cache_fix_in_evaluate_flags():
        score_split(trainer, model, data, split, threshold, threshold_from)
    report, samples = model.results[split], model.overlay_samples
    if threshold is not None:
        report["chosen_threshold"]["rule"] = f"fixed {threshold}"

    out = Path(out) if out else ckpt.resolve().parent.parent / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    written = write_outputs(out, report, count_parameters(model.student), ckpt, samples)
    written["report"] = write_report_md(out / "report.md", report, ckpt, "overlays" in written)
    print(f"wrote {out}/: {', '.join(path.name for path in written.values())}")
    return report


def forget_another_teachers_threshold(model: Any, data: Any) -> None:
    """Drop the checkpoint's teacher threshold when the cache scored now holds another teacher (or
    other views of it) than the one the run chose it for, so that it is chosen on val again."""
    recorded, current = model.scored_teacher, data.scored_teacher()
    if model.teacher_threshold is None or recorded is None or current is None:
        return  # nothing to compare (checkpoints from before the record, or no teacher)
    differences = [line.split(":")[0] for line in teacher_differences(recorded, current)]
    if differences:
        print(
            f"note: {data.cache_dir} is not the teacher the run chose its teacher threshold for "
            f"(differs in {', '.join(differences[:4])}{', ...' if len(differences) > 4 else ''}): "
            "the teacher's threshold is chosen on val",
            flush=True,
        )
        model.teacher_threshold = None


def score_split(
    trainer: Any, model: Any, data: Any, split: str, threshold: float | None, threshold_from: str
) -> None:
    """Fill `model.results[split]`: at `threshold`, or at the checkpoint's thresholds (a side it has none
    for, such as views or a teacher the run did not score, chosen on val first), or with
    `threshold_from="val"` at thresholds chosen on val."""
    if threshold is not None:
        model.chosen_threshold = model.teacher_threshold = model.views_threshold = float(threshold)
        model.freeze_thresholds = True  # validation scores at it instead of choosing
    elif threshold_from == "ckpt":
        forget_another_teachers_threshold(model, data)
        model.freeze_thresholds = True  # validation keeps these, choosing only the missing ones
        unchosen = (model.test_views and model.views_threshold is None) or (
            data.has_teacher and model.teacher_threshold is None
        )
        if split == "test" and unchosen:
            trainer.validate(model, datamodule=data, verbose=False)
    elif split == "test":
        trainer.validate(model, datamodule=data, verbose=False)  # chooses every side's threshold on val
    if split == "val":
        trainer.validate(model, datamodule=data, verbose=False)
    else:
        trainer.test(model, datamodule=data, verbose=False)


@contextmanager
def cache_fix_in_evaluate_flags() -> Iterator[None]:
    """A teacher cache that does not fit the data (new --data-root, say) names fit's and cache_teacher's
    settings in its fix; add evaluate's own: --cache-dir, or --cache-dir None for no teacher."""
    try:
        yield
    except CacheError as err:
        raise CacheError(
            f"{err}\nevaluate: --cache-dir DIR takes the teacher cache made for these data, "
            "--cache-dir None scores the student without the teacher"
        ) from err


def evaluation_trainer(accelerator: str, precision: str | int) -> Any:
    """A one-device Lightning Trainer that logs and saves nothing. Lightning refusing `--precision` or
    `--accelerator` (an unknown name, a GPU this machine lacks) is the user's to fix: a ConfigError
    naming both flags, with Lightning's list of what it takes."""
    import lightning.pytorch as pl
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return pl.Trainer(
            accelerator=accelerator,
            precision=precision,
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
    except (ValueError, ImportError, MisconfigurationException) as err:
        raise ConfigError(f"--precision {precision} --accelerator {accelerator}: {err}") from err


def write_report_md(path: Path, report: dict[str, Any], ckpt: Path, overlays: bool) -> Path:
    """report.md: the table, the pictures and the five images with the lowest student Dice."""
    from distill.report import format_table

    student = report["per_image_dice"]["student"]
    ids = report.get("per_image_ids") or [f"#{i}" for i in range(len(student))]
    worst = sorted(zip(student, ids, strict=True))[:5]
    lines = [
        f"# Evaluation of `{ckpt}` on {report['split']}",
        "",
        "```",
        format_table(report),
        "```",
        "",
        "![threshold curves](curves.png)",
        "",
        *(["![image | ground truth | teacher | student](overlays.png)", ""] if overlays else []),
        "Lowest student Dice (per image, at the chosen threshold):",
        "",
        "| id | student Dice |",
        "|---|---|",
        *[f"| {image_id} | {dice:.4f} |" for dice, image_id in worst],
        "",
        "Files: `metrics.json` (the contract in docs/DESIGN.md), `per_image.csv`.",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def measure_latency(ckpt: Path, size: int, repeats: int = 7) -> list[float]:
    """Seconds for one image of size x size through the student (batch 1) on this machine, once per
    repeat after a warm-up call, sorted."""
    import torch

    from distill.students import load_student

    device = "cuda" if torch.cuda.is_available() else "cpu"
    student, _ = load_student(ckpt, map_location=device)
    image = torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, device=device)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            student(image)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times[1:])


def format_latency(seconds: list[float]) -> str:
    """`median (min-max)` in ms, e.g. `12.3 (11.9-13.0)`: one timing hides how much they vary."""
    ms = [1000 * t for t in seconds]
    return f"{ms[len(ms) // 2]:.1f} ({ms[0]:.1f}-{ms[-1]:.1f})"


def compare(run_dirs: list[Path], out: Path | None, latency_size: int = 512) -> str:
    """Markdown table: each run's student and teacher at their chosen thresholds and at 0.5."""
    rows = []
    for run in run_dirs:
        metrics_path = next(
            (run / n for n in ("metrics_test.json", "metrics_val.json") if (run / n).is_file()), None
        )
        if metrics_path is None:
            raise ConfigError(
                f"{run}: no metrics_test.json or metrics_val.json; is it a distill.fit run directory?"
            )
        m = json.loads(metrics_path.read_text())
        half = min(range(len(m["thresholds"])), key=lambda i: abs(m["thresholds"][i] - 0.5))
        row = {"run": run.name, "split": m["split"], "params (M)": f"{m['student_params'] / 1e6:.2f}"}
        for who in WHO:
            if who not in m:
                continue
            at, label = m["at_chosen"][who], LABELS[who]
            row[f"{label} thr"] = f"{m['chosen_threshold'][who]:.2f}"
            row[f"{label} dice"] = f"{at['dice']:.4f}"
            row[f"{label} recall"] = f"{at['recall']:.4f}"
            row[f"{label} dice@0.5"] = f"{m[who]['dice'][half]:.4f}"
            row[f"{label} recall@0.5"] = f"{m[who]['recall'][half]:.4f}"
        ckpt = Path(m["checkpoint"]) if m.get("checkpoint") else None
        row[f"latency {latency_size}² ms, median (min-max) of 7"] = (
            format_latency(measure_latency(ckpt, latency_size)) if ckpt and ckpt.is_file() else "n/a"
        )
        rows.append(row)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    table = "\n".join(lines) + "\n"
    if out:
        out.write_text(table)
    return table


@reports_user_errors
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        parser = argparse.ArgumentParser(
            prog="python -m distill.evaluate compare", description="Compare finished runs side by side."
        )
        parser.add_argument("runs", nargs="+", type=Path, help="run directories (students/<run>)")
        parser.add_argument(
            "--out", type=optional_path, default=None, help="also write the table here (Markdown)"
        )
        parser.add_argument("--latency-size", type=int, default=512, help="image side for the latency column")
        args = parser.parse_args(argv[1:])
        print(compare(args.runs, args.out, args.latency_size))
        return 0

    parser = argparse.ArgumentParser(
        prog="python -m distill.evaluate",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[1:7]),
    )
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint written by distill.fit")
    parser.add_argument(
        "--split", default="test", choices=["val", "test"], help="split to evaluate (default test)"
    )
    parser.add_argument(
        "--out", type=optional_path, default=None, help="output folder (default <run>/eval_<split>)"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--threshold", type=probability, default=None, help="fixed threshold (0-1) for student and teacher"
    )
    group.add_argument(
        "--threshold-from",
        default="ckpt",
        choices=THRESHOLD_SOURCES,
        help="ckpt: the threshold frozen on validation during fit (default); val: choose again on val now",
    )
    parser.add_argument("--data-format", default=None, help="dataset format (default: the run's config)")
    parser.add_argument(
        "--data-root", type=optional_path, default=None, help="dataset directory (default: the run's config)"
    )
    parser.add_argument(
        "--reader-option", dest="reader_options", action="append", type=key_value, default=[], metavar="K=V",
        help="dataset reader option, value read as YAML (repeatable; merged over the run's own, which "
        "are dropped when --data-format names another format)",
    )  # fmt: skip
    cache_dir = parser.add_argument(
        "--cache-dir",
        type=optional_path,
        default=argparse.SUPPRESS,
        help="teacher cache directory (default: the run's config); None scores the student without the teacher",
    )
    add_deprecated_alias(parser, "--cache", cache_dir)
    parser.add_argument("--batch-size", type=int, default=None, help="evaluation batch size")
    parser.add_argument("--accelerator", default="auto", help="auto, cpu or gpu")
    parser.add_argument(
        "--precision", default=None, help="32-true, bf16-mixed, ... (default: the run's trainer.precision)"
    )
    parser.add_argument(
        "--views",
        type=views_flag,
        default=None,
        help="also score the student over these test-time views (d4 = all 8; default: the run's model.test_views)",
    )
    args = parser.parse_args(argv)
    given = {"data_format": args.data_format, "data_root": args.data_root, "batch_size": args.batch_size}
    overrides = {key: value for key, value in given.items() if value is not None}
    overrides["reader_options"] = dict(args.reader_options)
    if "cache_dir" in args:  # given, None included: no teacher
        overrides["cache_dir"] = args.cache_dir
    report = evaluate(
        args.ckpt,
        args.split,
        args.out,
        args.threshold,
        args.threshold_from,
        overrides,
        args.accelerator,
        args.views,
        args.precision,
    )
    from distill.report import format_table

    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
