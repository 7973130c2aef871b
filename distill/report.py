"""A split's outputs, written the same way by `fit` and `evaluate`: metrics JSON (the contract in
docs/DESIGN.md), per-image CSV, pictures, and the side-by-side threshold table printed after both.

A report scores up to three sides at every threshold: the teacher (its cached logits), the student, and
the student averaged over test-time views (`student_views`, with `model.test_views` or `--views`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

WHO = ("student", "student_views", "teacher")  # the sides a report scores, in metrics JSON/CSV order
SHOWN = ("teacher", "student", "student_views")  # their order in the table and the overlay pictures
LABELS = {"teacher": "teacher", "student": "student", "student_views": "student+views"}
KD_MARGIN_WARNING = 0.01  # a teacher less than 1 Dice point better than its student: KD rarely pays

CONTRACT_KEYS = (
    "split",
    "n_images",
    "thresholds",
    "student",
    "chosen_threshold",
    "at_chosen",
    "student_params",
    "checkpoint",
)


def write_metrics(
    path: str | Path, report: dict[str, Any], student_params: int, checkpoint: str | Path | None
) -> Path:
    """Write one split's report as metrics JSON, atomically (a reader never sees half a file)."""
    body = {
        **report,
        "student_params": int(student_params),
        "checkpoint": None if checkpoint is None else str(checkpoint),
    }
    missing = [key for key in CONTRACT_KEYS if key not in body]
    if missing:
        raise ValueError(f"metrics report for {path} lacks {missing}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def write_per_image(path: str | Path, report: dict[str, Any]) -> Path:
    """id, has_vessels, then each side's Dice at its chosen threshold: one row per image, split order."""
    per_image = report["per_image_dice"]
    ids = report.get("per_image_ids") or [f"#{i}" for i in range(report["n_images"])]
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "has_vessels", *[f"{who}_dice" for who in per_image]])
        for i, image_id in enumerate(ids):
            row = [
                image_id,
                int(report["per_image_has_vessels"][i]),
                *[per_image[who][i] for who in per_image],
            ]
            writer.writerow(row)
    return path


def write_outputs(
    out_dir: str | Path,
    report: dict[str, Any],
    student_params: int,
    checkpoint: str | Path | None,
    overlay_samples: dict[str, Any] | None = None,
    suffix: str = "",
) -> dict[str, Path]:
    """One split's files in `out_dir`: metrics{suffix}.json, per_image{suffix}.csv, curves{suffix}.png
    and, given samples, overlays{suffix}.png. Returns {"metrics", "per_image", "curves", "overlays"}
    -> path (fit uses suffix "_val"/"_test" in the run directory, evaluate "" in eval_<split>/)."""
    from distill.viz import plot_curves, plot_overlays

    out_dir = Path(out_dir)
    written = {
        "metrics": write_metrics(out_dir / f"metrics{suffix}.json", report, student_params, checkpoint),
        "per_image": write_per_image(out_dir / f"per_image{suffix}.csv", report),
        "curves": plot_curves(report, out_dir / f"curves{suffix}.png"),
    }
    if overlay_samples:
        written["overlays"] = plot_overlays(overlay_samples, report, out_dir / f"overlays{suffix}.png")
    return written


def kd_margin(report: dict[str, Any]) -> float | None:
    """Teacher minus student Dice, each at its own chosen threshold (None without a teacher).

    On validation this is the room KD has: a teacher barely better than its student has little to teach.
    """
    at = report["at_chosen"]
    if "teacher" not in at or "student" not in at:
        return None
    return round(at["teacher"]["dice"] - at["student"]["dice"], 6)


def format_table(report: dict[str, Any]) -> str:
    """Threshold | Dice, recall of teacher, student (and student+views); `*` marks each side's choice.

    Ends with each side at its chosen threshold, the KD margin and, on validation, a warning when the
    teacher is less than KD_MARGIN_WARNING better than the student.
    """
    chosen = report["chosen_threshold"]
    sides = [who for who in SHOWN if who in report]
    header = f"{'threshold':>9}  " + "  ".join(f"{LABELS[who]} dice {'recall':>7}" for who in sides)
    lines = [
        f"{report['split']} ({report['n_images']} images, rule {chosen['rule']}; * = chosen threshold)",
        header,
    ]
    for i, t in enumerate(report["thresholds"]):
        row = f"{t:>9.2f}  "
        for who in sides:
            mark = "*" if math.isclose(chosen.get(who, -1), t) else " "
            width = len(f"{LABELS[who]} dice") - 1
            row += f"{report[who]['dice'][i]:>{width}.4f}{mark} {report[who]['recall'][i]:>7.4f}  "
        lines.append(row.rstrip())
    for who in sides:
        at = report["at_chosen"][who]
        lines.append(
            f"{LABELS[who]:>13} @ {chosen[who]:.2f}: dice {at['dice']:.4f}  recall {at['recall']:.4f}  "
            f"precision {at['precision']:.4f}"
        )
    if "student_views" in report:
        gain = report["at_chosen"]["student_views"]["dice"] - report["at_chosen"]["student"]["dice"]
        lines.append(f"views ({','.join(report.get('test_views', []))}) add {gain:+.4f} Dice to the student")
    margin = kd_margin(report)
    if margin is not None:
        lines.append(f"KD margin (teacher - student Dice at their own chosen thresholds): {margin:+.4f}")
        if report["split"] == "val" and margin < KD_MARGIN_WARNING:
            short = (
                "worse than"
                if margin < 0
                else f"less than {100 * KD_MARGIN_WARNING:.0f} Dice point better than"
            )
            lines.append(
                f"warning: the teacher is {short} the student on val: KD is unlikely to help. Make the "
                "teacher better first (an ensemble of checkpoints with views: scripts/train_ensemble.sh)."
            )
    return "\n".join(lines)
