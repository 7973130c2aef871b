"""Frangi vesselness as a teacher: classical, weight-free, CPU-only (the embedded default).

Vesselness is a score, not a logit, so a 1-D logistic regression on the train split's ground truth
maps `log(vesselness + eps)` to calibrated logits: `logit = slope * feature + intercept`.
The fitted (slope, intercept) are part of the fingerprint, so a re-fit invalidates old caches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from skimage.filters import frangi

from distill.teachers.base import Teacher, register_teacher

_CHANNELS = ("green", "grey")


def fit_logistic_1d(
    x: np.ndarray, y: np.ndarray, iterations: int = 50, ridge: float = 1e-6
) -> tuple[float, float]:
    """Maximum-likelihood (slope, intercept) of P(y=1 | x) = sigmoid(slope * x + intercept) by Newton/IRLS.

    A tiny ridge keeps the Hessian invertible when the classes are (almost) separable.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if not 0 < y.sum() < y.size:
        raise ValueError("logistic fit needs both classes (vessel and background pixels) in the sample")
    design = np.stack([x, np.ones_like(x)], axis=1)
    theta = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ theta)))
        gradient = design.T @ (p - y) + ridge * theta
        hessian = (design * (p * (1 - p))[:, None]).T @ design + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


@register_teacher("frangi")
class FrangiTeacher(Teacher):
    """Multi-scale Frangi vesselness on one channel, mapped to logits by a 1-D logistic fit.

    black_ridges=True looks for dark tubes (vessels on the green channel of fundus photos and
    angiograms); channel="green" or "grey". `fit` must run before `predict_logits`.
    """

    name = "frangi"

    def __init__(
        self,
        sigmas: Sequence[float] = (1.0, 2.0, 3.0),
        black_ridges: bool = True,
        channel: str = "green",
        alpha: float = 0.5,
        beta: float = 0.5,
        gamma: float | None = None,
        eps: float = 1e-6,
        fit_pixels: int = 200_000,
        seed: int = 0,
    ):
        if channel not in _CHANNELS:
            raise ValueError(f"frangi option channel={channel!r}; choose from {list(_CHANNELS)}")
        if not sigmas or min(sigmas) <= 0:
            raise ValueError(f"frangi option sigmas={sigmas!r} must be a non-empty list of positive scales")
        self.sigmas = [float(s) for s in sigmas]
        self.black_ridges = bool(black_ridges)
        self.channel = channel
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), gamma
        self.eps = float(eps)
        self.fit_pixels = int(fit_pixels)
        self.seed = int(seed)
        self.slope: float | None = None
        self.intercept: float | None = None

    @property
    def needs_fit(self) -> bool:
        return True

    def feature(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> float32 HxW log-vesselness, the single feature of the logistic fit."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"frangi expects HxWx3 RGB images, got shape {image.shape}")
        if self.channel == "green":
            plane = image[..., 1].astype(np.float32) / 255.0
        else:
            plane = image.astype(np.float32).mean(axis=2) / 255.0
        vesselness = frangi(
            plane,
            sigmas=self.sigmas,
            alpha=self.alpha,
            beta=self.beta,
            gamma=self.gamma,
            black_ridges=self.black_ridges,
        )
        return np.log(vesselness.astype(np.float32) + np.float32(self.eps))

    def fit(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> None:
        """Fit (slope, intercept) on a seeded random subsample of all train pixels (no class balancing,
        so that the probabilities stay calibrated to the true vessel fraction)."""
        if len(images) == 0 or len(images) != len(masks):
            raise ValueError(
                f"frangi fit needs matching non-empty images and masks ({len(images)} vs {len(masks)})"
            )
        rng = np.random.default_rng(self.seed)
        per_image = max(1, self.fit_pixels // len(images))
        features, labels = [], []
        for image, mask in zip(images, masks, strict=True):
            feature = self.feature(image).ravel()
            take = rng.choice(feature.size, size=min(per_image, feature.size), replace=False)
            features.append(feature[take])
            labels.append(np.asarray(mask).ravel()[take] > 0)
        self.slope, self.intercept = fit_logistic_1d(np.concatenate(features), np.concatenate(labels))

    def restore_fit(self, fingerprint: dict[str, Any]) -> bool:
        """Take (slope, intercept) from a cached fingerprint of a frangi teacher; its other fields are
        compared by the cache, so a fit restored under other options is refused there."""
        fit = fingerprint.get("fit") if fingerprint.get("name") == self.name else None
        if not isinstance(fit, dict) or fit.get("slope") is None or fit.get("intercept") is None:
            return False
        self.slope, self.intercept = float(fit["slope"]), float(fit["intercept"])
        return True

    def predict_logits(
        self, images: Sequence[np.ndarray], texts: Sequence[str | None] | None = None
    ) -> list[np.ndarray]:
        if self.slope is None or self.intercept is None:
            raise RuntimeError(
                "frangi teacher is not fitted: call fit(images, masks) on the train split first "
                "(python -m distill.cache_teacher does this with --fit-split train)"
            )
        return [
            (np.float32(self.slope) * self.feature(image) + np.float32(self.intercept)).astype(np.float32)
            for image in images
        ]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": 1,
            "sigmas": self.sigmas,
            "black_ridges": self.black_ridges,
            "channel": self.channel,
            "alpha": self.alpha,
            "beta": self.beta,
            "gamma": self.gamma,
            "eps": self.eps,
            "fit": {
                "slope": self.slope,
                "intercept": self.intercept,
                "pixels": self.fit_pixels,
                "seed": self.seed,
            },
        }
