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
