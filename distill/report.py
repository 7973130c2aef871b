"""A split's outputs, written the same way by `fit` and `evaluate`: metrics JSON (the contract in
docs/DESIGN.md), per-image CSV, pictures, and the side-by-side threshold table printed after both."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

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


def format_table(report: dict[str, Any]) -> str:
    """Threshold | teacher Dice, recall | student Dice, recall; `*` marks each side's chosen threshold."""
    chosen = report["chosen_threshold"]
    has_teacher = "teacher" in report
    header = f"{'threshold':>9}  " + (f"{'teacher dice':>12} {'recall':>7}  " if has_teacher else "")
    header += f"{'student dice':>12} {'recall':>7}"
    lines = [
        f"{report['split']} ({report['n_images']} images, rule {chosen['rule']}; * = chosen threshold)",
        header,
    ]
    for i, t in enumerate(report["thresholds"]):
        row = f"{t:>9.2f}  "
        for who in ("teacher", "student") if has_teacher else ("student",):
            mark = "*" if math.isclose(chosen.get(who, -1), t) else " "
            row += f"{report[who]['dice'][i]:>11.4f}{mark} {report[who]['recall'][i]:>7.4f}  "
        lines.append(row.rstrip())
    for who in ("teacher", "student") if has_teacher else ("student",):
        at = report["at_chosen"][who]
        lines.append(
            f"{who:>8} @ {chosen[who]:.2f}: dice {at['dice']:.4f}  recall {at['recall']:.4f}  precision {at['precision']:.4f}"
        )
    if has_teacher:
        gap = report["at_chosen"]["student"]["dice"] - report["at_chosen"]["teacher"]["dice"]
        lines.append(f"student - teacher dice at their own chosen thresholds: {gap:+.4f}")
    return "\n".join(lines)
