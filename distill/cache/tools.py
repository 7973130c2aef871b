"""Whole-cache tools: verify, info, merge, and the manifest's summary refresh."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from distill.cache.format import (
    DATA_SUFFIX,
    DECODERS,
    FORMAT_VERSION,
    INDEX_SUFFIX,
    MANIFEST,
    changed_content,
    dataset_items,
    examples,
    manifest_differences,
    manifest_hashes,
    parse_index,
    read_manifest,
    row_key,
    same_content,
    write_json_atomic,
    writer_ids,
)
from distill.cache.reader import Index, load_index
from distill.errors import CacheError


def refresh_manifest(root: str | Path) -> dict:
    """Rewrite the manifest's informational "writers" and "counts" from the index files."""
    root = Path(root)
    manifest = read_manifest(root)
    info = cache_info(root)
    manifest["writers"] = [{"id": w, **stats} for w, stats in info["writers"].items()]
    manifest["counts"] = {k: info[k] for k in ("rows", "ids_complete", "ids_partial", "no_mask")}
    write_json_atomic(root / MANIFEST, manifest, overwrite=True)
    return manifest


def verify_cache(root: str | Path, dataset: Any = None) -> list[str]:
    """Every problem found in the cache at `root` (empty list: sound, and complete for `dataset`).

    Checks: readable manifest and indexes, each row in bounds of its data file with its checksum
    and no NaN/inf, the views of an id of one shape, no id cached for only some views. With
    `dataset` (a VesselDataset): every dataset id done for every view (or no_mask), from the item's
    current content (its hash), each map of the image's H x W. Cached ids beyond the dataset are fine.
    """
    root = Path(root)
    try:
        manifest = read_manifest(root)
    except CacheError as e:
        return [str(e)]
    index = load_index(root, manifest)
    problems = list(index.problems)
    problems += [f"{root}: rows written twice with different content: {c}" for c in index.conflicts]
    problems += [f"{root / (w + INDEX_SUFFIX)}: torn last record ignored (killed writer)" for w in index.torn]
    row_problems, shapes = _check_rows(root, index)
    problems += row_problems
    problems += [
        f"{root}: ({i!r}): views have different shapes {sorted(s)}" for i, s in shapes.items() if len(s) > 1
    ]
    ids = index.ids if dataset is None else list(dataset_items(dataset.fingerprint(), "verify dataset"))
    missing = index.missing(ids, manifest["views"])
    if missing:
        problems.append(
            f"{root}: {len(missing)} of {len(ids)} id(s) lack a map for some view (e.g. {examples(missing)}); "
            f"run cache_teacher again with --out {root}"
        )
    if dataset is not None:
        problems += _check_dataset(root, index, shapes, dataset)
    return problems


def _check_rows(root: Path, index: Index) -> tuple[list[str], dict[str, set[tuple[int, int]]]]:
    """Problems of the stored rows (bounds, encoding, checksum, finite values) and each id's map shapes."""
    problems = []
    data = [root / f"{w}{DATA_SUFFIX}" for w in index.writers]
    maps = [np.memmap(p, dtype=np.uint8, mode="r") if p.exists() and p.stat().st_size else None for p in data]
    shapes: dict[str, set[tuple[int, int]]] = {}
    for (id_, view), row in tqdm(
        sorted(index.rows.items()), desc=f"verify {root.name}", unit="map", leave=False
    ):
        where = f"{data[row.writer]} ({id_!r}, {view!r})"
        end = row.offset + row.nbytes
        if maps[row.writer] is None or end > maps[row.writer].shape[0]:
            problems.append(f"{where}: row ends at byte {end}, past the end of the file")
            continue
        if row.encoding not in DECODERS:
            problems.append(f"{where}: unknown encoding {row.encoding!r}")
            continue
        buffer = maps[row.writer][row.offset : end]
        if zlib.crc32(buffer) != row.crc32:
            problems.append(f"{where}: checksum mismatch (bytes changed after writing)")
        values = DECODERS[row.encoding](buffer, row.height, row.width)
        if not np.isfinite(values).all():
            problems.append(f"{where}: {int((~np.isfinite(values)).sum())} NaN/inf value(s)")
        shapes.setdefault(id_, set()).add((row.height, row.width))
    return problems, shapes


def _check_dataset(
    root: Path, index: Index, shapes: dict[str, set[tuple[int, int]]], dataset: Any
) -> list[str]:
    """Problems of the cache against `dataset`: ids cached from other content, maps of the wrong size."""
    items = dataset_items(dataset.fingerprint(), "verify dataset")
    changed = index.changed(items)
    shared = len(set(items) & set(index.ids))
    problems = [changed_content(root, changed, shared, read_manifest(root))] if changed else []
    for id_ in tqdm(sorted(set(shapes) & set(dataset.ids)), desc="verify shapes", unit="img", leave=False):
        image_shape = tuple(dataset.get(id_).image.shape[:2])
        if shapes[id_] != {image_shape}:
            problems.append(f"{root}: {id_!r}: map shape {sorted(shapes[id_])} != image shape {image_shape}")
    return problems


