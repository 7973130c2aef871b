"""metrics.json (the contract in DESIGN.md) and the side-by-side threshold table printed after fit/evaluate."""

from __future__ import annotations

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
