"""A stand-in teacher run for the cache tests: a real process that fills a cache with CacheWriter.

Maps are a pure function of (id, view) and shapes differ per id, so an interrupted-then-resumed run
can be compared byte for byte with an uninterrupted one. Every 7th id gets status no_mask.
Prints one line per row it computes (flushed, so the parent can kill it mid-run), then "computed N".
"""

from __future__ import annotations

import argparse
import time
import zlib

import numpy as np

from distill.cache import CacheWriter

VIEWS = ["identity", "hflip"]


def make_ids(count: int) -> list[str]:
    return [f"img{i:03d}" for i in range(count)]


def make_manifest(count: int, teacher_version: int = 1) -> dict:
    items = {i: f"sha-{i}" for i in make_ids(count)}
    return {
        "teacher": {"name": "fake", "version": teacher_version, "prompt": "segment the vessels"},
        "dataset": {"format": "merged", "n_items": count, "digest": "digest", "items": items},
        "views": VIEWS,
    }


def fake_logits(id: str, view: str) -> np.ndarray | None:
    number = int(id[3:])
    if number % 7 == 6:
        return None
    rng = np.random.default_rng(zlib.crc32(f"{id}/{view}".encode()))
    return rng.normal(0, 4, size=(24 + number % 5, 32 - number % 3)).astype(np.float32)


def run(root: str, writer_id: str, count: int, part: int, parts: int, delay: float, commit_every: int) -> int:
    computed = 0
    with CacheWriter(
        root, writer_id, make_manifest(count), commit_every=commit_every, commit_seconds=60
    ) as w:
        for id in w.todo(make_ids(count)[part::parts]):
            if fake_logits(id, VIEWS[0]) is None:
                w.write_status(id)
                computed += 1
                print("no_mask", id, flush=True)
                continue
            for view in VIEWS:
                if not w.done(id, view):
                    time.sleep(delay)
                    w.write(id, view, fake_logits(id, view))
                    computed += 1
                    print("row", id, view, flush=True)
    print("computed", computed, flush=True)
    return computed


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("writer_id")
    parser.add_argument("--count", type=int, default=14)
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--parts", type=int, default=1)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--commit-every", type=int, default=3)
    a = parser.parse_args()
    run(a.root, a.writer_id, a.count, a.part, a.parts, a.delay, a.commit_every)
