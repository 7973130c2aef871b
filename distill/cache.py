"""The teacher cache: per-pixel teacher logits stored once, read many times by training.

Layout of a cache directory (one per teacher x dataset x views)::

    <root>/manifest.json       format_version, teacher + dataset fingerprints, dtype, views, created, writers, counts
    <root>/<writer_id>.f16     raw little-endian float16 rows, appended; read through np.memmap
    <root>/<writer_id>.index   JSON lines, one per finished row: {"id", "view", "status": "ok", "offset",
                               "shape": [h, w], "nbytes", "encoding": "f16", "crc32"}, or a status record
                               {"id", "view": null|view, "status": "no_mask"} (no map stored)

A row is one (id, view) map at the image's own H x W, in the original orientation (`invert_view`
already applied). "encoding" is per row so that compressed or native-resolution rows can be added
later behind the same reader; today only "f16" exists.

Why append-only JSON lines (and not a rewritten index file): a writer appends the row bytes, and
every `commit_every` rows or `commit_seconds` it fsyncs the data file *first*, then appends the rows'
records to the index and fsyncs that. An index record is therefore never ahead of its bytes. A
SIGKILL at any moment leaves at worst (a) data bytes past the last indexed row, which the next
writer with that id truncates away, and (b) a torn last index line (no newline / bad JSON), which
every reader ignores and the writer cuts off. Rows written after the last commit are simply
computed again. Appending costs O(rows) per commit, where rewriting the index with temp +
os.replace would cost O(all rows) per commit and grow quadratic on 100k-image caches.

Writers: one per process, named by the caller ("w-rank0", "shard-3-of-8"). Several processes or
nodes write disjoint `<writer_id>.*` files in the same root with no shared locks (each writer only
holds an flock on its own index, to refuse a second process with the same id). The manifest is
created atomically (temp file + os.link, which never overwrites); a second creator with the same
fingerprint accepts it, a different fingerprint is refused. The manifest's "writers" and "counts"
are a summary rewritten on close (last closer wins): readers never trust it and scan `*.index`.
Caches written on different nodes are joined with `merge_cache`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from distill import __version__
from distill.errors import CacheError
from distill.views import check_views

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DATA_SUFFIX = ".f16"
INDEX_SUFFIX = ".index"
STATUSES = ("ok", "no_mask")
# Fields that must agree between two writers/caches for their rows to be interchangeable.
FINGERPRINT_KEYS = ("format_version", "dtype", "views", "teacher", "dataset")
_F16 = np.dtype("<f2")
_F16_MAX = float(np.finfo(np.float16).max)
_WRITER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
_EXAMPLES = 5


class Row(NamedTuple):
    """Where one (id, view) map lives: writer number, byte offset, shape, encoding, checksum."""

    writer: int
    offset: int
    height: int
    width: int
    nbytes: int
    encoding: str
    crc32: int


def _decode_f16(buffer: np.ndarray, height: int, width: int) -> np.ndarray:
    return buffer.view(_F16).reshape(height, width)


# encoding name -> decoder(uint8 buffer, h, w) -> float16 HxW. Future: "f16_zstd", "f16_native".
DECODERS = {"f16": _decode_f16}


# ---------------------------------------------------------------- small helpers


def _fix_rebuild(root: Path) -> str:
    return f"rebuild with `python -m distill.cache_teacher ... --out NEW_DIR` (or delete {root})"


def _examples(items: Iterable[Any]) -> str:
    items = sorted(items, key=str)
    shown = ", ".join(str(x) for x in items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value: Any) -> Any:
    """JSON round trip, so that tuples/lists and numpy scalars compare as they are stored."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def teacher_differences(cached: dict, given: dict) -> list[str]:
    """'field: cache value vs given value' for every teacher fingerprint field that differs."""
    a, b = _flatten(_plain(cached)), _flatten(_plain(given))
    return [
        f"{key}: cache {_short(a.get(key, '<absent>'))} vs given {_short(b.get(key, '<absent>'))}"
        for key in sorted(set(a) | set(b))
        if a.get(key, "<absent>") != b.get(key, "<absent>")
    ]


