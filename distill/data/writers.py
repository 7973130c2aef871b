"""Write vessel samples in each dataset format the readers understand.

Why: the synthetic generator writes its data through the real formats so that the real reading path
(files -> polygons -> raster) is always exercised, and the round-trip tests can check every reader
against a known raster. One small writer class per format, chosen by name from `WRITERS`.

Writers stream: images are written as samples arrive (each file via a temporary name and
`os.replace`), and a format's index file (annotations.json) is written last, the same way, so a
killed run never leaves an index that looks valid for a partial set.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from distill.errors import ConfigError, DatasetError

JPEG_QUALITY = 95
CATEGORY = {"id": 1, "name": "vessel"}


class Sample(Protocol):
    """What a writer needs from a sample (e.g. `distill.synth.SynthSample`)."""

    id: str  # the file stem
    image: np.ndarray  # HxWx3 uint8 RGB
    mask: np.ndarray  # HxW uint8 0/1, the raster of `polygons`
    polygons: list[list[float]]  # flat [x1, y1, ...] lists, COCO pixel convention
    text: str


def replace_atomically(path: Path, write: Any) -> None:
    """Call `write(temporary_path)`, then move the result onto `path` in one step."""
    temporary = path.with_name(path.name + ".tmp")
    write(temporary)
    os.replace(temporary, path)


def save_image(path: Path, array: np.ndarray) -> None:
    """JPEG (quality 95, no chroma subsampling) or PNG by suffix; both are byte-deterministic in PIL."""
    image = Image.fromarray(array)
    if path.suffix == ".jpg":
        replace_atomically(path, lambda p: image.save(p, format="JPEG", quality=JPEG_QUALITY, subsampling=0))
    else:
        replace_atomically(path, lambda p: image.save(p, format="PNG"))


def save_json(path: Path, data: Any) -> None:
    def write(temporary: Path) -> None:
        temporary.write_text(json.dumps(data, separators=(",", ":")) + "\n")

    replace_atomically(path, write)


def rle_counts(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE: run lengths of the column-major flattened mask, starting with a run of zeros."""
    flat = mask.ravel(order="F").astype(bool)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *counts] if flat[0] else counts


def mask_bbox(mask: np.ndarray) -> list[float]:
    """[x, y, width, height] of the set pixels (COCO bbox), zeros for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]


class DatasetWriter:
    """Base: checks each sample, refuses duplicate ids; subclasses write files in `add` and indexes in `close`."""

    def __init__(self, root: Path):
        self.root = root
        self.ids: set[str] = set()

    def add(self, sample: Sample) -> None:
        if sample.id in self.ids:
            raise DatasetError(
                self.root, f"two samples share the id {sample.id!r}", "give every sample its own id"
            )
        image, mask = sample.image, sample.mask
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or mask.shape != image.shape[:2]:
            raise DatasetError(
                self.root / sample.id,
                f"sample needs an HxWx3 uint8 image and an HxW mask, got {image.shape} {image.dtype} and {mask.shape}",
            )
        self.ids.add(sample.id)
        self.write(sample)

    def write(self, sample: Sample) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Write the index file, if the format has one."""


class MergedWriter(DatasetWriter):
    """Sa2VA's format: images/ + annotations.json, one mask (all branch polygons) and one text per image."""

    def __init__(self, root: Path):
        super().__init__(root)
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.entries: list[dict] = []

    def write(self, sample: Sample) -> None:
        save_image(self.root / "images" / f"{sample.id}.jpg", sample.image)
        self.entries.append({"image": f"{sample.id}.jpg", "mask": [sample.polygons], "text": [sample.text]})

    def close(self) -> None:
        save_json(self.root / "annotations.json", self.entries)


class LabelmeWriter(DatasetWriter):
    """One LabelMe JSON beside each image (image first, JSON second), one polygon shape per branch."""

    def write(self, sample: Sample) -> None:
        height, width = sample.mask.shape
        save_image(self.root / f"{sample.id}.jpg", sample.image)
        shapes = [
            {
                "label": CATEGORY["name"],
                "points": np.asarray(polygon).reshape(-1, 2).tolist(),
                "group_id": None,
                "description": sample.text,
                "shape_type": "polygon",
                "flags": {},
            }
            for polygon in sample.polygons
        ]
        document = {
            "version": "5.4.1",
            "flags": {},
            "shapes": shapes,
            "imagePath": f"{sample.id}.jpg",
            "imageData": None,
            "imageHeight": height,
            "imageWidth": width,
        }
        save_json(self.root / f"{sample.id}.json", document)


class CocoWriter(DatasetWriter):
    """images/ + annotations.json with one annotation per image holding all its polygons (category 1, vessel)."""

    def __init__(self, root: Path):
        super().__init__(root)
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def segmentation(self, sample: Sample) -> tuple[Any, int]:
        """The annotation's segmentation and its iscrowd flag."""
        return sample.polygons, 0

    def write(self, sample: Sample) -> None:
        height, width = sample.mask.shape
        number = len(self.images) + 1
        save_image(self.root / "images" / f"{sample.id}.jpg", sample.image)
        self.images.append({"id": number, "file_name": f"{sample.id}.jpg", "height": height, "width": width})
        segmentation, iscrowd = self.segmentation(sample)
        self.annotations.append(
            {
                "id": number,
                "image_id": number,
                "category_id": CATEGORY["id"],
                "segmentation": segmentation,
                "area": float(sample.mask.sum()),
                "bbox": mask_bbox(sample.mask),
                "iscrowd": iscrowd,
            }
        )

    def close(self) -> None:
        document = {"images": self.images, "annotations": self.annotations, "categories": [CATEGORY]}
        save_json(self.root / "annotations.json", document)


class CocoRleWriter(CocoWriter):
    """COCO with the raster mask as uncompressed RLE (iscrowd 1, as COCO marks RLE) instead of polygons."""

    def segmentation(self, sample: Sample) -> tuple[Any, int]:
        return {"size": list(sample.mask.shape), "counts": rle_counts(sample.mask)}, 1


class MaskFolderWriter(DatasetWriter):
    """images/ (PNG) + masks/ (PNG 0/255) matched by stem, + roi/ when the sample carries a field of view."""

    def __init__(self, root: Path):
        super().__init__(root)
        for folder in ("images", "masks"):
            (root / folder).mkdir(parents=True, exist_ok=True)

    def write(self, sample: Sample) -> None:
        save_image(self.root / "images" / f"{sample.id}.png", sample.image)
        roi = getattr(sample, "roi", None)
        if roi is not None:
            (self.root / "roi").mkdir(exist_ok=True)
            save_image(self.root / "roi" / f"{sample.id}.png", np.where(roi, 255, 0).astype(np.uint8))
        # The mask last: an item without its mask is visibly unfinished, never a silently empty one.
        save_image(self.root / "masks" / f"{sample.id}.png", (sample.mask > 0).astype(np.uint8) * 255)


WRITERS: dict[str, type[DatasetWriter]] = {
    "merged": MergedWriter,
    "labelme": LabelmeWriter,
    "coco": CocoWriter,
    "coco_rle": CocoRleWriter,
    "mask_folder": MaskFolderWriter,
}


def write_dataset(root: str | Path, samples: Iterable[Sample], format: str = "merged") -> Path:
    """Write `samples` (any iterable, consumed once, streamed) under `root` in `format`; returns the root."""
    if format not in WRITERS:
        raise ConfigError(f"format={format!r} is unknown; choose one of {', '.join(WRITERS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    writer = WRITERS[format](root)
    for sample in samples:
        writer.add(sample)
    writer.close()
    return root