def cache_info(root: str | Path) -> dict:
    """Summary of a cache: teacher, views, counts, per-writer rows and bytes on disk, no_mask ids.

    ids_complete: ids with a map for every view; ids_partial: ids with maps for some views only (an
    interrupted run; a rerun completes them); no_mask: ids the teacher gave no map for."""
    root = Path(root)
    manifest = read_manifest(root)
    views = manifest["views"]
    index = load_index(root, manifest)
    writers = {}
    for number, writer in enumerate(index.writers):
        files = [root / f"{writer}{suffix}" for suffix in (DATA_SUFFIX, INDEX_SUFFIX)]
        writers[writer] = {
            "rows": sum(1 for r in index.rows.values() if r.writer == number),
            "bytes": sum(f.stat().st_size for f in files if f.exists()),
        }
    status = {i: index.status(i, views) for i in index.ids}
    no_mask = sorted(i for i, s in status.items() if s == "no_mask")
    return {
        "root": str(root),
        "format_version": manifest["format_version"],
        "teacher": manifest["teacher"],
        "views": views,
        "dtype": manifest["dtype"],
        "created": manifest.get("created", {}),
        "rows": len(index.rows),
        "ids_complete": sum(s == "ok" for s in status.values()),
        "ids_partial": sum(s is None for s in status.values()),
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

    Every source must have the teacher, views and dtype of `dst` (their datasets may differ: a cache
    grows with its dataset). A row present in several caches must have identical content (shape,
    checksum, item hash), and all rows of an id the same item hash, else nothing is copied and
    CacheError lists the conflicts. Shards are copied (or hard-linked with `link=True`: then never
    write to the sources again); a writer id already taken in `dst` is renamed `<id>@<n>`.
    """
    dst = Path(dst)
    sources = [(Path(s), read_manifest(s)) for s in srcs]
    if not sources:
        raise CacheError("merge_cache: give at least one source cache")
    if (dst / MANIFEST).exists():
        target = read_manifest(dst)
    else:
        first = sources[0][1]
        created = {**first.get("created", {}), "merged_into": str(dst)}
        target = {**first, "format_version": FORMAT_VERSION, "created": created, "writers": [], "counts": {}}
    for src, manifest in sources:
        differences = manifest_differences(target, manifest)
        if differences:
            raise CacheError(f"merge_cache: {src} differs from {dst}:\n  " + "\n  ".join(differences))
    plan = _plan_merge(dst, target, sources)  # before touching dst, so that a conflict leaves it unchanged
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / MANIFEST).exists():
        write_json_atomic(dst / MANIFEST, target, overwrite=False)
    for src_stem, dst_stem, records in tqdm(plan, desc=f"merge into {dst.name}", unit="shard", leave=False):
        src_data, dst_data = (stem.with_name(stem.name + DATA_SUFFIX) for stem in (src_stem, dst_stem))
        if src_data.exists():
            if link:
                os.link(src_data, dst_data)
            else:
                shutil.copyfile(src_data, dst_data)
        tmp = dst_stem.with_name(f".{dst_stem.name}{INDEX_SUFFIX}.tmp")
        tmp.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in records))
        # The index last: rows appear only when their bytes are there.
        os.replace(tmp, dst_stem.with_name(dst_stem.name + INDEX_SUFFIX))
    refresh_manifest(dst)
    return cache_info(dst)


def _plan_merge(
    dst: Path, target: dict, sources: list[tuple[Path, dict]]
) -> list[tuple[Path, Path, list[dict]]]:
    """(source shard stem, destination stem, index records new to dst) per source writer, or CacheError."""
    existing = writer_ids(dst) if dst.exists() else []
    seen = {
        row_key(r): r
        for w in existing
        for r in parse_index(dst / f"{w}{INDEX_SUFFIX}", manifest_hashes(target)).records
    }
    hashes = {key[0]: r["hash"] for key, r in seen.items()}
    taken, plan, conflicts = set(existing), [], []
    for src, manifest in sources:
        for writer in writer_ids(src):
            records = []
            for record in parse_index(src / f"{writer}{INDEX_SUFFIX}", manifest_hashes(manifest)).records:
                key = row_key(record)
                if key in seen and not same_content(seen[key], record):
                    conflicts.append(f"{key} in {src}/{writer}")
                elif hashes.setdefault(record["id"], record["hash"]) != record["hash"]:
                    conflicts.append(
                        f"{key} in {src}/{writer} (computed from other content than the id's rows)"
                    )
                elif key not in seen:
                    seen[key] = record
                    records.append(
                        record
                    )  # with its item hash: the destination may not know the source's items
            if not records:  # every row is in dst already: copy nothing, so merging again changes nothing
                continue
            name, n = writer, 1
            while name in taken:
                name, n = f"{writer}@{n}", n + 1
            taken.add(name)
            plan.append((src / writer, dst / name, records))
    if conflicts:
        raise CacheError(
            f"merge_cache: {len(conflicts)} (id, view) row(s) exist in several caches with different content "
            f"(e.g. {examples(conflicts)}); nothing was merged. Remove the wrong rows' cache or recompute."
        )
    return plan