def dataset_differences(cached: dict, given: dict) -> list[str]:
    """Counts and examples of ids new in the dataset, gone from it, or with changed content."""
    old, new = _dataset_items(cached, "cache manifest"), _dataset_items(given, "given dataset")
    added = set(new) - set(old)
    removed = set(old) - set(new)
    changed = {i for i in set(old) & set(new) if old[i] != new[i]}
    lines = []
    if added:
        lines.append(f"{len(added)} id(s) new in the dataset, not in the cache (e.g. {_examples(added)})")
    if removed:
        lines.append(
            f"{len(removed)} id(s) in the cache but no longer in the dataset (e.g. {_examples(removed)})"
        )
    if changed:
        lines.append(f"{len(changed)} id(s) with changed content (e.g. {_examples(changed)})")
    return lines


def _dataset_items(fingerprint: dict, what: str) -> dict[str, str]:
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("items"), dict):
        raise CacheError(f"{what}: dataset fingerprint has no 'items' {{id: content_hash}} dict")
    return fingerprint["items"]


def manifest_differences(cached: dict, given: dict) -> list[str]:
    """Human lines for every fingerprint field of two manifests that differs (empty: compatible)."""
    lines = []
    for key in ("format_version", "dtype", "views"):
        if _plain(cached.get(key)) != _plain(given.get(key)):
            lines.append(f"{key}: cache {_short(cached.get(key))} vs given {_short(given.get(key))}")
    lines += [f"teacher {line}" for line in teacher_differences(cached["teacher"], given["teacher"])]
    lines += [f"dataset: {line}" for line in dataset_differences(cached["dataset"], given["dataset"])]
    return lines


def _write_json_atomic(path: Path, data: dict, *, overwrite: bool) -> bool:
    """Write `data` to `path` via a unique temp file; without `overwrite`, False if `path` exists."""
    tmp = path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        if overwrite:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # atomic and never clobbers: two racing creators cannot overwrite each other
        except FileExistsError:
            return False
        except OSError as e:  # a filesystem without hard links
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def read_manifest(root: str | Path) -> dict:
    """The manifest of the cache at `root`, or CacheError saying how to build one."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"{path}: no teacher cache here (manifest.json missing); build one with "
            f"`python -m distill.cache_teacher ... --out {Path(root)}`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CacheError(f"{path}: manifest is not valid JSON ({e}); {_fix_rebuild(Path(root))}") from e
    missing = [k for k in FINGERPRINT_KEYS if k not in manifest]
    if missing:
        raise CacheError(f"{path}: manifest lacks {missing}; {_fix_rebuild(Path(root))}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format {manifest['format_version']} is newer than this distill "
            f"({__version__}, format {FORMAT_VERSION}); upgrade vessel-distill"
        )
    return manifest


def _complete_manifest(manifest: dict) -> dict:
    """Validate the caller's manifest (teacher, dataset, views[, dtype, command]) and add creation info."""
    for key in ("teacher", "dataset", "views"):
        if key not in manifest:
            raise CacheError(f"CacheWriter manifest needs '{key}' (got keys {sorted(manifest)})")
    if not isinstance(manifest["teacher"], dict):
        raise CacheError("CacheWriter manifest: 'teacher' must be the teacher's fingerprint dict")
    _dataset_items(manifest["dataset"], "CacheWriter manifest")
    try:
        views = check_views(list(manifest["views"]))
    except ValueError as e:
        raise CacheError(f"CacheWriter manifest: {e}") from e
    if manifest.get("dtype", "float16") != "float16":
        raise CacheError(f"CacheWriter manifest: dtype {manifest['dtype']!r} unsupported; only 'float16'")
    return {
        "format_version": FORMAT_VERSION,
        "dtype": "float16",
        "views": views,
        "teacher": _plain(manifest["teacher"]),
        "dataset": _plain(manifest["dataset"]),
        "created": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "distill_version": __version__,
            "command": manifest.get("command") or " ".join(sys.argv),
        },
        "writers": [],
        "counts": {},
    }


