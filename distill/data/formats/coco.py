"""`coco`: a COCO instances file; the vessel mask is the union of the chosen categories' segmentations.

Images are found under `image_dir` when given, else under the root or root/images/. A Roboflow
export (train/ valid/ test/ folders, each with `_annotations.coco.json` beside its images) is read
as one dataset whose folders give the split; ids are then "<folder>/<stem>".
Segmentations may be polygons (a list of flat lists) or RLE, compressed (a `counts` string) or not (a
`counts` list); RLE is decoded here in numpy, in COCO's column-major order. Images without annotations
get an empty mask (a negative example). id = `file_name` without extension.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from distill.data.dataset import Entry, VesselDataset, check_polygon, inside, read_json, register_format
from distill.data.rasterize import rasterize_polygons
from distill.data.splits import SPLIT_FILE, SPLIT_FOLDERS
from distill.errors import ConfigError, DatasetError


def rle_counts(counts: str | list[int]) -> list[int]:
    """Run lengths of an RLE: a list as is, or decoded from COCO's compressed string (pycocotools' rleFrString)."""
    if not isinstance(counts, str):
        return list(counts)
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            chunk = ord(counts[position]) - 48
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """HxW uint8 0/1 mask of a COCO RLE {"size": [h, w], "counts": ...}; runs alternate 0/1, column-major."""
    height, width = rle["size"]
    runs = np.asarray(rle_counts(rle["counts"]), dtype=np.int64)
    if (runs < 0).any() or runs.sum() != height * width:
        raise ValueError(
            f"run lengths sum to {runs.sum()} (negative runs: {(runs < 0).any()}), not h*w = {height * width}"
        )
    values = np.arange(len(runs), dtype=np.int64) % 2
    return np.repeat(values.astype(np.uint8), runs).reshape(width, height).T.copy()


def check_segmentation(segmentation: Any, owner: Path, where: str) -> tuple[list[list[float]], list[dict]]:
    """(polygons, rles) of one annotation's `segmentation`, checked."""
    if isinstance(segmentation, list):
        return [check_polygon(p, owner, f"{where}, polygon {n}") for n, p in enumerate(segmentation)], []
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        good_size = (
            isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
        )
        good_counts = isinstance(counts, str) or (
            isinstance(counts, list) and all(isinstance(v, int) and v >= 0 for v in counts)
        )
        if good_size and good_counts:
            return [], [{"size": size, "counts": counts}]
        raise DatasetError(
            owner, f"{where}: RLE needs 'size' [h, w] and 'counts' (a string or a list of run lengths)"
        )
    raise DatasetError(owner, f"{where}: segmentation must be a list of polygons or an RLE dict")


def chosen_categories(
    categories: Any, wanted: Iterable[int | str] | int | str | None, owner: Path
) -> set | None:
    """Category ids to keep (None = all), from names or ids."""
    if wanted is None:
        return None
    wanted = [wanted] if isinstance(wanted, (int, str)) else list(wanted)
    known = {c["id"]: c.get("name") for c in categories or [] if isinstance(c, dict) and "id" in c}
    by_name = {name: cid for cid, name in known.items()}
    chosen, unknown = set(), []
    for value in wanted:
        if value in known:
            chosen.add(value)
        elif value in by_name:
            chosen.add(by_name[value])
        else:
            unknown.append(value)
    if unknown:
        raise ConfigError(
            f"categories {unknown} are not in {owner}; it has {sorted(known.items())} (id, name)"
        )
    return chosen


def coco_files(folder: Path) -> list[Path]:
    """The *.json files directly in `folder` that may be its COCO file (our splits.json is not)."""
    return sorted(p for p in folder.glob("*.json") if p.name != SPLIT_FILE)


