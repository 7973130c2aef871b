"""Discrete views of an image (the dihedral group D4) and their inverses.

A teacher is run on `apply_view(image, v)`; `invert_view(logits, v)` maps its output back to the
original orientation, which is how the cache stores every view. Training can then average the
views, or take view `v` when augmentation sampled the same flip/rotation. All act on axes (0, 1),
so HxW maps and HxWxC images are treated alike. `d4` names all 8 views (`expand_views`).

Students and checkpoint teachers are scored over views in torch (`mean_over_views`, `ViewMean`):
`TENSOR_VIEWS` are the same moves on the last two axes of a tensor, made of flips and transposes
so that an ONNX export folds them into the graph.

`VIEWS` defines each view in numpy; OpenCV does the same moves 5-15x faster on the arrays it can hold
(a strided numpy copy of a 512x512x3 rotation takes ~1.1 ms, ~0.1 ms in OpenCV), which matters in
DataLoader workers that apply a view to every sample. The tests check both give identical arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import cv2
import numpy as np
from torch import Tensor, nn

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
VIEW_GROUPS = {"d4": tuple(VIEWS)}  # names that stand for several views

TENSOR_VIEWS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda t: t,
    "hflip": lambda t: t.flip(-1),
    "vflip": lambda t: t.flip(-2),
    "rot90": lambda t: t.transpose(-2, -1).flip(-2),
    "rot180": lambda t: t.flip(-2, -1),
    "rot270": lambda t: t.transpose(-2, -1).flip(-1),
    "transpose": lambda t: t.transpose(-2, -1),
    "antitranspose": lambda t: t.transpose(-2, -1).flip(-2, -1),
}

_OPENCV: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "hflip": lambda a: cv2.flip(a, 1),
    "vflip": lambda a: cv2.flip(a, 0),
    "rot90": lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
    "rot180": lambda a: cv2.rotate(a, cv2.ROTATE_180),
    "rot270": lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    "transpose": cv2.transpose,
    "antitranspose": lambda a: cv2.flip(cv2.transpose(a), -1),
}
_OPENCV_DTYPES = {
    np.dtype(t)
    for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float16, np.float32, np.float64)
}


def check_views(names: list[str]) -> list[str]:
    """Validate view names (from a CLI flag or config); returns them or raises ValueError."""
    unknown = [n for n in names if n not in VIEWS]
    if unknown:
        raise ValueError(f"unknown view(s) {unknown}; choose from {sorted(VIEWS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"views repeat: {names}")
    return names


def same_views(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether `a` and `b` name the same views: their logit mean, and so a threshold chosen for it, does
    not depend on their order (views never repeat, see `check_views`)."""
    return set(a) == set(b)


def expand_views(names: str | Sequence[str]) -> list[str]:
    """View names from a flag or config (`"d4"`, `"identity,hflip"`, `["hflip", "vflip"]`) -> checked names.

    `d4` stands for all 8 views. Raises ValueError for an unknown or repeated name.
    """
    parts = names.split(",") if isinstance(names, str) else list(names)
    expanded = [view for part in parts for view in VIEW_GROUPS.get(part.strip(), [part.strip()])]
    return check_views([view for view in expanded if view])


def mean_over_views(forward: Callable[[Tensor], Tensor], images: Tensor, views: Sequence[str]) -> Tensor:
    """Logit-space mean of `forward` over `views` of `images` [N, C, H, W], each output mapped back.

    Returns what `forward` returns for the images themselves ([N, K, H, W]); H != W is fine.
    """
    total = None
    for view in views:
        logits = TENSOR_VIEWS[_INVERSE[view]](forward(TENSOR_VIEWS[view](images)))
        total = logits if total is None else total + logits
    if total is None:
        raise ValueError("mean_over_views needs at least one view")
    return total / len(views)


class ViewMean(nn.Module):
    """`model` averaged over test-time views in logit space: what `export --views` puts in the ONNX graph."""

    def __init__(self, model: nn.Module, views: Sequence[str]):
        super().__init__()
        self.model = model
        self.views = tuple(check_views(list(views)))

    def forward(self, images: Tensor) -> Tensor:
        return mean_over_views(self.model, images, self.views)


def apply_view(array: np.ndarray, name: str) -> np.ndarray:
    """Apply view `name` to an HxW or HxWxC array; returns a C-contiguous array."""
    if (
        array.size  # OpenCV returns None for an empty array
        and name in _OPENCV
        and array.dtype in _OPENCV_DTYPES
        and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] <= 4))
    ):
        out = _OPENCV[name](array)
        return out.reshape(*out.shape[:2], *array.shape[2:])  # OpenCV drops a trailing channel axis of 1
    return np.ascontiguousarray(VIEWS[name](array))


@functools.cache
def view_matrix(name: str, side: int) -> np.ndarray:
    """The 3x3 affine map of pixel coordinates (x, y, 1) in a `side` x `side` square (side >= 2) to their
    place in `apply_view(square, name)`. Read off `VIEWS` itself (on broadcast index arrays, no copy), so
    the two cannot disagree; a warp can then fold the view into its matrix instead of moving pixels first."""
    rows = np.broadcast_to(np.arange(side)[:, None], (side, side))
    cols = np.broadcast_to(np.arange(side), (side, side))
    xs, ys = VIEWS[name](cols), VIEWS[name](rows)  # the view's pixel (y', x') comes from (ys, xs)[y', x']
    reads = np.array(
        [
            [xs[0, 1] - xs[0, 0], xs[1, 0] - xs[0, 0], xs[0, 0]],
            [ys[0, 1] - ys[0, 0], ys[1, 0] - ys[0, 0], ys[0, 0]],
            [0, 0, 1],
        ],
        dtype=np.float64,
    )
    matrix = np.linalg.inv(reads)
    matrix.flags.writeable = False  # cached: shared by every caller
    return matrix


def invert_view(array: np.ndarray, name: str) -> np.ndarray:
    """Undo `apply_view(., name)`: maps a teacher's output on the view back to the original frame."""
    return apply_view(array, _INVERSE[name])