def create_or_check_manifest(root: str | Path, manifest: dict) -> dict:
    """Create the cache's manifest, or accept an existing one with the same fingerprint; returns it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    wanted = _complete_manifest(manifest)
    if _write_json_atomic(root / MANIFEST, wanted, overwrite=False):
        return wanted
    existing = read_manifest(root)
    differences = manifest_differences(existing, wanted)
    if differences:
        raise CacheError(
            f"{root / MANIFEST}: this cache was made by a different teacher/dataset/views:\n  "
            + "\n  ".join(differences)
            + f"\nUse a new --out directory, or delete {root} to rebuild it."
        )
    return existing


# ---------------------------------------------------------------- index files


class IndexFile(NamedTuple):
    records: list[dict]
    good_bytes: int  # length of the prefix made of complete, valid lines
    torn_tail: bool  # a partial/garbled last line was ignored
    errors: list[str]  # garbled lines *before* the last one (real corruption)


def parse_index(path: Path) -> IndexFile:
    """Parse a writer's JSON-lines index; a torn last line (killed writer) is ignored, not an error."""
    raw = path.read_bytes() if path.exists() else b""
    complete = raw[: raw.rfind(b"\n") + 1]  # a last line without its newline never finished committing
    records, errors = [], []
    for number, line in enumerate(complete.split(b"\n")[:-1]):
        try:
            record = json.loads(line)
            _check_record(record)
        except (ValueError, KeyError, TypeError) as e:
            errors.append(f"{path}:{number + 1}: unreadable index record ({e})")
            continue
        records.append(record)
    return IndexFile(records, len(complete), len(raw) > len(complete), errors)


def _check_record(record: dict) -> None:
    if record["status"] not in STATUSES or not isinstance(record["id"], str):
        raise ValueError(f"bad status/id in {record}")
    if record["status"] == "ok":
        h, w = record["shape"]
        if not (record["offset"] >= 0 and h > 0 and w > 0 and record["nbytes"] > 0 and record["encoding"]):
            raise ValueError(f"bad row geometry in {record}")


def writer_ids(root: Path) -> list[str]:
    """Writers present in a cache directory (from their index files)."""
    return sorted(p.name[: -len(INDEX_SUFFIX)] for p in root.glob(f"*{INDEX_SUFFIX}"))


def _row_key(record: dict) -> tuple[str, str | None]:
    return record["id"], record["view"]


def _same_content(a: dict, b: dict) -> bool:
    fields = ("status", "shape", "encoding", "crc32", "nbytes")
    return all(a.get(f) == b.get(f) for f in fields)


class Index(NamedTuple):
    """Everything the index files of a cache say, merged over writers."""

    writers: list[str]
    rows: dict[tuple[str, str], Row]
    no_mask: dict[str, set[str | None]]  # id -> views marked no_mask (None: every view)
    conflicts: list[str]
    problems: list[str]  # garbled lines (torn tails are not problems)
    torn: list[str]

    def status(self, id: str, views: list[str]) -> str | None:
        """The id's state: "no_mask" if any of `views` (or the whole id) is marked so, "ok" if all have maps, else None."""
        marked = self.no_mask.get(id, ())
        if None in marked or any(v in marked for v in views):
            return "no_mask"
        return "ok" if all((id, v) in self.rows for v in views) else None

    def missing(self, ids: Iterable[str], views: list[str]) -> list[str]:
        """Ids that are neither complete for every view nor no_mask."""
        return [i for i in ids if self.status(i, views) is None]


def load_index(root: Path, views: list[str]) -> Index:
    writers = writer_ids(root)
    rows: dict[tuple[str, str], Row] = {}
    seen: dict[tuple[str, str | None], tuple[str, dict]] = {}
    no_mask: dict[str, set[str | None]] = {}
    conflicts, problems, torn = [], [], []
    for number, writer in enumerate(writers):
        parsed = parse_index(root / f"{writer}{INDEX_SUFFIX}")
        problems += parsed.errors
        if parsed.torn_tail:
            torn.append(writer)
        for record in parsed.records:
            key = _row_key(record)
            if key in seen:
                first_writer, first = seen[key]
                if not _same_content(first, record):
                    conflicts.append(f"{key} ({first_writer} vs {writer})")
                continue
            seen[key] = writer, record
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
    return Index(writers, rows, no_mask, conflicts, problems, torn)


# ---------------------------------------------------------------- writer


