"""A model trained by `distill.fit` as a teacher: one checkpoint, or several as an ensemble.

Lets a user distil from what they trained (a large UNet, an ensemble) and lets the whole loop run
without Sa2VA. Checkpoints are read with `distill.students.load_student` (weights only, no
arbitrary unpickling). Ensemble members and test-time views are averaged in LOGIT space.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.errors import ConfigError
from distill.teachers.base import Teacher, register_teacher
from distill.views import expand_views, mean_over_views


def file_sha256(path: str | Path) -> str:
    """Identity of a checkpoint by content, so a cache notices a retrained file with the same name."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@register_teacher("checkpoint")
class CheckpointTeacher(Teacher):
    """Mean logits of one or more `distill.fit` checkpoints over test-time views.

    checkpoints: a path or a list of paths. tta: view names (distill.views; `d4` = all 8) whose outputs
    are mapped back and averaged. devices: GPU ids (the first is used); default: cuda:0 when present, else CPU.
    On CUDA the forward runs under bf16 autocast with channels_last memory.
    """

    name = "checkpoint"

    def __init__(
        self,
        checkpoints: str | Sequence[str],
        tta: str | Sequence[str] = ("identity",),
        batch_size: int = 8,
        devices: Sequence[int] | None = None,
    ):
        from distill.students import load_student

        paths = (
            [Path(checkpoints)] if isinstance(checkpoints, (str, Path)) else [Path(p) for p in checkpoints]
        )
        if not paths:
            raise ConfigError("teacher option checkpoints: give at least one distill.fit checkpoint path")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ConfigError(f"teacher option checkpoints: no such file(s) {missing}")
        self.tta = expand_views(tta)
        self.batch_size = int(batch_size)
        if torch.cuda.is_available():
            self.device = torch.device("cuda", devices[0] if devices else 0)
        else:
            self.device = torch.device("cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.paths = paths
        self.sha256 = [file_sha256(p) for p in paths]
        self.models = []
        for path in paths:
            model, _ = load_student(str(path), map_location="cpu")
            model = model.to(self.device).eval()
            if self.device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            self.models.append(model)

    @torch.inference_mode()
    def _forward(self, batch: np.ndarray) -> np.ndarray:
        """uint8 [B,H,W,3] -> float32 [B,H,W] mean logits of the ensemble over the views."""
        images = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)
        memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        total = None
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda"):
            for model in self.models:
                # float before the mean: bf16 sums of 8 views would lose what averaging gains
                forward = lambda x, model=model: model(x.contiguous(memory_format=memory_format)).float()  # noqa: E731
                logits = mean_over_views(forward, images, self.tta)
                total = logits if total is None else total + logits
        return (total / len(self.models))[:, 0].cpu().numpy()

    def predict_logits(
        self, images: Sequence[np.ndarray], texts: Sequence[str | None] | None = None
    ) -> list[np.ndarray]:
        """Batches images of equal shape together."""
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(images)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        for indices in by_shape.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                logits = self._forward(np.stack([images[i] for i in chunk]))
                for i, logit in zip(chunk, logits, strict=True):
                    out[i] = logit
        return out

    def fingerprint(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": 1,
            "checkpoints_sha256": self.sha256,
            "tta": self.tta,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def close(self) -> None:
        self.models.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
