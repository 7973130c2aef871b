"""TeacherCache: the read-only, memory-mapped view of a teacher cache that training uses."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from distill import __version__
from distill.cache.format import (
    DATA_SUFFIX,
    DECODERS,
    INDEX_SUFFIX,
    Row,
    changed_content,
    dataset_items,
    examples,
    manifest_hashes,
    parse_index,
    read_manifest,
    rebuild_hint,
    row_key,
    same_content,
    writer_ids,
)
from distill.errors import CacheError


class Index(NamedTuple):
    """Everything the index files of a cache say, merged over writers."""

    writers: list[str]
    rows: dict[tuple[str, str], Row]
    no_mask: dict[str, set[str | None]]  # id -> views marked no_mask (None: every view)
    hashes: dict[str, str]  # id -> input hash of the item its rows were computed from
    conflicts: list[str]
    problems: list[str]  # garbled lines (torn tails are not problems)
    torn: list[str]

    @property
    def ids(self) -> list[str]:
        """Every id with at least one record (a map or no_mask), sorted."""
        return sorted(self.hashes)

    def done(self, id: str, view: str) -> bool:
        """True when (id, view) has a map or a no_mask status."""
        marked = self.no_mask.get(id, ())
        return (id, view) in self.rows or view in marked or None in marked

    def status(self, id: str, views: list[str]) -> str | None:
        """The id's state: "no_mask" if any of `views` (or the whole id) is marked so, "ok" if all have maps, else None."""
        marked = self.no_mask.get(id, ())
        if None in marked or any(v in marked for v in views):
            return "no_mask"
        return "ok" if all((id, v) in self.rows for v in views) else None

    def missing(self, ids: Iterable[str], views: list[str]) -> list[str]:
        """Ids that are neither complete for every view nor no_mask."""
        return [i for i in ids if self.status(i, views) is None]

    def changed(self, items: Mapping[str, str]) -> list[str]:
        """Ids of `items` ({id: input hash}) whose rows were computed from other content, sorted."""
        return sorted(i for i, h in items.items() if self.hashes.get(i, h) != h)


def load_index(root: Path, manifest: dict) -> Index:
    """Parse and join every writer's index under `root` (the cache whose manifest is `manifest`)."""
    views, fallback = manifest["views"], manifest_hashes(manifest)
    writers = writer_ids(root)
    rows: dict[tuple[str, str], Row] = {}
    seen: dict[tuple[str, str | None], tuple[str, dict]] = {}
    no_mask: dict[str, set[str | None]] = {}
    hashes: dict[str, str] = {}
    conflicts, problems, torn = [], [], []
    for number, writer in enumerate(writers):
        parsed = parse_index(root / f"{writer}{INDEX_SUFFIX}", fallback)
        problems += parsed.errors
        if parsed.torn_tail:
            torn.append(writer)
        for record in parsed.records:
            key = row_key(record)
            if key in seen:
                first_writer, first = seen[key]
                if not same_content(first, record):
                    conflicts.append(f"{key} ({first_writer} vs {writer})")
                continue
            seen[key] = writer, record
            if hashes.setdefault(record["id"], record["hash"]) != record["hash"]:
                conflicts.append(f"{key} ({writer}): computed from other content than the id's other rows")
            if record["status"] == "no_mask":
                no_mask.setdefault(record["id"], set()).add(record["view"])
            else:
                h, w = record["shape"]
                rows[key] = Row(
                    number, record["offset"], h, w, record["nbytes"], record["encoding"], record["crc32"]
                )
    for id_, marked in no_mask.items():
        clash = [v for v in views if (id_, v) in rows and (None in marked or v in marked)]
        if clash:
            conflicts.append(f"({id_!r}, {clash[0]!r}) has a map and status no_mask")
    return Index(writers, rows, no_mask, hashes, conflicts, problems, torn)