class CacheWriter:
    """Appends one process's rows to `<root>/<writer_id>.{f16,index}`; see the module docstring.

    `manifest` needs "teacher" (fingerprint dict), "dataset" (the dataset's fingerprint dict, with
    "items"), "views" (list of view names), optionally "dtype" ("float16") and "command".
    Re-opening a writer id after a crash recovers its files; `done()` also sees every other
    writer's committed rows, so a rerun (even with another sharding) computes only what is missing.
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
        if not _WRITER_ID.match(writer_id):
            raise CacheError(
                f"writer id {writer_id!r}: use letters, digits and . _ - @ (e.g. 'shard-3-of-8')"
            )
        self.root = Path(root)
        self.writer_id = writer_id
        self.manifest = create_or_check_manifest(self.root, manifest)
        self.views: list[str] = list(self.manifest["views"])
        self._dataset_ids = set(self.manifest["dataset"]["items"])
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
        index = load_index(self.root, self.views)
        self._done: set[tuple[str, str | None]] = set(index.rows)
        self._done |= {(i, v) for i, views in index.no_mask.items() for v in views}
        self._pending: list[dict] = []
        self._last_commit = time.monotonic()
        self.rows_written = 0

    def _recover(self) -> int:
        """Cut a torn index tail and un-indexed data bytes; drop rows whose bytes are gone. Returns the data end."""
        parsed = parse_index(self.index_path)
        if parsed.errors:
            raise CacheError(
                f"{self.index_path}: corrupt index ({parsed.errors[0]}); delete {self.index_path.name} and "
                f"{self.data_path.name} to recompute this writer's rows, or {_fix_rebuild(self.root)}"
            )
        records = parsed.records
        size = self.data_path.stat().st_size if self.data_path.exists() else 0
        lost = [r for r in records if r["status"] == "ok" and r["offset"] + r["nbytes"] > size]
        if lost:
            warnings.warn(
                f"{self.data_path}: data file ends before {len(lost)} indexed row(s) (e.g. "
                f"{_examples(_row_key(r) for r in lost)}); they are dropped and will be recomputed",
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
        """Ids (default: every id of the manifest's dataset) with at least one view not done yet."""
        ids = sorted(self._dataset_ids) if ids is None else ids
        return [i for i in ids if not all(self.done(i, v) for v in self.views)]

    def _check_key(self, id: str, view: str | None) -> None:
        if id not in self._dataset_ids:
            raise CacheError(
                f"{self.root}: id {id!r} is not in the dataset fingerprint this cache was made for"
            )
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
        row = np.ascontiguousarray(np.clip(logits, -_F16_MAX, _F16_MAX), dtype=_F16)
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
        self._add({"id": id, "view": view, "status": status})

    def _add(self, record: dict) -> None:
        self._pending.append(record)
        self._done.add(_row_key(record))
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


def refresh_manifest(root: str | Path) -> dict:
    """Rewrite the manifest's informational "writers" and "counts" from the index files."""
    root = Path(root)
    manifest = read_manifest(root)
    info = cache_info(root)
    manifest["writers"] = [{"id": w, **stats} for w, stats in info["writers"].items()]
    manifest["counts"] = {
        k: info[k] for k in ("rows", "ids_expected", "ids_complete", "ids_missing", "no_mask")
    }
    _write_json_atomic(root / MANIFEST, manifest, overwrite=True)
    return manifest


# ---------------------------------------------------------------- reader


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
        self.ids: list[str] = sorted(self.manifest["dataset"]["items"])  # the ids this cache is for
        self._index: Index | None = None
        self._maps: dict[int, np.memmap] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    @property
    def index(self) -> Index:
        if self._index is None:
            index = load_index(self.root, self.views)
            if index.conflicts:
                raise CacheError(
                    f"{self.root}: {len(index.conflicts)} (id, view) rows written twice with different "
                    f"content (e.g. {_examples(index.conflicts)}); delete one writer's files or {_fix_rebuild(self.root)}"
                )
            self._index = index
        return self._index

    def has(self, id: str, view: str = "identity") -> bool:
        """True when (id, view) has a stored map."""
        return (id, view) in self.index.rows

    def status(self, id: str, view: str | None = None) -> str | None:
        """The teacher's result for `id` (for one `view`, or over all): "ok", "no_mask" (no map given), None (not cached)."""
        return self.index.status(id, self.views if view is None else [view])

    def missing(self) -> list[str]:
        """Ids of the manifest's dataset that are neither complete nor no_mask (a resumed run fills them)."""
        return self.index.missing(self.ids, self.views)

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
        """Raise CacheError unless the cache was built for exactly this dataset and holds every id."""
        differences = dataset_differences(self.manifest["dataset"], fingerprint)
        if differences:
            raise CacheError(
                f"{self.root}: teacher cache does not match the dataset:\n  "
                + "\n  ".join(differences)
                + f"\nFix: {_fix_rebuild(self.root)}."
            )
        missing = self.missing()
        if missing:
            raise CacheError(
                f"{self.root}: teacher cache is incomplete: {len(missing)} of {len(self.ids)} id(s) missing "
                f"(e.g. {_examples(missing)}). Fix: run `python -m distill.cache_teacher` again with the same "
                f"--out {self.root} to add the missing ids."
            )

    def check_teacher(self, fingerprint: dict) -> None:
        """Raise CacheError naming each teacher fingerprint field that differs (cache vs given)."""
        differences = teacher_differences(self.manifest["teacher"], fingerprint)
        if differences:
            raise CacheError(
                f"{self.root}: teacher cache was made by a different teacher:\n  "
                + "\n  ".join(differences)
                + f"\nFix: {_fix_rebuild(self.root)}."
            )


# ---------------------------------------------------------------- verify, info, merge


def verify_cache(root: str | Path, dataset: Any = None) -> list[str]:
    """Every problem found in the cache at `root` (empty list: complete and sound).

    Checks: readable manifest and indexes, each row in bounds of its data file with its checksum
    and no NaN/inf, every dataset id done for every view (or no_mask), no rows outside the dataset;
    with `dataset` (a VesselDataset), its fingerprint matches and each map has the image's H x W.
    """
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except CacheError as e:
        return [str(e)]
    ids, views = sorted(manifest["dataset"]["items"]), manifest["views"]
    index = load_index(root, views)
    problems = list(index.problems)
    problems += [f"{root}: rows written twice with different content: {c}" for c in index.conflicts]
    problems += [f"{root / (w + INDEX_SUFFIX)}: torn last record ignored (killed writer)" for w in index.torn]
    sizes = {n: (root / f"{w}{DATA_SUFFIX}").stat().st_size for n, w in enumerate(index.writers)
             if (root / f"{w}{DATA_SUFFIX}").exists()}  # fmt: skip
    maps = {n: np.memmap(root / f"{w}{DATA_SUFFIX}", dtype=np.uint8, mode="r") for n, w in enumerate(index.writers)
            if sizes.get(n)}  # fmt: skip
    shapes: dict[str, set[tuple[int, int]]] = {}
    for (id_, view), row in tqdm(
        sorted(index.rows.items()), desc=f"verify {root.name}", unit="map", leave=False
    ):
        where = f"{root / (index.writers[row.writer] + DATA_SUFFIX)} ({id_!r}, {view!r})"
        if row.offset + row.nbytes > sizes.get(row.writer, 0):
            problems.append(f"{where}: row ends at byte {row.offset + row.nbytes}, past the end of the file")
            continue
        if row.encoding not in DECODERS:
            problems.append(f"{where}: unknown encoding {row.encoding!r}")
            continue
        buffer = maps[row.writer][row.offset : row.offset + row.nbytes]
        if zlib.crc32(buffer) != row.crc32:
            problems.append(f"{where}: checksum mismatch (bytes changed after writing)")
        values = DECODERS[row.encoding](buffer, row.height, row.width)
        if not np.isfinite(values).all():
            problems.append(f"{where}: {int((~np.isfinite(values)).sum())} NaN/inf value(s)")
        shapes.setdefault(id_, set()).add((row.height, row.width))
    missing = index.missing(ids, views)
    if missing:
        problems.append(
            f"{root}: {len(missing)} of {len(ids)} id(s) lack a map for some view (e.g. {_examples(missing)}); "
            f"run cache_teacher again with --out {root}"
        )
    extra = {i for i, _ in index.rows} | set(index.no_mask)
    extra -= set(ids)
    if extra:
        problems.append(
            f"{root}: {len(extra)} cached id(s) not in the manifest's dataset (e.g. {_examples(extra)})"
        )
    problems += [
        f"{root}: ({i!r}): views have different shapes {sorted(s)}" for i, s in shapes.items() if len(s) > 1
    ]
    if dataset is not None:
        problems += [
            f"{root}: dataset {line}"
            for line in dataset_differences(manifest["dataset"], dataset.fingerprint())
        ]
        for id_ in tqdm(
            sorted(set(shapes) & set(dataset.ids)), desc="verify shapes", unit="img", leave=False
        ):
            image_shape = tuple(dataset.get(id_).image.shape[:2])
            if shapes[id_] != {image_shape}:
                problems.append(
                    f"{root}: {id_!r}: map shape {sorted(shapes[id_])} != image shape {image_shape}"
                )
    return problems


def cache_info(root: str | Path) -> dict:
    """Summary of a cache: teacher, views, counts, per-writer rows and bytes on disk, no_mask ids."""
    root = Path(root)
    manifest = read_manifest(root)
    ids, views = sorted(manifest["dataset"]["items"]), manifest["views"]
    index = load_index(root, views)
    writers = {}
    for number, writer in enumerate(index.writers):
        files = [root / f"{writer}{suffix}" for suffix in (DATA_SUFFIX, INDEX_SUFFIX)]
        writers[writer] = {
            "rows": sum(1 for r in index.rows.values() if r.writer == number),
            "bytes": sum(f.stat().st_size for f in files if f.exists()),
        }
    missing = index.missing(ids, views)
    no_mask = sorted(set(index.no_mask) & set(ids))
    return {
        "root": str(root),
        "format_version": manifest["format_version"],
        "teacher": manifest["teacher"],
        "views": views,
        "dtype": manifest["dtype"],
        "created": manifest.get("created", {}),
        "rows": len(index.rows),
        "ids_expected": len(ids),
        "ids_complete": len(ids) - len(missing) - len(no_mask),
        "ids_missing": len(missing),
        "no_mask": len(no_mask),
        "no_mask_ids": no_mask,
        "shapes": {
            f"{h}x{w}": n for (h, w), n in Counter((r.height, r.width) for r in index.rows.values()).items()
        },
        "writers": writers,
        "bytes_on_disk": sum(w["bytes"] for w in writers.values()) + (root / MANIFEST).stat().st_size,
    }


def merge_cache(dst: str | Path, *srcs: str | Path, link: bool = False) -> dict:
    """Merge caches written on different nodes into `dst` (created if needed); returns `cache_info(dst)`.

    Every source must have the same fingerprint as `dst`. A row present in several caches must have
    identical content (shape + checksum), else nothing is copied and CacheError lists the conflicts.
    Shards are copied (or hard-linked with `link=True`: then never write to the sources again);
    a writer id already taken in `dst` is renamed `<id>@<n>`.
    """
    dst = Path(dst)
    sources = [(Path(s), read_manifest(s)) for s in srcs]
    if not sources:
        raise CacheError("merge_cache: give at least one source cache")
    if (dst / MANIFEST).exists():
        target = read_manifest(dst)
    else:
        target = {**sources[0][1], "created": {**sources[0][1].get("created", {}), "merged_into": str(dst)}}
    for src, manifest in sources:
        differences = manifest_differences(target, manifest)
        if differences:
            raise CacheError(f"merge_cache: {src} differs from {dst}:\n  " + "\n  ".join(differences))
    # Plan everything before touching dst, so that a conflict leaves dst unchanged.
    seen = {
        _row_key(r): r
        for w in (writer_ids(dst) if dst.exists() else [])
        for r in parse_index(dst / f"{w}{INDEX_SUFFIX}").records
    }
    taken = set(writer_ids(dst)) if dst.exists() else set()
    plan, conflicts = [], []
    for src, _ in sources:
        for writer in writer_ids(src):
            records = []
            for record in parse_index(src / f"{writer}{INDEX_SUFFIX}").records:
                key = _row_key(record)
                if key not in seen:
                    seen[key] = record
                    records.append(record)
                elif not _same_content(seen[key], record):
                    conflicts.append(f"{key} in {src}/{writer}")
            name, n = writer, 1
            while name in taken:
                name, n = f"{writer}@{n}", n + 1
            taken.add(name)
            plan.append((src / writer, dst / name, records))
    if conflicts:
        raise CacheError(
            f"merge_cache: {len(conflicts)} (id, view) row(s) exist in several caches with different content "
            f"(e.g. {_examples(conflicts)}); nothing was merged. Remove the wrong rows' cache or recompute."
        )
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / MANIFEST).exists():
        _write_json_atomic(dst / MANIFEST, {**target, "writers": [], "counts": {}}, overwrite=False)
    for src_stem, dst_stem, records in tqdm(plan, desc=f"merge into {dst.name}", unit="shard", leave=False):
        src_data, dst_data = (stem.with_name(stem.name + DATA_SUFFIX) for stem in (src_stem, dst_stem))
        if src_data.exists():
            if link:
                os.link(src_data, dst_data)
            else:
                shutil.copyfile(src_data, dst_data)
        tmp = dst_stem.with_name(f".{dst_stem.name}{INDEX_SUFFIX}.tmp")
        tmp.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records))
        os.replace(
            tmp, dst_stem.with_name(dst_stem.name + INDEX_SUFFIX)
        )  # index last: rows appear only when their bytes are there
    refresh_manifest(dst)
    return cache_info(dst)
