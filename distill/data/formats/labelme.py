"""`labelme`: one LabelMe JSON per image, anywhere under the root.

Shapes become vessel pixels by the same pixel-centre rule as polygons: polygon, rectangle and
oriented_rectangle are filled, circle (centre + a point on the circle) covers the centres within its
radius, and line / linestrip cover the centres within line_width / 2 of the polyline (a union of
capsules, exact). A mask shape (LabelMe >= 5.5, its AI-mask tool: `points` = the inclusive box
[[x1, y1], [x2, y2]], `mask` = a base64 PNG of that box) is pasted at its box, as LabelMe itself
does. Points have no area and are ignored (counted in a warning). `imagePath` is relative to the
JSON; embedded `imageData` is used when present. id = the JSON path under the root without extension.
"""

from __future__ import annotations

import base64
import binascii
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from distill.data.dataset import (
    DatasetWarning,
    Entry,
    VesselDataset,
    check_polygon,
    describe_files,
    inside,
    read_json,
    register_format,
)
from distill.data.images import read_binary_mask
from distill.data.rasterize import as_vertices, rasterize_polygons
from distill.data.splits import SPLIT_FILE
from distill.errors import ConfigError, DatasetError

AREA_FREE_SHAPES = ("point", "points")
SUPPORTED_SHAPES = "polygon, rectangle, oriented_rectangle, circle, line, linestrip, mask or point"


def checked_vertices(points: Any, owner: Path, where: str, kind: str, counts: range) -> np.ndarray:
    """(N, 2) finite vertices of a shape whose point count must lie in `counts`."""
    try:
        vertices = as_vertices(points)
    except (ValueError, TypeError) as error:
        raise DatasetError(owner, f"{where}: {kind} points are not (x, y) pairs ({error})") from None
    if len(vertices) not in counts:
        needs = f"{counts.start}" if len(counts) == 1 else f"at least {counts.start}"
        raise DatasetError(owner, f"{where}: {kind} has {len(vertices)} points, needs {needs}")
    if not np.isfinite(vertices).all():
        raise DatasetError(owner, f"{where}: {kind} has non-finite coordinates (NaN or infinity)")
    return vertices


def parse_shape(shape: Any, owner: Path, where: str) -> dict[str, Any] | None:
    """A LabelMe shape -> {"type": polygon|circle|line|mask, "points": flat float64 array (and "mask",
    the base64 PNG of a mask shape)}; None for a point."""
    if not isinstance(shape, dict) or not isinstance(shape.get("points"), list):
        raise DatasetError(owner, f"{where}: a shape needs a 'points' list")
    kind = shape.get("shape_type") or "polygon"
    points = shape["points"]
    if kind in AREA_FREE_SHAPES:
        return None
    if kind in ("polygon", "oriented_rectangle") or (kind == "rectangle" and len(points) != 2):
        return {"type": "polygon", "points": check_polygon(points, owner, where)}
    if kind == "rectangle":
        (x1, y1), (x2, y2) = checked_vertices(points, owner, where, kind, range(2, 3)).tolist()
        return {"type": "polygon", "points": np.array([x1, y1, x2, y1, x2, y2, x1, y2])}
    if kind in ("circle", "line"):
        return {
            "type": kind,
            "points": checked_vertices(points, owner, where, kind, range(2, 3)).ravel(),
        }
    if kind == "linestrip":
        vertices = checked_vertices(points, owner, where, kind, range(2, 1 << 30))
        return {"type": "line", "points": vertices.ravel()}
    if kind == "mask":
        box = checked_vertices(points, owner, where, kind, range(2, 3)).ravel()
        if not isinstance(shape.get("mask"), str) or not shape["mask"]:
            raise DatasetError(owner, f"{where}: a mask shape needs 'mask', a base64 PNG of its box")
        return {"type": "mask", "points": box, "mask": shape["mask"]}
    raise DatasetError(owner, f"{where}: unsupported shape_type {kind!r}", f"use {SUPPORTED_SHAPES}")


def paste_mask(mask: np.ndarray, shape: dict[str, Any], owner: Path) -> None:
    """Set the pixels of a mask shape's PNG, pasted with its top-left at the box's first corner.

    As LabelMe's own `shapes_to_label`: the corner is rounded, the PNG's own size wins over the box,
    and what falls outside the image is clipped.
    """
    try:
        png = base64.b64decode(shape["mask"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise DatasetError(owner, f"a mask shape's 'mask' is not valid base64 ({error})") from None
    patch = read_binary_mask(owner, png)
    x, y = np.round(shape["points"][:2]).astype(int)
    height, width = mask.shape
    top, bottom = max(y, 0), min(y + patch.shape[0], height)
    left, right = max(x, 0), min(x + patch.shape[1], width)
    if top < bottom and left < right:
        mask[top:bottom, left:right] |= patch[top - y : bottom - y, left - x : right - x]


def draw_circle(mask: np.ndarray, points: list[float]) -> None:
    """Set the pixels whose centres lie within the circle through points[2:4] centred on points[0:2]."""
    cx, cy, px, py = points
    radius = float(np.hypot(px - cx, py - cy))
    draw_near(mask, np.array([[cx, cy]]), radius)


def draw_near(mask: np.ndarray, polyline: np.ndarray, radius: float) -> None:
    """Set the pixels whose centres lie within `radius` of the polyline (N, 2) (N = 1: of a point)."""
    height, width = mask.shape
    segments = (
        zip(polyline, polyline[1:], strict=False) if len(polyline) > 1 else [(polyline[0], polyline[0])]
    )
    for a, b in segments:
        lo, hi = np.minimum(a, b) - radius, np.maximum(a, b) + radius
        cols = np.arange(max(int(np.floor(lo[0])), 0), min(int(np.ceil(hi[0])) + 1, width))
        rows = np.arange(max(int(np.floor(lo[1])), 0), min(int(np.ceil(hi[1])) + 1, height))
        if not len(cols) or not len(rows):
            continue
        px, py = np.meshgrid(cols + 0.5, rows + 0.5)
        d = b - a
        length2 = float(d @ d)
        t = (
            np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1]) / length2, 0, 1)
            if length2
            else np.zeros_like(px)
        )
        near = (px - a[0] - t * d[0]) ** 2 + (py - a[1] - t * d[1]) ** 2 <= radius**2
        mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] |= near.astype(np.uint8)


