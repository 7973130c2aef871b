"""Discrete views of an image (the dihedral group D4) and their inverses.

A teacher is run on `apply_view(image, v)`; `invert_view(logits, v)` maps its output back to the
original orientation, which is how the cache stores every view. Training can then average the
views, or take view `v` when augmentation sampled the same flip/rotation. All act on axes (0, 1),
so HxW maps and HxWxC images are treated alike.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

VIEWS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda a: a,
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "rot90": lambda a: np.rot90(a, 1, axes=(0, 1)),
    "rot180": lambda a: np.rot90(a, 2, axes=(0, 1)),
    "rot270": lambda a: np.rot90(a, 3, axes=(0, 1)),
    "transpose": lambda a: np.swapaxes(a, 0, 1),
    "antitranspose": lambda a: np.rot90(np.swapaxes(a, 0, 1), 2, axes=(0, 1)),
}
# Every view is its own inverse except the two quarter turns.
_INVERSE = {name: name for name in VIEWS} | {"rot90": "rot270", "rot270": "rot90"}


def check_views(names: list[str]) -> list[str]:
    """Validate view names (from a CLI flag or config); returns them or raises ValueError."""
    unknown = [n for n in names if n not in VIEWS]
    if unknown:
        raise ValueError(f"unknown view(s) {unknown}; choose from {sorted(VIEWS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"views repeat: {names}")
    return names


def apply_view(array: np.ndarray, name: str) -> np.ndarray:
    """Apply view `name` to an HxW or HxWxC array; returns a contiguous copy."""
    return np.ascontiguousarray(VIEWS[name](array))


def invert_view(array: np.ndarray, name: str) -> np.ndarray:
    """Undo `apply_view(., name)`: maps a teacher's output on the view back to the original frame."""
    return np.ascontiguousarray(VIEWS[_INVERSE[name]](array))
