"""The on-disk format of the teacher cache: layout, manifest and index-record schema, fingerprint comparison.

Layout of a cache directory (one per teacher x views; it grows with its dataset)::

    <root>/manifest.json       format_version, teacher fingerprint, views, dtype, dataset (as first
                               cached, with its source; informational), created, writers, counts
    <root>/<writer_id>.f16     raw little-endian float16 rows, appended; read through np.memmap
    <root>/<writer_id>.index   JSON lines, one per finished row: {"id", "view", "status": "ok", "offset",
                               "shape": [h, w], "nbytes", "encoding": "f16", "crc32", "hash"}, or a status
                               record {"id", "view": null|view, "status": "no_mask", "hash"} (no map stored)

A row is one (id, view) map at the image's own H x W, in the original orientation (`invert_view`
already applied). "encoding" is per row so that compressed or native-resolution rows can be added
later behind the same reader; today only "f16" exists. "hash" is the input hash of the item the
row was computed from (`VesselDataset.input_hash`: its image and text, what the teacher saw): the dataset is compared per id, so a rerun on
a grown dataset computes only the new ids, training accepts any cache holding its ids with their
current hashes, and an id whose content changed is refused by id. Version-1 records have no "hash";
theirs is the manifest's `dataset.items[id]` (version-1 writers were bound to that dataset).

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
teacher, views and dtype accepts it, a different one is refused. The manifest's "writers" and
"counts" are a summary rewritten on close (last closer wins): readers never trust it and scan
`*.index`. Caches written on different nodes are joined with `merge_cache`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from distill import __version__
from distill.errors import CacheError
from distill.views import check_views, same_views

# 2: each index record carries the input hash of the item it was computed from ("hash"), so a cache
# grows with its dataset; version-1 records take theirs from the manifest's dataset items.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
DATA_SUFFIX = ".f16"
INDEX_SUFFIX = ".index"
STATUSES = ("ok", "no_mask")
MANIFEST_KEYS = ("format_version", "dtype", "views", "teacher", "dataset")
# What must agree between two writers/caches for their rows to be interchangeable (the dataset is
# compared per id, through the rows' item hashes).
COMPARED_KEYS = ("dtype", "views")
F16 = np.dtype("<f2")
F16_MAX = float(np.finfo(np.float16).max)
WRITER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
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
    return buffer.view(F16).reshape(height, width)


# encoding name -> decoder(uint8 buffer, h, w) -> float16 HxW. Future: "f16_zstd", "f16_native".
DECODERS = {"f16": _decode_f16}


# ---------------------------------------------------------------- small helpers


def rebuild_hint(root: Path) -> str:
    return f"rebuild with `python -m distill.cache_teacher ... --out NEW_DIR` (or delete {root})"


def examples(items: Iterable[Any]) -> str:
    items = sorted(items, key=str)
    shown = ", ".join(str(x) for x in items[:_EXAMPLES])
    return shown + (", ..." if len(items) > _EXAMPLES else "")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plain(value: Any) -> Any:
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
    a, b = _flatten(plain(cached)), _flatten(plain(given))
    return [
        f"{key}: cache {_short(a.get(key, '<absent>'))} vs given {_short(b.get(key, '<absent>'))}"
        for key in sorted(set(a) | set(b))
        if a.get(key, "<absent>") != b.get(key, "<absent>")
    ]


def dataset_items(fingerprint: dict, what: str) -> dict[str, str]:
    """The {id: input hash} of a dataset fingerprint (`VesselDataset.fingerprint()`), or CacheError."""
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("items"), dict):
        raise CacheError(f"{what}: dataset fingerprint has no 'items' {{id: input_hash}} dict")
    return fingerprint["items"]


def manifest_differences(cached: dict, given: dict) -> list[str]:
    """Human lines for every field of two manifests whose rows could not be mixed (empty: compatible).

    The teacher, views and dtype are compared; the dataset is not (rows carry their items' hashes)."""
    lines = []
    for key in COMPARED_KEYS:
        cached_value, given_value = plain(cached.get(key)), plain(given.get(key))
        if key == "views" and isinstance(cached_value, list) and isinstance(given_value, list):
            differ = not same_views(cached_value, given_value)  # rows are keyed by view, not by order
        else:
            differ = cached_value != given_value
        if differ:
            lines.append(f"{key}: cache {_short(cached.get(key))} vs given {_short(given.get(key))}")
    lines += [f"teacher {line}" for line in teacher_differences(cached["teacher"], given["teacher"])]
    return lines


def check_same_teacher(root: Path, cached: dict, given: dict) -> None:
    """CacheError naming every difference when `given` (a manifest) may not add rows to the cache at `root`."""
    differences = manifest_differences(cached, given)
    if differences:
        raise CacheError(
            f"{root / MANIFEST}: this cache was made by a different teacher/views:\n  "
            + "\n  ".join(differences)
            + f"\nUse a new --out directory, or delete {root} to rebuild it."
        )


def changed_content(root: Path, changed: list[str], shared: int, manifest: dict) -> str:
    """The refusal for ids whose cached rows were computed from other inputs than the dataset's now.

    `shared`: how many ids the dataset and the cache both hold. When most of them differ, the cache was
    most likely made for another dataset, and the message says so (with where that one was)."""
    if shared and len(changed) > shared // 2:
        source = (manifest.get("dataset") or {}).get("source") or {}
        where = f" (it was created from {source['data_root']})" if source.get("data_root") else ""
        return (
            f"{root}: teacher cache does not match the dataset: {len(changed)} of the {shared} id(s) both hold "
            f"were cached from other images or texts (e.g. {examples(changed)}): this cache was most likely "
            f"made for another dataset{where}. Fix: point data.cache_dir / --out at that dataset's cache, "
            f"or {rebuild_hint(root)}"
        )
    return (
        f"{root}: teacher cache does not match the dataset: {len(changed)} id(s) with changed content since "
        f"they were cached (e.g. {examples(changed)}): their image or text differs from what the teacher's rows were "
        "computed from (a fixed mask or polygon does not count). Fix: restore those items, or give the "
        f"edited items new ids (ids already cached are kept, new ids are computed by a rerun), or "
        f"{rebuild_hint(root)}"
    )


def write_json_atomic(path: Path, data: dict, *, overwrite: bool) -> bool:
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
        raise CacheError(f"{path}: manifest is not valid JSON ({e}); {rebuild_hint(Path(root))}") from e
    missing = [k for k in MANIFEST_KEYS if k not in manifest]
    if missing:
        raise CacheError(f"{path}: manifest lacks {missing}; {rebuild_hint(Path(root))}")
    if manifest["format_version"] > FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format {manifest['format_version']} is newer than this distill "
            f"({__version__}, format {FORMAT_VERSION}); upgrade vessel-distill"
        )
    return manifest


