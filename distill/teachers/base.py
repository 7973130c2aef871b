"""The teacher protocol and its registry by name (the timm/smp pattern)."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from distill.registry import Registry

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