class TeacherCache:
    """Read-only view of a cache: O(1) `read(id, view)` from memory maps.

    Construction reads only the manifest; the index files are parsed on first use. Pickling keeps
    the parsed index but no memory maps, and maps are re-opened in any process whose pid differs
    from the one that opened them, so it is safe to hand to DataLoader workers (fork or spawn).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest: dict = read_manifest(self.root)
        self.views: list[str] = list(self.manifest["views"])
        self._index: Index | None = None
        self._maps: dict[int, np.memmap] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    @property
    def index(self) -> Index:
        if self._index is None:
            index = load_index(self.root, self.manifest)
            if index.conflicts:
                raise CacheError(
                    f"{self.root}: {len(index.conflicts)} (id, view) rows written twice with different "
                    f"content (e.g. {examples(index.conflicts)}); delete one writer's files or {rebuild_hint(self.root)}"
                )
            self._index = index
        return self._index

    @property
    def ids(self) -> list[str]:
        """Every id the cache holds a result for (a map for some view, or no_mask), sorted."""
        return self.index.ids

    def has(self, id: str, view: str = "identity") -> bool:
        """True when (id, view) has a stored map."""
        return (id, view) in self.index.rows

    def status(self, id: str, view: str | None = None) -> str | None:
        """The teacher's result for `id` (for one `view`, or over all): "ok", "no_mask" (no map given), None (not cached)."""
        return self.index.status(id, self.views if view is None else [view])

    def missing(self, ids: Iterable[str]) -> list[str]:
        """Those of `ids` that are neither complete for every view nor no_mask (a rerun computes them)."""
        return self.index.missing(ids, self.views)

    def _buffer(self, row: Row) -> np.ndarray:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        end = row.offset + row.nbytes
        mm = self._maps.get(row.writer)
        if mm is None or mm.shape[0] < end:  # first read, or a writer appended since we mapped
            path = self.root / f"{self.index.writers[row.writer]}{DATA_SUFFIX}"
            size = path.stat().st_size if path.exists() else 0
            if size < end:
                raise CacheError(
                    f"{path}: data file is {size} bytes but a row ends at byte {end} (truncated shard); "
                    f"run `python -m distill.cache_teacher --verify {self.root}` and re-run cache_teacher on it"
                )
            mm = self._maps[row.writer] = np.memmap(path, dtype=np.uint8, mode="r")
        return mm[row.offset : end]

    def read(self, id: str, view: str = "identity", *, copy: bool = True) -> np.ndarray:
        """The float16 HxW logits of (id, view): a fresh writable copy, or a read-only memmap view with copy=False."""
        row = self.index.rows.get((id, view))
        if row is None:
            state = self.status(id, view)
            why = "the teacher gave no map (status no_mask)" if state == "no_mask" else "not cached"
            raise CacheError(f"{self.root}: ({id!r}, {view!r}): {why}; check TeacherCache.status(id) first")
        decode = DECODERS.get(row.encoding)
        if decode is None:
            raise CacheError(
                f"{self.root}: row encoding {row.encoding!r} unknown to distill {__version__}; upgrade"
            )
        out = decode(self._buffer(row), row.height, row.width)
        return np.array(out) if copy else out

    def read_views(self, id: str, views: list[str] | None = None) -> np.ndarray:
        """float16 [V, H, W] stack of `views` (default: every cached view) of `id`."""
        maps = [self.read(id, v) for v in (self.views if views is None else views)]
        if len({m.shape for m in maps}) > 1:
            raise CacheError(f"{self.root}: views of {id!r} have different shapes {[m.shape for m in maps]}")
        return np.stack(maps)

    def check_dataset(self, fingerprint: dict) -> None:
        """Raise CacheError unless every id of the dataset (`VesselDataset.fingerprint()`) is cached from
        its current content. Ids the cache holds beyond the dataset's are fine (a shrunk dataset, or
        a cache shared by several subsets)."""
        items = dataset_items(fingerprint, "check_dataset")
        changed = self.index.changed(items)
        if changed:
            shared = len(set(items) & set(self.index.ids))
            raise CacheError(changed_content(self.root, changed, shared, self.manifest))
        missing = self.missing(items)
        if missing:
            raise CacheError(
                f"{self.root}: teacher cache is incomplete: {len(missing)} of {len(items)} id(s) missing "
                f"(e.g. {examples(missing)}). Fix: run `python -m distill.cache_teacher` again with the same "
                f"--out {self.root} to add the missing ids."
            )
