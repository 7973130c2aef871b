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
    INDEX_SUFFIX,
    MANIFEST,
    dataset_differences,
    examples,
    manifest_differences,
    parse_index,
    read_manifest,
    row_key,
    same_content,
    write_json_atomic,
    writer_ids,
)
from distill.cache.reader import load_index
from distill.errors import CacheError


def refresh_manifest(root: str | Path) -> dict:
    """Rewrite the manifest's informational "writers" and "counts" from the index files."""
    root = Path(root)
    manifest = read_manifest(root)
    info = cache_info(root)
    manifest["writers"] = [{"id": w, **stats} for w, stats in info["writers"].items()]
    manifest["counts"] = {
        k: info[k] for k in ("rows", "ids_expected", "ids_complete", "ids_missing", "no_mask")
    }
    write_json_atomic(root / MANIFEST, manifest, overwrite=True)
    return manifest


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
            f"{root}: {len(missing)} of {len(ids)} id(s) lack a map for some view (e.g. {examples(missing)}); "
            f"run cache_teacher again with --out {root}"
        )
    extra = {i for i, _ in index.rows} | set(index.no_mask)
    extra -= set(ids)
    if extra:
        problems.append(
            f"{root}: {len(extra)} cached id(s) not in the manifest's dataset (e.g. {examples(extra)})"
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
        row_key(r): r
        for w in (writer_ids(dst) if dst.exists() else [])
        for r in parse_index(dst / f"{w}{INDEX_SUFFIX}").records
    }
    taken = set(writer_ids(dst)) if dst.exists() else set()
    plan, conflicts = [], []
    for src, _ in sources:
        for writer in writer_ids(src):
            records = []
            for record in parse_index(src / f"{writer}{INDEX_SUFFIX}").records:
                key = row_key(record)
                if key not in seen:
                    seen[key] = record
                    records.append(record)
                elif not same_content(seen[key], record):
                    conflicts.append(f"{key} in {src}/{writer}")
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
    dst.mkdir(parents=True, exist_ok=True)
    if not (dst / MANIFEST).exists():
        write_json_atomic(dst / MANIFEST, {**target, "writers": [], "counts": {}}, overwrite=False)
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
