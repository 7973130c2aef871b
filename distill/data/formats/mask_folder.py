"""`mask_folder`: images/ and masks/ (nonzero = vessel), optional roi/ (nonzero = counts), matched by stem.

Sub-folders are allowed (images/a/b.png pairs with masks/a/b.*). When the root holds train/, val/
(or Roboflow's valid/) and/or test/, each with that layout, they give the split and ids are
"<folder>/<stem>".
"""

from __future__ import annotations

import warnings
from pathlib import Path

from distill.data.dataset import DatasetWarning, Entry, VesselDataset, describe_files, register_format
from distill.data.images import IMAGE_SUFFIXES
from distill.data.splits import SPLIT_FOLDERS
from distill.errors import DatasetError


def images_by_stem(folder: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """{relative stem: [image files]} under `folder`, and the files that are not images."""
    found: dict[str, list[Path]] = {}
    others = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
        else:
            others.append(path)
    return found, others


@register_format("mask_folder")
class MaskFolderDataset(VesselDataset):
    layout = "images/ and masks/ (optional roi/), or train/ val/ test/ folders each holding them"

    def read_index(self) -> tuple[list[Entry], list[DatasetError]]:
        split_dirs = [name for name in SPLIT_FOLDERS if (self.root / name / "images").is_dir()]
        if split_dirs and (self.root / "images").is_dir():
            raise DatasetError(self.root, "has both images/ and split folders", "keep one layout")
        parts = [(self.root / name, name) for name in split_dirs] or [(self.root, None)]
        entries: list[Entry] = []
        problems: list[DatasetError] = []
        ignored: list[Path] = []
        for folder, name in parts:
            if not (folder / "images").is_dir():
                continue
            non_images, orphans = self.read_part(folder, name, entries, problems)
            ignored += non_images + orphans
        if ignored:
            warnings.warn(
                f"{self.root}: ignored {len(ignored)} files that are not images or have no image "
                f"({describe_files(ignored, self.root)})",
                DatasetWarning,
                stacklevel=2,
            )
        return entries, problems

    def read_part(
        self, folder: Path, name: str | None, entries: list[Entry], problems: list[DatasetError]
    ) -> tuple[list[Path], list[Path]]:
        """Entries of one images/ + masks/ (+ roi/) folder (`name`: its split folder, if any); returns
        the files it ignored (non-images, orphans)."""
        if not (folder / "masks").is_dir():
            raise DatasetError(folder / "masks", "not found", f"a mask_folder dataset needs {self.layout}")
        images, ignored = images_by_stem(folder / "images")
        masks, ignored_masks = images_by_stem(folder / "masks")
        has_roi = (folder / "roi").is_dir()
        rois, ignored_rois = images_by_stem(folder / "roi") if has_roi else ({}, [])
        for stem, paths in images.items():
            try:
                image = self.single(paths, "images")
                mask = self.single(masks.get(stem, []), "masks", image)
                roi = self.single(rois.get(stem, []), "roi", image) if has_roi else None
            except DatasetError as error:
                problems.append(error)
                continue
            item_id = f"{name}/{stem}" if name else stem
            split = SPLIT_FOLDERS[name] if name else None
            entries.append(Entry(id=item_id, image=image, mask_file=mask, roi_file=roi, split=split))
        orphans = [p for stem, paths in {**masks, **rois}.items() if stem not in images for p in paths]
        return ignored + ignored_masks + ignored_rois, orphans

    def single(self, paths: list[Path], kind: str, image: Path | None = None) -> Path:
        """The one file of a stem in `kind`; none or several is an error naming the image."""
        if len(paths) == 1:
            return paths[0]
        subject = image or paths[0]
        if not paths:
            raise DatasetError(
                subject, f"has no file of the same name in {kind}/", f"add {kind}/{subject.stem}.png"
            )
        names = ", ".join(p.name for p in paths)
        raise DatasetError(subject, f"several files in {kind}/ share its name ({names})", "keep one")
