"""Test-only teachers, loaded with `python -m distill.cache_teacher --import tests._slow_teacher`,
and a tiny student checkpoint for the checkpoint teacher.

This is also the example of the plugin mechanism: any importable module that registers a teacher.
Import it only under this name (tests._slow_teacher): a second import would register twice.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from distill.students import create_student
from distill.teachers import Teacher, register_teacher


def save_tiny_student(path, seed: int) -> torch.nn.Module:
    """A randomly initialised ~0.3M-parameter UNet saved as a distill.fit checkpoint; returns the model."""
    torch.manual_seed(seed)
    student = create_student(
        "unet",
        encoder="tu-mobilenetv3_small_050",
        encoder_weights=None,
        encoder_depth=3,
        decoder_channels=[16, 8, 8],
    )
    info = {
        "format_version": 1,
        "student": student.config,
        "chosen_threshold": 0.5,
        "threshold_rule": "max_dice",
    }
    torch.save(
        {"state_dict": {f"student.{k}": v for k, v in student.state_dict().items()}, "distill": info}, path
    )
    return student.eval()


@register_teacher("pixel")
class PixelTeacher(Teacher):
    """Per-pixel logits from the green channel (dark = vessel), so every view maps back to the same
    map exactly; `delay` seconds per call make a run slow enough to kill midway."""

    name = "pixel"

    def __init__(self, delay: float = 0.0):
        self.delay = float(delay)

    def predict_logits(
        self, images: Sequence[np.ndarray], texts: Sequence[str | None] | None = None
    ) -> list[np.ndarray]:
        time.sleep(self.delay)
        return [(128.0 - image[..., 1].astype(np.float32)) / 32.0 for image in images]

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "version": 1}  # delay does not change the logits


@register_teacher("calibrated")
class CalibratedTeacher(PixelTeacher):
    """`pixel` plus what sa2va and frangi bring to the pipeline: a fit on ground truth (an offset,
    which a rerun takes back from the cache), and a self-check in `stats()` whose agreement is None
    when no pixel was checked. `no_mask=true` gives no map for any image; `forbid_work=true` makes
    `fit` and `predict_logits` raise, so a test sees that the teacher was never asked to work."""

    name = "calibrated"

    def __init__(self, delay: float = 0.0, no_mask: bool = False, forbid_work: bool = False):
        super().__init__(delay)
        self.no_mask, self.forbid_work = bool(no_mask), bool(forbid_work)
        self.offset: float | None = None
        self.pixels_checked = 0

    @property
    def needs_fit(self) -> bool:
        return True

    def _work(self, what: str) -> None:
        if self.forbid_work:
            raise RuntimeError(f"calibrated teacher: {what} was called (forbid_work=true)")

    def fit(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
        self._work("fit")
        self.offset = round(float(np.mean([mask.mean() for mask in masks])), 6)

    def restore_fit(self, fingerprint: dict[str, Any]) -> bool:
        if fingerprint.get("name") != self.name or fingerprint.get("offset") is None:
            return False
        self.offset = fingerprint["offset"]
        return True

    def predict_logits(
        self, images: Sequence[np.ndarray], texts: Sequence[str | None] | None = None
    ) -> list[np.ndarray | None]:
        self._work("predict_logits")
        if self.no_mask:
            return [None] * len(images)
        maps = [m + np.float32(self.offset) for m in super().predict_logits(images, texts)]
        self.pixels_checked += sum(m.size for m in maps)
        return maps

    def fingerprint(self) -> dict[str, Any]:
        return {"name": self.name, "version": 1, "no_mask": self.no_mask, "offset": self.offset}

    def stats(self) -> dict[str, Any]:
        checked = self.pixels_checked
        return {"pixels_checked": checked, "agreement": 1.0 if checked else None, "worst_image_mismatch": 0.0}
