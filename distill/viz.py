"""Pictures of a run: threshold curves (student vs teacher) and an overlay grid of predictions (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from distill.report import LABELS, WHO  # noqa: E402

FN_COLOUR = (1.0, 0.15, 0.15)  # missed vessel
FP_COLOUR = (0.2, 0.5, 1.0)  # vessel that is not there
TP_COLOUR = (1.0, 1.0, 1.0)


def plot_curves(report: dict[str, Any], path: str | Path) -> Path:
    """Dice, recall and precision against threshold, chosen thresholds marked: student solid, teacher
    dashed, student over test-time views dotted."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    thresholds = report["thresholds"]
    colours = {"dice": "tab:green", "recall": "tab:red", "precision": "tab:blue"}
    for who, style in (("student", "-"), ("teacher", "--"), ("student_views", ":")):
        if who not in report:
            continue
        for name, colour in colours.items():
            ax.plot(thresholds, report[who][name], style, color=colour, label=f"{LABELS[who]} {name}")
        ax.axvline(report["chosen_threshold"][who], linestyle=style, color="grey", linewidth=0.8)
    ax.set(
        xlabel="threshold",
        ylabel="score",
        ylim=(0, 1.02),
        title=f"{report['split']}: student (solid) vs teacher (dashed)"
        + (", student+views (dotted)" if "student_views" in report else ""),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def error_overlay(prob: np.ndarray, mask: np.ndarray, roi: np.ndarray, threshold: float) -> np.ndarray:
    """RGB picture of a thresholded prediction: true positives white, false negatives red, false positives blue."""
    predicted, truth = (prob >= threshold) & roi, (mask > 0) & roi
    picture = np.zeros((*prob.shape, 3), dtype=np.float32)
    picture[predicted & truth] = TP_COLOUR
    picture[truth & ~predicted] = FN_COLOUR
    picture[predicted & ~truth] = FP_COLOUR
    return picture


def plot_overlays(samples: dict[str, torch.Tensor], thresholds: dict[str, float], path: str | Path) -> Path:
    """Grid, one row per image: image | ground truth | teacher | student [| student+views] (errors coloured
    at each one's threshold)."""
    columns = ["image", "ground truth"] + [who for who in WHO if who in samples]
    n = samples["image"].shape[0]
    fig, axes = plt.subplots(n, len(columns), figsize=(2.6 * len(columns), 2.6 * n), dpi=100, squeeze=False)
    for row in range(n):
        roi = samples["roi"][row, 0].numpy() > 0
        mask = samples["mask"][row, 0].numpy()
        pictures = [samples["image"][row].permute(1, 2, 0).numpy(), mask]
        for who in columns[2:]:
            prob = samples[who][row, 0].float().numpy()
            pictures.append(error_overlay(prob, mask, roi, thresholds[who]))
        for col, (ax, picture) in enumerate(zip(axes[row], pictures, strict=True)):
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                name = columns[col]
                title = f"{LABELS[name]} @ {thresholds[name]:.2f}" if name in thresholds else name
                ax.set_title(title, fontsize=9)
    fig.suptitle("white: hit   red: missed (FN)   blue: false alarm (FP)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
