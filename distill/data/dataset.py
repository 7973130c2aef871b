"""VesselDataset: the base every format reader extends, the registry of formats, and open_dataset.

A reader parses its index (JSON files, folders) into small `Entry` rows when opened and decodes pixels
only when an item is asked for, so a dataset is cheap to pickle into DataLoader workers. Problems in
the index (bad JSON, missing or escaping image paths, duplicate ids, degenerate polygons) are found
at open; problems in the pixels (truncated files, size mismatches) when an item loads. By default a
problem raises a DatasetError listing every problem found; with skip_bad=True bad items are left out,
listed in `ds.problems`, and a warning says so.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from distill.data.images import check_bit_depth, decode_facts, image_size, read_binary_mask, read_image
from distill.data.rasterize import as_vertices, count_outside, rasterize_polygons
from distill.data.record import Record
from distill.data.splits import SPLITS, check_fractions, resolve_splits
from distill.errors import ConfigError, DatasetError, DatasetWarning
from distill.registry import Registry

FORMATS = Registry("dataset format")
COMMON_OPTIONS = ("split_file", "bit_depth")  # reader options every format takes (see VesselDataset)


class SkippedItemsWarning(DatasetWarning):
    """Bad items were left out because skip_bad=True (each is also in `ds.problems`)."""


def register_format(name: str) -> Callable[[type[VesselDataset]], type[VesselDataset]]:
    def register(cls: type[VesselDataset]) -> type[VesselDataset]:
        cls.format = name
        return FORMATS.register(name)(cls)

    return register


def list_formats() -> list[str]:
    return sorted(FORMATS)


@dataclass(frozen=True)
class Entry:
    """One item of a parsed index: where its pixels are and what its annotation says (no pixels).

    `image` is the file the image comes from (for an embedded image, the JSON holding it); `annotation`
    is JSON-able and holds what the mask is drawn from (hashed as canonical JSON); `size` is the
    (height, width) the index declares, checked against the image at load; `split` an explicit split.
    """

    id: str
    image: Path
    annotation: dict[str, Any] = field(default_factory=dict)
    mask_file: Path | None = None
    roi_file: Path | None = None
    text: str | None = None
    size: tuple[int, int] | None = None
    split: str | None = None
    index_file: Path | None = None

    @property
    def origin(self) -> Path:
        """The file to name when this item is at fault: its annotation file, else its image."""
        return self.index_file or self.image


def combined_error(root: Path, problems: list[DatasetError], advice: str) -> DatasetError:
    """One DatasetError listing several problems, one per line, each naming its file."""
    if len(problems) == 1:
        return problems[0]
    lines = "\n".join(f"  {problem}" for problem in problems)
    error = DatasetError(root, f"{len(problems)} problems ({advice}):\n{lines}")
    error.problems = problems  # type: ignore[attr-defined]
    return error


def inside(root: Path, base: Path, relative: str, owner: Path) -> Path:
    """`base / relative`, refusing absolute paths and paths that climb out of `root` (checked lexically)."""
    relative = relative.replace("\\", "/")
    if relative.startswith("/") or (len(relative) > 1 and relative[1] == ":"):
        raise DatasetError(
            owner, f"image path {relative!r} is absolute", "make it relative to the dataset root"
        )
    path = Path(os.path.normpath(base / relative))
    if not path.is_relative_to(Path(os.path.normpath(root))):
        raise DatasetError(
            owner, f"image path {relative!r} escapes the dataset root {root}", "keep images inside it"
        )
    return path


def check_polygon(polygon: Any, owner: Path, where: str) -> np.ndarray:
    """A flat float64 [x1, y1, ...] array of >= 3 finite points, else a DatasetError naming the file and shape.

    Arrays, not lists: vessel annotations run to 10^4 vertices per image, and Python floats would take
    four times the memory (and far longer to pickle into loader workers).
    """
    try:
        points = as_vertices(polygon)
    except (ValueError, TypeError) as error:
        raise DatasetError(owner, f"{where}: not a polygon ({error})") from None
    if len(points) < 3:
        raise DatasetError(owner, f"{where}: polygon has {len(points)} points, needs at least 3")
    if not np.isfinite(points).all():
        raise DatasetError(owner, f"{where}: polygon has non-finite coordinates (NaN or infinity)")
    return points.reshape(-1)


def update_digest(digest: Any, value: Any) -> None:
    """Feed a JSON-like value (numpy arrays allowed) to a hash canonically: sorted keys, arrays as float64."""
    if isinstance(value, np.ndarray):
        digest.update(b"array%d:" % value.size + np.ascontiguousarray(value, dtype="<f8").tobytes())
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value):
            update_digest(digest, key)
            update_digest(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for element in value:
            update_digest(digest, element)
        digest.update(b"]")
    else:
        digest.update(json.dumps(value).encode() + b",")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DatasetError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(path, f"JSON does not parse ({error})") from None


def describe_files(paths: Iterable[Path], root: Path, limit: int = 10) -> str:
    names = sorted({str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths})
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class VesselDataset:
    """A dataset of vessel images: `ds[i]` / `ds.get(id)` -> Record, with splits and teacher-input hashes.

    Subclasses implement `read_index` (parse the index into entries; each bad entry as a DatasetError)
    and, where their masks are not plain polygons, `draw_mask` and `vertices`. Every format also takes
    the reader options `split_file` (see distill.data.splits) and `bit_depth` (the bits 16-bit grayscale
    images hold, 1-16; default: detected per image, see distill.data.images).
    """

    format: ClassVar[str] = ""
    layout: ClassVar[str] = ""  # what a dataset of this format looks like, for "nothing found" errors

    def __init__(
        self,
        root: str | Path,
        *,
        skip_bad: bool = False,
        split_seed: int = 0,
        split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        split_file: str | Path | None = None,
        bit_depth: int | None = None,
        **options: Any,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(self.root, "dataset root is not a directory")
        self.bit_depth = check_bit_depth(bit_depth)
        self.skip_bad = skip_bad
        self.options = options
        self.problems: list[DatasetError] = []
        fractions = check_fractions(split_fractions)

        entries, problems = self.read_index(**options)
        entries, problems = self.drop_duplicates(entries, problems)
        if not entries and not problems:
            raise DatasetError(self.root, f"empty dataset: no items found (expected {self.layout})")
        if problems:
            self.leave_out(problems, "in the index")
        self.entries = {e.id: e for e in sorted(entries, key=lambda e: e.id)}
        self.warn_outside_vertices()
        if skip_bad:
            bad = self.validate()
            for problem in bad:
                del self.entries[problem.item_id]  # type: ignore[attr-defined]
            self.leave_out(bad, "that do not load")
        if not self.entries:
            reasons = "\n".join(f"  {problem}" for problem in self.problems)
            raise DatasetError(self.root, f"empty dataset: every item is bad:\n{reasons}")
        self.ids = list(self.entries)
        self.splits = resolve_splits(
            self.root,
            self.ids,
            seed=split_seed,
            fractions=fractions,
            explicit={e.id: e.split for e in self.entries.values() if e.split},
            split_file=Path(split_file) if split_file is not None else None,
        )
        self._hashes: dict[str, str] = {}

    # -- what formats implement -------------------------------------------------------------------

    def read_index(self, **options: Any) -> tuple[list[Entry], list[DatasetError]]:
        raise NotImplementedError

    def draw_mask(self, entry: Entry, height: int, width: int) -> np.ndarray:
        """HxW uint8 0/1 vessel mask of an entry whose annotation holds "polygons" (flat lists)."""
        return rasterize_polygons(entry.annotation.get("polygons", []), height, width)[0]

    def vertices(self, entry: Entry) -> Iterable[np.ndarray]:
        """The annotation's vertices (N, 2), to count those outside the image."""
        return (as_vertices(p) for p in entry.annotation.get("polygons", []))

    # -- the dataset ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Record:
        return self.get(self.ids[index])

    def get(self, item_id: str) -> Record:
        entry = self.entry(item_id)
        image = read_image(entry.image, self.embedded_image(entry), self.bit_depth)
        height, width = image.shape[:2]
        if entry.size is not None and entry.size != (height, width):
            raise DatasetError(
                entry.origin,
                f"image {entry.image.name} is {height}x{width} but the annotation says {entry.size[0]}x{entry.size[1]}",
            )
        if entry.mask_file is not None:
            mask = self.read_sized(entry.mask_file, height, width, entry).astype(np.uint8)
        else:
            mask = self.draw_mask(entry, height, width)
        roi = self.read_sized(entry.roi_file, height, width, entry) if entry.roi_file is not None else None
        return Record(id=entry.id, image=image, mask=mask, source=entry.image, roi=roi, text=entry.text)

    def entry(self, item_id: str) -> Entry:
        try:
            return self.entries[item_id]
        except KeyError:
            raise KeyError(f"{item_id!r} is not an id of the {self.format} dataset at {self.root}") from None

    def embedded_image(self, entry: Entry) -> bytes | None:
        """Image bytes stored inside the index (LabelMe imageData); None when the image is its own file."""
        return None

    @staticmethod
    def read_sized(path: Path, height: int, width: int, entry: Entry) -> np.ndarray:
        mask = read_binary_mask(path)
        if mask.shape != (height, width):
            raise DatasetError(
                path,
                f"is {mask.shape[0]}x{mask.shape[1]} but its image {entry.image.name} is {height}x{width}",
            )
        return mask

    def split_of(self, item_id: str) -> str:
        self.entry(item_id)
        return self.splits[item_id]

    def split_ids(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise ConfigError(f"split must be one of {SPLITS}, got {split!r}")
        return [i for i in self.ids if self.splits[i] == split]

    def input_hash(self, item_id: str) -> str:
        """sha256 over what a teacher sees of the item: its image (the bytes, and the decoding rules that
        apply to them: EXIF orientation, bit depth) and its text. Not its mask, ROI or polygons: fixing an
        annotation keeps the item's cached teacher rows, a changed image or prompt text does not."""
        if item_id not in self._hashes:
            entry = self.entry(item_id)
            embedded = self.embedded_image(entry)
            try:
                image = embedded if embedded is not None else entry.image.read_bytes()
            except OSError as error:
                raise DatasetError(entry.image, f"cannot be read to hash it ({error.strerror})") from None
            digest = hashlib.sha256(image)
            facts = decode_facts(entry.image, embedded, self.bit_depth)
            update_digest(digest, {"text": entry.text, "decoded": facts} if facts else {"text": entry.text})
            self._hashes[item_id] = digest.hexdigest()
        return self._hashes[item_id]

    def fingerprint(self) -> dict[str, Any]:
        """What the teacher cache compares, per id, to know its rows were computed from these inputs."""
        items = {i: self.input_hash(i) for i in self.ids}
        digest = hashlib.sha256("\n".join(f"{i}:{h}" for i, h in items.items()).encode()).hexdigest()
        return {"format": self.format, "n_items": len(items), "digest": digest, "items": items}

    def validate(self, on_record: Callable[[Record], None] | None = None) -> list[DatasetError]:
        """Load every item; the problems found (each a DatasetError). `on_record` sees each good record."""
        problems = []
        for item_id in tqdm(list(self.entries), desc=f"checking {self.format} items", leave=False):
            try:
                record = self.get(item_id)
            except DatasetError as error:
                error.item_id = item_id  # type: ignore[attr-defined]
                problems.append(error)
                continue
            if on_record is not None:
                on_record(record)
        return problems

    # -- index checks shared by every format ------------------------------------------------------

    def drop_duplicates(
        self, entries: list[Entry], problems: list[DatasetError]
    ) -> tuple[list[Entry], list[DatasetError]]:
        """Ids must be unique: every entry of a repeated id is bad (which one is meant is unknowable)."""
        counts = Counter(e.id for e in entries)
        for item_id in sorted(i for i, n in counts.items() if n > 1):
            files = describe_files((e.image for e in entries if e.id == item_id), self.root)
            error = DatasetError(
                self.root, f"duplicate id {item_id!r} from {files}", "give each image a unique name"
            )
            error.item_id = item_id  # type: ignore[attr-defined]
            problems.append(error)
        return [e for e in entries if counts[e.id] == 1], problems

    def leave_out(self, problems: list[DatasetError], where: str) -> None:
        """Raise the problems, or (skip_bad) drop their items, keep them in `problems`, and warn."""
        if not problems:
            return
        if not self.skip_bad:
            raise combined_error(
                self.root,
                problems,
                "fix or remove them; `python -m distill.data check` lists them all, and --skip-bad "
                "(check, cache_teacher) leaves them out",
            )
        self.problems.extend(problems)
        listing = "\n".join(f"  {p}" for p in problems)
        warnings.warn(
            f"{self.root}: left out {len(problems)} bad items {where} (--skip-bad):\n{listing}",
            SkippedItemsWarning,
            stacklevel=3,
        )

    def warn_outside_vertices(self) -> None:
        """One warning per dataset counting annotation vertices outside their image (the fill clips them)."""
        total, files = 0, []
        for entry in self.entries.values():
            size = entry.size or image_size(entry.image)
            if size is None:
                continue
            outside = sum(count_outside(points, *size) for points in self.vertices(entry))
            if outside:
                total += outside
                files.append(entry.origin)
        if total:
            warnings.warn(
                f"{self.root}: {total} annotation vertices lie outside their image in {len(files)} files "
                f"({describe_files(files, self.root)}); the masks are clipped to the image",
                DatasetWarning,
                stacklevel=3,
            )


def open_dataset(
    format: str,
    root: str | Path,
    *,
    skip_bad: bool = False,
    split_seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    **reader_options: Any,
) -> VesselDataset:
    """Open the dataset at `root` in `format` (see list_formats()); reader options are per format."""
    if format not in FORMATS:
        raise ConfigError(f"unknown dataset format {format!r}; choose one of {list_formats()}")
    cls = FORMATS[format]
    accepted = [p for p in inspect.signature(cls.read_index).parameters if p != "self"] + list(COMMON_OPTIONS)
    unknown = sorted(set(reader_options) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for format {format!r}; it accepts {accepted}")
    return cls(
        root, skip_bad=skip_bad, split_seed=split_seed, split_fractions=split_fractions, **reader_options
    )