def complete_manifest(manifest: dict) -> dict:
    """Validate the caller's manifest (teacher, dataset, views[, dtype, command]) and add creation info."""
    for key in ("teacher", "dataset", "views"):
        if key not in manifest:
            raise CacheError(f"CacheWriter manifest needs '{key}' (got keys {sorted(manifest)})")
    if not isinstance(manifest["teacher"], dict):
        raise CacheError("CacheWriter manifest: 'teacher' must be the teacher's fingerprint dict")
    dataset_items(manifest["dataset"], "CacheWriter manifest")
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
        "teacher": plain(manifest["teacher"]),
        "dataset": plain(manifest["dataset"]),
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
    wanted = complete_manifest(manifest)
    if write_json_atomic(root / MANIFEST, wanted, overwrite=False):
        return wanted
    existing = read_manifest(root)
    check_same_teacher(root, existing, wanted)
    return existing


# ---------------------------------------------------------------- index files


class IndexFile(NamedTuple):
    records: list[dict]
    good_bytes: int  # length of the prefix made of complete, valid lines
    torn_tail: bool  # a partial/garbled last line was ignored
    errors: list[str]  # garbled lines *before* the last one (real corruption)


def parse_index(path: Path, hashes: Mapping[str, str]) -> IndexFile:
    """Parse a writer's JSON-lines index; a torn last line (killed writer) is ignored, not an error.

    Every record comes back with its "hash"; a version-1 record has none and takes its id's from
    `hashes` (the manifest's dataset items, which version-1 writers were bound to)."""
    raw = path.read_bytes() if path.exists() else b""
    complete = raw[: raw.rfind(b"\n") + 1]  # a last line without its newline never finished committing
    records, errors = [], []
    for number, line in enumerate(complete.split(b"\n")[:-1]):
        try:
            record = json.loads(line)
            _check_record(record)
            record.setdefault("hash", hashes.get(record["id"]))
            if not isinstance(record["hash"], str):
                raise ValueError(f"no item hash for id {record['id']!r}")
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


def manifest_hashes(manifest: dict) -> dict[str, str]:
    """The item hashes version-1 records stand for: the items of the dataset the cache was created from."""
    items = manifest["dataset"].get("items") if isinstance(manifest["dataset"], dict) else None
    return items if isinstance(items, dict) else {}


def row_key(record: dict) -> tuple[str, str | None]:
    return record["id"], record["view"]


def same_content(a: dict, b: dict) -> bool:
    fields = ("status", "shape", "encoding", "crc32", "nbytes", "hash")
    return all(a.get(f) == b.get(f) for f in fields)
