"""Exact polygon rasterization.

Convention (the COCO one): pixel (row i, column j) is the unit square [j, j+1) x [i, i+1), and it is
inside a polygon when its centre (j + 0.5, i + 0.5) is, by the even-odd rule. That makes a polygon
drawn one pixel wide around a centre line come out one pixel wide, which thin vessels need.
Vertices outside the image are kept as they are (the fill is clipped, not the geometry, so the
result is exact) and counted, so that readers can warn about them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def as_vertices(polygon: Sequence[float] | np.ndarray) -> np.ndarray:
    """A flat [x1, y1, x2, y2, ...] list or an (N, 2) array -> float64 (N, 2) array of (x, y)."""
    points = np.asarray(polygon, dtype=np.float64)
    if points.ndim == 1:
        if points.size % 2:
            raise ValueError(f"a flat polygon needs an even number of coordinates, got {points.size}")
        points = points.reshape(-1, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"a polygon must be flat [x1, y1, ...] or (N, 2), got shape {points.shape}")
    return points


def count_outside(points: np.ndarray, height: int, width: int) -> int:
    """How many vertices lie outside the image rectangle [0, width] x [0, height]."""
    x, y = points[:, 0], points[:, 1]
    return int(np.count_nonzero((x < 0) | (x > width) | (y < 0) | (y > height)))


def polygon_spans(points: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows and [start, stop) columns of the pixel runs whose centres lie inside polygon `points` (N, 2)."""
    empty = np.zeros(0, dtype=np.int64)
    if len(points) < 3:
        return empty, empty, empty
    x0, y0 = points[:, 0], points[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    # Rows whose centre line y = i + 0.5 can cross the polygon.
    row_lo = max(int(np.ceil(y0.min() - 0.5)), 0)
    row_hi = min(int(np.floor(y0.max() - 0.5)), height - 1)
    if row_hi < row_lo:
        return empty, empty, empty
    ys = np.arange(row_lo, row_hi + 1, dtype=np.float64) + 0.5
    # Half-open edge rule: an edge counts for the rows with min(y0, y1) <= y < max(y0, y1),
    # so a vertex on a scan line is counted once and horizontal edges never.
    ylo, yhi = np.minimum(y0, y1), np.maximum(y0, y1)
    crosses = (ys[:, None] >= ylo[None, :]) & (ys[:, None] < yhi[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (ys[:, None] - y0[None, :]) / (y1 - y0)[None, :]
    xs = np.where(crosses, x0[None, :] + t * (x1 - x0)[None, :], np.inf)
    xs.sort(axis=1)
    xs = xs[:, : 2 * (crosses.sum(axis=1).max() // 2)]  # crossings per row are even; inf pads the rest
    enter, leave = xs[:, 0::2], xs[:, 1::2]
    valid = np.isfinite(leave)
    rows = np.broadcast_to(np.arange(row_lo, row_hi + 1)[:, None], enter.shape)[valid]
    # Pixel j is inside a span [a, b) when a <= j + 0.5 < b.
    starts = np.clip(np.ceil(enter[valid] - 0.5), 0, width).astype(np.int64)
    stops = np.clip(np.ceil(leave[valid] - 0.5), 0, width).astype(np.int64)
    return rows, starts, stops


def rasterize_polygons(
    polygons: Iterable[Sequence[float] | np.ndarray], height: int, width: int
) -> tuple[np.ndarray, int]:
    """Union of filled polygons as an HxW uint8 0/1 mask, and the number of vertices outside the image."""
    # Every run adds +1 at its start and -1 at its stop; a pixel is covered where the running sum
    # along its row is positive, which is the union of all polygons in one pass.
    edges = np.zeros((height, width + 1), dtype=np.int32)
    outside = 0
    for polygon in polygons:
        points = as_vertices(polygon)
        outside += count_outside(points, height, width)
        rows, starts, stops = polygon_spans(points, height, width)
        np.add.at(edges, (rows, starts), 1)
        np.add.at(edges, (rows, stops), -1)
    return (np.cumsum(edges[:, :width], axis=1) > 0).astype(np.uint8), outside