@register_format("coco")
class CocoDataset(VesselDataset):
    layout = (
        "a COCO json (annotations.json, or the one *.json at the root) with 'images' and 'annotations', "
        "or train/ valid/ test/ folders each holding one (a Roboflow export)"
    )

    def find_annotation_file(self, folder: Path) -> Path:
        default = folder / "annotations.json"
        if default.exists():
            return default
        candidates = coco_files(folder)
        if len(candidates) != 1:
            found = [p.name for p in candidates] or "none"
            raise DatasetError(
                folder, f"cannot tell the COCO annotation file (found {found})", "pass annotation_file"
            )
        return candidates[0]

    def parts(
        self, annotation_file: str | Path | None, image_dir: str | Path | None
    ) -> list[tuple[Path, list[Path], str | None]]:
        """(COCO file, folders its file_names are looked up in, split folder or None) of each part.

        A root without a COCO file of its own whose train/ valid/ (or val/) test/ folders each hold one
        (Roboflow's export: `_annotations.coco.json` beside the images) is one dataset whose folders
        give the split, as with mask_folder. Without `image_dir`, file names are looked up beside the
        COCO file's folder, then in its images/ (both are common); `image_dir` is relative to that folder.
        """

        def image_dirs(folder: Path) -> list[Path]:
            return [folder / image_dir] if image_dir is not None else [folder, folder / "images"]

        if annotation_file is not None:
            path = Path(annotation_file)
            return [(path if path.is_absolute() else self.root / path, image_dirs(self.root), None)]
        split_dirs = [name for name in SPLIT_FOLDERS if coco_files(self.root / name)]
        if split_dirs and not coco_files(self.root):
            return [
                (self.find_annotation_file(self.root / name), image_dirs(self.root / name), name)
                for name in split_dirs
            ]
        siblings = [name for name in SPLIT_FOLDERS if coco_files(self.root.parent / name)]
        if self.root.name in siblings and len(siblings) > 1:
            raise DatasetError(
                self.root,
                f"is the {self.root.name}/ folder of an export split into {', '.join(siblings)} folders, "
                "each with its own COCO file",
                f"use {self.root.parent} as the dataset root to read it whole with its splits, or pass "
                "annotation_file to read this folder alone",
            )
        return [(self.find_annotation_file(self.root), image_dirs(self.root), None)]

    def read_index(
        self,
        annotation_file: str | Path | None = None,
        image_dir: str | Path | None = None,
        categories: Iterable[int | str] | int | str | None = None,
    ) -> tuple[list[Entry], list[DatasetError]]:
        entries: list[Entry] = []
        problems: list[DatasetError] = []
        for index, image_dirs, folder in self.parts(annotation_file, image_dir):
            self.read_part(index, image_dirs, folder, categories, entries, problems)
        return entries, problems

    def read_part(
        self,
        index: Path,
        image_dirs: list[Path],
        folder: str | None,
        categories: Iterable[int | str] | int | str | None,
        entries: list[Entry],
        problems: list[DatasetError],
    ) -> None:
        """Add the entries (and problems) of one COCO file; ids are "<folder>/<stem>" in a split folder."""
        data = read_json(index)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DatasetError(index, "not a COCO file: needs an 'images' list (and 'annotations')")
        keep = chosen_categories(data.get("categories"), categories, index)

        images: dict[Any, dict] = {}
        for n, image in enumerate(data["images"]):
            if (
                not isinstance(image, dict)
                or "id" not in image
                or not isinstance(image.get("file_name"), str)
            ):
                problems.append(DatasetError(index, f"images[{n}]: needs 'id' and 'file_name'"))
            elif image["id"] in images:
                problems.append(DatasetError(index, f"images[{n}]: image id {image['id']} is used twice"))
                images[image["id"]]["bad"] = True
            else:
                images[image["id"]] = {"info": image, "polygons": [], "rles": [], "bad": False}

        for n, annotation in enumerate(data.get("annotations") or []):
            image = images.get(annotation.get("image_id")) if isinstance(annotation, dict) else None
            if image is None:
                problems.append(DatasetError(index, f"annotations[{n}]: image_id is not in 'images'"))
                continue
            if keep is not None and annotation.get("category_id") not in keep:
                continue
            where = f"annotations[{n}] (image {image['info']['file_name']})"
            try:
                polygons, rles = check_segmentation(annotation.get("segmentation"), index, where)
            except DatasetError as error:
                problems.append(error)
                image["bad"] = True
                continue
            image["polygons"] += polygons
            image["rles"] += rles

        for image in images.values():
            if image["bad"]:
                continue
            info = image["info"]
            try:
                tried = [inside(self.root, base, info["file_name"], index) for base in image_dirs]
                path = next((p for p in tried if p.is_file()), None)
                if path is None:
                    raise DatasetError(
                        index,
                        f"image {info['file_name']!r} (image id {info['id']}) is missing: not at "
                        + " or ".join(map(str, tried)),
                        "set the image_dir option if images live elsewhere",
                    )
            except DatasetError as error:
                problems.append(error)
                continue
            height, width = info.get("height"), info.get("width")
            stem = Path(info["file_name"].replace("\\", "/")).with_suffix("").as_posix()
            entries.append(
                Entry(
                    id=f"{folder}/{stem}" if folder else stem,
                    image=path,
                    annotation={"polygons": image["polygons"], "rles": image["rles"]},
                    size=(height, width) if isinstance(height, int) and isinstance(width, int) else None,
                    split=SPLIT_FOLDERS[folder] if folder else None,
                    index_file=index,
                )
            )

    def draw_mask(self, entry: Entry, height: int, width: int) -> np.ndarray:
        mask, _ = rasterize_polygons(entry.annotation["polygons"], height, width)
        for rle in entry.annotation["rles"]:
            if tuple(rle["size"]) != (height, width):
                raise DatasetError(
                    entry.origin,
                    f"RLE of {entry.image.name} is {rle['size'][0]}x{rle['size'][1]}, image is {height}x{width}",
                )
            try:
                mask |= rle_decode(rle)
            except ValueError as error:
                raise DatasetError(entry.origin, f"RLE of {entry.image.name} is corrupt ({error})") from None
        return mask
