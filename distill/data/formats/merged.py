"""`merged`: Sa2VA's fine-tuning format, annotations.json + images/.

annotations.json is a list of {"image": "name.jpg", "mask": [[[x1, y1, ...]], ...], "text": [...]}:
each mask a list of polygons, all masks of an image united. Older files give `mask` as a flat list of
polygons and `text` as one string; both are accepted. id = the image path under images/ without extension.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.data.dataset import Entry, VesselDataset, check_polygon, inside, read_json, register_format
from distill.errors import DatasetError


def polygons_of(mask: Any, owner: Path, where: str) -> list[list[float]]:
    """Flat polygons of a `mask` field in either form: [[poly, ...], ...] (per mask) or [poly, ...]."""
    if not isinstance(mask, list):
        raise DatasetError(owner, f"{where}: 'mask' must be a list of polygons, got {type(mask).__name__}")
    nested = any(isinstance(element, list) and element and isinstance(element[0], list) for element in mask)
    groups = mask if nested else [mask]
    polygons = []
    for g, group in enumerate(groups):
        if not isinstance(group, list):
            raise DatasetError(owner, f"{where}: mask {g} must be a list of polygons")
        for p, polygon in enumerate(group):
            polygons.append(check_polygon(polygon, owner, f"{where}, mask {g}, polygon {p}"))
    return polygons


def first_text(text: Any) -> str | None:
    if isinstance(text, list):
        text = next((t for t in text if isinstance(t, str)), None)
    return text if isinstance(text, str) else None


@register_format("merged")
class MergedDataset(VesselDataset):
    layout = "annotations.json (a list of {'image', 'mask', 'text'}) and images/ under the root"

    def read_index(self) -> tuple[list[Entry], list[DatasetError]]:
        index = self.root / "annotations.json"
        if not index.exists():
            raise DatasetError(index, "not found", f"a merged dataset needs {self.layout}")
        records = read_json(index)
        if not isinstance(records, list):
            raise DatasetError(index, f"must hold a list of annotations, got {type(records).__name__}")
        images = self.root / "images"
        entries, problems = [], []
        for n, record in enumerate(records):
            where = f"annotation {n}"
            try:
                if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                    raise DatasetError(index, f"{where}: needs an 'image' path (a string)")
                where = f"annotation {n} ({record['image']})"
                image = inside(self.root, images, record["image"], index)
                if not image.is_relative_to(images):
                    raise DatasetError(index, f"{where}: image path leaves images/", "keep images in images/")
                if not image.is_file():
                    raise DatasetError(index, f"{where}: image {image} is missing")
                polygons = polygons_of(record.get("mask", []), index, where)
            except DatasetError as error:
                problems.append(error)
                continue
            entries.append(
                Entry(
                    id=image.relative_to(images).with_suffix("").as_posix(),
                    image=image,
                    annotation={"polygons": polygons},
                    text=first_text(record.get("text")),
                )
            )
        return entries, problems
