"""The teacher protocol and its registry by name (the timm/smp pattern)."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distill.registry import Registry
from distill.views import apply_view

_REGISTRY = Registry("teacher")
# Modules that define teachers; imported lazily so that `import distill.teachers` stays cheap
# and a teacher's heavy dependencies (transformers, bitsandbytes) load only when it is used.
_TEACHER_MODULES = {
    "frangi": "distill.teachers.frangi",
    "checkpoint": "distill.teachers.checkpoint",
    "sa2va": "distill.teachers.sa2va",
}


class Teacher(ABC):
    """Turns a batch of images into per-pixel logits at each image's own resolution.

    Logits, not probabilities or binary masks: distillation and threshold tuning need the soft
    output. `fingerprint()` says what made the logits (weights identity, prompt, dtype, code
    version...) so that a cache can refuse to mix outputs of different teachers.
    """

    name: str = "teacher"

    def fit(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:  # noqa: B027
        """Calibrate on the train split's ground truth, if the teacher needs it (default: nothing)."""

    @abstractmethod
    def predict_logits(
        self, images: Sequence[np.ndarray], texts: Sequence[str | None] | None = None
    ) -> list[np.ndarray]:
        """HxWx3 uint8 RGB images -> float32 HxW logit maps, one per image, same size as the image.

        A teacher that produced no mask for an image returns None in that place (see `sa2va`).
        """

    @property
    def views_in_one_pass(self) -> bool:
        """True when `predict_views` shares work between the views of one image (sa2va's `sam2_views`: the
        LLM runs once, SAM2 per view); the caching pipeline then hands it each image unviewed, with its
        views. False (default): the pipeline applies the views and calls `predict_logits`."""
        return False

    def predict_views(
        self,
        images: Sequence[np.ndarray],
        views: Sequence[Sequence[str]],
        texts: Sequence[str | None] | None = None,
    ) -> list[list[np.ndarray | None]]:
        """Logits of image i seen through each of `views[i]` (names in `distill.views`), in one call.

        Returns [image][view] maps in the *viewed* frame (map back with `invert_view`), None where the
        teacher gave no mask. The default applies the views and calls `predict_logits` once for all.
        """
        pairs = [(i, view) for i, image_views in enumerate(views) for view in image_views]
        outputs = self.predict_logits(
            [apply_view(images[i], view) for i, view in pairs],
            None if texts is None else [texts[i] for i, _ in pairs],
        )
        per_image: list[list[np.ndarray | None]] = [[] for _ in images]
        for (i, _), logits in zip(pairs, outputs, strict=True):
            per_image[i].append(logits)
        return per_image

    @abstractmethod
    def fingerprint(self) -> dict[str, Any]:
        """JSON-serialisable identity of this teacher: change any field and old caches are stale."""

    @property
    def needs_fit(self) -> bool:
        """True when `fit` must run on ground truth before `predict_logits` is meaningful."""
        return False

    def restore_fit(self, fingerprint: dict[str, Any]) -> bool:
        """Take back what `fit` learned from a `fingerprint()` of this teacher that a cache recorded, so
        that resuming or growing that cache goes on with the same fitted teacher without fitting again
        (a grown train split would fit another one). False (the default): nothing to take back."""
        return False

    def stats(self) -> dict[str, Any]:
        """Run statistics worth a line in the caching summary (default: none; sa2va: self-check agreement)."""
        return {}

    def close(self) -> None:  # noqa: B027
        """Release devices and memory (default: nothing)."""


def register_teacher(name: str) -> Callable[[Callable[..., Teacher]], Callable[..., Teacher]]:
    """Class decorator: make a teacher constructible by `create_teacher(name, **options)`."""

    return _REGISTRY.register(name)


def list_teachers() -> list[str]:
    """Names accepted by `create_teacher`."""
    return sorted(set(_REGISTRY) | set(_TEACHER_MODULES))


def teacher_factory(name: str) -> Callable[..., Teacher]:
    """The factory registered as `name` (importing a built-in teacher's module on first use)."""
    if name not in _REGISTRY and name in _TEACHER_MODULES:
        importlib.import_module(_TEACHER_MODULES[name])
    if name not in _REGISTRY:
        raise ValueError(f"unknown teacher {name!r}; choose from {list_teachers()}")
    return _REGISTRY[name]


def create_teacher(name: str, **options: Any) -> Teacher:
    """Build a teacher by registered name with its own options."""
    return teacher_factory(name)(**options)