@register_format("labelme")
class LabelmeDataset(VesselDataset):
    layout = "LabelMe JSON files (one per image, with 'shapes' and 'imagePath' or 'imageData') under the root"

    def read_index(
        self, line_width: float = 3.0, label_filter: str | Iterable[str] | None = None
    ) -> tuple[list[Entry], list[DatasetError]]:
        if not line_width > 0:
            raise ConfigError(f"line_width must be a positive number of pixels, got {line_width!r}")
        keep = {label_filter} if isinstance(label_filter, str) else set(label_filter or ())
        entries, problems = [], []
        not_labelme, points_ignored, labels_seen = [], Counter(), Counter()
        for path in sorted(self.root.rglob("*.json")):
            if path == self.root / SPLIT_FILE or any(
                p.startswith(".") for p in path.relative_to(self.root).parts
            ):
                continue
            try:
                data = read_json(path)
                if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
                    not_labelme.append(path)
                    continue
                entry = self.read_one(path, data, line_width, keep, labels_seen, points_ignored)
            except DatasetError as error:
                problems.append(error)
                continue
            entries.append(entry)
        if keep and not any(labels_seen[label] for label in keep) and entries:
            raise ConfigError(
                f"label_filter {sorted(keep)} matches no shape under {self.root}; labels there: {sorted(map(str, labels_seen))}"
            )
        if not_labelme:
            warnings.warn(
                f"{self.root}: ignored {len(not_labelme)} JSON files without LabelMe 'shapes' "
                f"({describe_files(not_labelme, self.root)})",
                DatasetWarning,
                stacklevel=2,
            )
        if points_ignored:
            warnings.warn(
                f"{self.root}: ignored {sum(points_ignored.values())} point shapes (they have no area) in "
                f"{len(points_ignored)} files ({describe_files(points_ignored, self.root)})",
                DatasetWarning,
                stacklevel=2,
            )
        return entries, problems

    def read_one(
        self,
        path: Path,
        data: dict,
        line_width: float,
        keep: set[str],
        labels_seen: Counter,
        points_ignored: Counter,
    ) -> Entry:
        shapes = []
        for n, shape in enumerate(data["shapes"]):
            label = shape.get("label") if isinstance(shape, dict) else None
            labels_seen[label] += 1
            if keep and label not in keep:
                continue
            parsed = parse_shape(shape, path, f"shape {n} ({label})")
            if parsed is None:
                points_ignored[path] += 1
            else:
                shapes.append(parsed)
        embedded = isinstance(data.get("imageData"), str) and bool(data["imageData"])
        if embedded:
            image = path
        elif isinstance(data.get("imagePath"), str):
            image = inside(self.root, path.parent, data["imagePath"], path)
            if not image.is_file():
                raise DatasetError(path, f"image {image} (imagePath) is missing and there is no imageData")
        else:
            raise DatasetError(path, "has neither 'imagePath' nor 'imageData'")
        height, width = data.get("imageHeight"), data.get("imageWidth")
        size = (height, width) if isinstance(height, int) and isinstance(width, int) else None
        return Entry(
            id=path.relative_to(self.root).with_suffix("").as_posix(),
            image=image,
            annotation={"shapes": shapes, "line_width": float(line_width), "embedded": embedded},
            size=size,
            index_file=path,
        )

    def embedded_image(self, entry: Entry) -> bytes | None:
        if not entry.annotation["embedded"]:
            return None
        try:
            return base64.b64decode(read_json(entry.image)["imageData"], validate=True)
        except (binascii.Error, ValueError) as error:
            raise DatasetError(entry.image, f"imageData is not valid base64 ({error})") from None

    def draw_mask(self, entry: Entry, height: int, width: int) -> np.ndarray:
        shapes = entry.annotation["shapes"]
        mask, _ = rasterize_polygons([s["points"] for s in shapes if s["type"] == "polygon"], height, width)
        radius = entry.annotation["line_width"] / 2
        for shape in shapes:
            if shape["type"] == "circle":
                draw_circle(mask, shape["points"])
            elif shape["type"] == "line":
                draw_near(mask, as_vertices(shape["points"]), radius)
            elif shape["type"] == "mask":
                paste_mask(mask, shape, entry.origin)
        return mask

    def vertices(self, entry: Entry) -> Iterable[np.ndarray]:
        return (
            as_vertices(s["points"])[: 1 if s["type"] == "circle" else None]
            for s in entry.annotation["shapes"]
        )
