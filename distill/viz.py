"""Pictures of a run: threshold curves (student vs teacher) and an overlay grid of predictions (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

FN_COLOUR = (1.0, 0.15, 0.15)  # missed vessel
FP_COLOUR = (0.2, 0.5, 1.0)  # vessel that is not there
TP_COLOUR = (1.0, 1.0, 1.0)
SIDES = (("student", "-"), ("teacher", "--"))  # line style of each side on the curves


def plot_curves(report: dict[str, Any], path: str | Path) -> Path:
    """Dice, recall and precision against threshold, student solid, teacher dashed, each side's
    chosen threshold a labelled vertical line; the legend sits right of the axes, off the curves."""
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=100)
    thresholds = report["thresholds"]
    colours = {"dice": "tab:green", "recall": "tab:red", "precision": "tab:blue"}
    for who, style in SIDES:
        if who not in report:
            continue
        for name, colour in colours.items():
            ax.plot(thresholds, report[who][name], style, color=colour, label=f"{who} {name}")
        chosen = report["chosen_threshold"][who]
        ax.axvline(chosen, linestyle=style, color="grey", linewidth=0.8)
        ax.annotate(
            f"{who} {chosen:.2f}",
            (chosen, 1.0),
            xytext=(3, -3),
            textcoords="offset points",
            rotation=90,
            va="top",
            fontsize=7,
            color="dimgrey",
        )
    rule = report["chosen_threshold"]["rule"]
    ax.set(
        xlabel="threshold (positive where prob >= threshold)",
        ylabel="score (pooled over the split)",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"{report['split']} ({report['n_images']} images): student solid, teacher dashed; "
        f"grey lines: chosen thresholds ({rule})",
    )
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.text(
        0.01,
        0.01,
        "precision = 1 where nothing is predicted (no false alarm); recall = 1 where there is no vessel",
        fontsize=7,
        color="dimgrey",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
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


def plot_overlays(samples: dict[str, Any], report: dict[str, Any], path: str | Path) -> Path:
    """Grid, one row per image (named by its id): image | ground truth | teacher | student, errors
    coloured at each side's chosen threshold; the colour key is a legend below the grid.

    `samples` are DistillModule.overlay_samples: the first images of the split's pass in loader
    order, which the title says.
    """
    thresholds = report["chosen_threshold"]
    columns = ["image", "ground truth"] + [who for who in ("teacher", "student") if who in samples]
    n = samples["image"].shape[0]
    ids = samples.get("id") or [f"#{row}" for row in range(n)]
    height = 2.6 * n + 0.6  # inches: the rows, and room for the title above and the key below
    fig, axes = plt.subplots(n, len(columns), figsize=(2.6 * len(columns), height), dpi=100, squeeze=False)
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
                ax.set_title(f"{name} @ {thresholds[name]:.2f}" if name in thresholds else name, fontsize=9)
        axes[row][0].set_ylabel(str(ids[row]), fontsize=8)
    fig.suptitle(
        f"{report['split']}: the first {n} of {report['n_images']} images in loader order", fontsize=9
    )
    key = [
        Patch(facecolor=TP_COLOUR, edgecolor="black", label="hit (TP)"),
        Patch(facecolor=FN_COLOUR, label="missed (FN)"),
        Patch(facecolor=FP_COLOUR, label="false alarm (FP)"),
    ]
    fig.legend(handles=key, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1 - 0.25 / height))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
