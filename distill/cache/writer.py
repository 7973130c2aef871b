"""CacheWriter: one process's append-only shard of a teacher cache."""

from __future__ import annotations

import fcntl
import json
import os
import time
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from distill.cache.format import (
    DATA_SUFFIX,
    F16,
    F16_MAX,
    INDEX_SUFFIX,
    MANIFEST,
    WRITER_ID,
    changed_content,
    check_same_teacher,
    complete_manifest,
    create_or_check_manifest,
    dataset_items,
    examples,
    manifest_hashes,
    parse_index,
    read_manifest,
    rebuild_hint,
    row_key,
)
from distill.cache.reader import Index, load_index
from distill.cache.tools import refresh_manifest
from distill.errors import CacheError


class CacheWriter:
    """Appends one process's rows to `<root>/<writer_id>.{f16,index}`; see `distill.cache.format`.

    `manifest` needs "teacher" (fingerprint dict), "dataset" (the dataset's fingerprint dict, with
    "items" {id: input hash}: the ids this writer may write, and the hash each row records),
    "views" (list of view names), optionally "dtype" ("float16") and "command". Refused with
    CacheError: a cache of another teacher, views or dtype, or one holding rows of these ids computed
    from other content. Re-opening a writer id after a crash recovers its files; `done()` also sees
    every other writer's committed rows, so a rerun (even with another sharding, or on a grown
    dataset) computes only what is missing.
    """

    def __init__(
        self,
        root: str | Path,
        writer_id: str,
        manifest: dict,
        *,
        commit_every: int = 32,
        commit_seconds: float = 2.0,
    ):
        if not WRITER_ID.match(writer_id):
            raise CacheError(
                f"writer id {writer_id!r}: use letters, digits and . _ - @ (e.g. 'shard-3-of-8')"
            )
        self.root = Path(root)
        self.writer_id = writer_id
        self.manifest = create_or_check_manifest(self.root, manifest)
        self.views: list[str] = list(self.manifest["views"])
        self._items: dict[str, str] = dataset_items(manifest["dataset"], "CacheWriter manifest")
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self.data_path = self.root / f"{writer_id}{DATA_SUFFIX}"
        self.index_path = self.root / f"{writer_id}{INDEX_SUFFIX}"

        self._index = open(self.index_path, "ab")  # noqa: SIM115 (held until close())
        try:
            fcntl.flock(self._index.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self._index.close()
            raise CacheError(
                f"{self.index_path}: writer id {writer_id!r} is in use by another running process; "
                "give each process its own writer id"
            ) from e
        except OSError:
            pass  # filesystem without flock: nothing to guard with
        self._offset = self._recover()
        # Unbuffered: row bytes reach the kernel at once, so what a kill leaves on disk is what recovery handles.
        self._data = open(self.data_path, "ab", buffering=0)  # noqa: SIM115 (held until close())
        index = load_index(self.root, self.manifest)
        try:
            _refuse_changed(self.root, index, self._items, self.manifest)
        except CacheError:
            self._data.close()
            self._index.close()
            raise
        self._done: set[tuple[str, str | None]] = set(index.rows)
        self._done |= {(i, v) for i, views in index.no_mask.items() for v in views}
        self._pending: list[dict] = []
        self._last_commit = time.monotonic()
        self.rows_written = 0

    def _recover(self) -> int:
        """Cut a torn index tail and un-indexed data bytes; drop rows whose bytes are gone. Returns the data end."""
        parsed = parse_index(self.index_path, manifest_hashes(self.manifest))
        if parsed.errors:
            raise CacheError(
                f"{self.index_path}: corrupt index ({parsed.errors[0]}); delete {self.index_path.name} and "
                f"{self.data_path.name} to recompute this writer's rows, or {rebuild_hint(self.root)}"
            )
        records = parsed.records
        size = self.data_path.stat().st_size if self.data_path.exists() else 0
        lost = [r for r in records if r["status"] == "ok" and r["offset"] + r["nbytes"] > size]
        if lost:
            warnings.warn(
                f"{self.data_path}: data file ends before {len(lost)} indexed row(s) (e.g. "
                f"{examples(row_key(r) for r in lost)}); they are dropped and will be recomputed",
                stacklevel=3,
            )
            records = [r for r in records if r not in lost]
            # Rewritten in place: a crash midway leaves a prefix of valid records (+ a torn line), still consistent.
            os.ftruncate(self._index.fileno(), 0)
            self._index.write(b"".join(json.dumps(r).encode() + b"\n" for r in records))
            self._index.flush()
            os.fsync(self._index.fileno())
        elif parsed.torn_tail:
            os.truncate(self.index_path, parsed.good_bytes)
        end = max((r["offset"] + r["nbytes"] for r in records if r["status"] == "ok"), default=0)
        if size > end:
            os.truncate(self.data_path, end)
        return end

    def done(self, id: str, view: str) -> bool:
        """True when (id, view) has a map or a no_mask status, committed or pending in this process."""
        return (id, view) in self._done or (id, None) in self._done

    def todo(self, ids: Iterable[str] | None = None) -> list[str]:
        """Ids (default: every id of the dataset given to this writer) with at least one view not done yet."""
        ids = sorted(self._items) if ids is None else ids
        return [i for i in ids if not all(self.done(i, v) for v in self.views)]

    def _check_key(self, id: str, view: str | None) -> None:
        if id not in self._items:
            raise CacheError(f"{self.root}: id {id!r} is not in the dataset fingerprint given to this writer")
        if view is not None and view not in self.views:
            raise CacheError(f"{self.root}: view {view!r} is not one of the cache's views {self.views}")
        if any(self.done(id, v) for v in ([view] if view is not None else self.views)):
            raise CacheError(f"{self.root}: ({id!r}, {view!r}) is already cached; rows are written once")

    def write(self, id: str, view: str, logits: np.ndarray) -> None:
        """Append the HxW logits of (id, view), saturated to float16's range; NaN is refused."""
        self._check_key(id, view)
        logits = np.asarray(logits)
        if logits.ndim != 2 or logits.size == 0 or not np.issubdtype(logits.dtype, np.number):
            raise CacheError(
                f"({id!r}, {view!r}): logits must be a non-empty HxW float array, got {logits.shape}"
            )
        if np.isnan(logits).any():
            raise CacheError(f"({id!r}, {view!r}): teacher logits contain NaN; not cached")
        row = np.ascontiguousarray(np.clip(logits, -F16_MAX, F16_MAX), dtype=F16)
        buffer = memoryview(row).cast("B")
        written = 0
        while written < len(buffer):  # a raw write may be partial
            written += self._data.write(buffer[written:])
        h, w = row.shape
        self._add(
            {
                "id": id,
                "view": view,
                "status": "ok",
                "offset": self._offset,
                "shape": [h, w],
                "nbytes": row.nbytes,
                "encoding": "f16",
                "crc32": zlib.crc32(buffer),
                "hash": self._items[id],
            }
        )
        self._offset += row.nbytes

    def write_status(self, id: str, status: str = "no_mask", view: str | None = None) -> None:
        """Record that the teacher gave no map for `id` (all views, or only `view`): counted, never stored."""
        if status != "no_mask":
            raise CacheError(
                f"write_status: status {status!r} unknown; 'no_mask' is the only one (maps use write())"
            )
        self._check_key(id, view)
        self._add({"id": id, "view": view, "status": status, "hash": self._items[id]})

    def _add(self, record: dict) -> None:
        self._pending.append(record)
        self._done.add(row_key(record))
        self.rows_written += 1
        if (
            len(self._pending) >= self.commit_every
            or time.monotonic() - self._last_commit >= self.commit_seconds
        ):
            self.commit()

    def commit(self) -> None:
        """Make pending rows durable: fsync the data, *then* append and fsync their index records."""
        if self._pending:
            os.fsync(self._data.fileno())
            self._index.write(b"".join(json.dumps(r).encode() + b"\n" for r in self._pending))
            self._index.flush()
            os.fsync(self._index.fileno())
            self._pending = []
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Commit, close the files, and refresh the manifest's summary (writers, counts)."""
        if self._data.closed:
            return
        self.commit()
        self._data.close()
        self._index.close()
        refresh_manifest(self.root)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pending_rows(root: str | Path, manifest: dict, ids: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(id, views not cached yet) for each of `ids` that still needs rows, without creating anything.

    Checked as `CacheWriter(root, ..., manifest)` would check it (CacheError for a cache of another
    teacher, views or dtype, or with rows of `manifest`'s dataset items computed from other content),
    so a caller learns that nothing is left to do before it loads or fits a teacher.
    """
    root = Path(root)
    views = list(manifest["views"])
    if not (root / MANIFEST).is_file():
        return [(i, views) for i in ids]
    cached = read_manifest(root)
    check_same_teacher(root, cached, complete_manifest(manifest))
    index = load_index(root, cached)
    _refuse_changed(root, index, dataset_items(manifest["dataset"], "pending_rows manifest"), cached)
    todo = ((i, [v for v in views if not index.done(i, v)]) for i in ids)
    return [(i, left) for i, left in todo if left]


def _refuse_changed(root: Path, index: Index, items: dict[str, str], manifest: dict) -> None:
    changed = index.changed(items)
    if changed:
        raise CacheError(changed_content(root, changed, len(set(items) & set(index.ids)), manifest))
