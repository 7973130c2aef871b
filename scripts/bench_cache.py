"""Benchmark the teacher cache: random-access read speed, and the overhead of caching over the teacher.

    python scripts/bench_cache.py                                   # frangi on CPU
    python scripts/bench_cache.py --teacher checkpoint --teacher-option checkpoints=students/x/checkpoints/best.ckpt

(1) reads: `--read-maps` float16 maps of `--size`² written with CacheWriter, read back through
    TeacherCache in random order (page cache warm: the maps were just written), maps/s.
(2) overhead: the same synthetic images through the caching pipeline (`distill.caching.run_job`, what
    `python -m distill.cache_teacher` runs) and through the bare teacher (`predict_logits` on preloaded images, same batch size); overhead =
    cache wall time / bare forward time - 1. Target: < 5%.
Writes JSON to --out (default benchmarks/cache_<device>.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from distill.cache import CacheWriter, TeacherCache
from distill.caching import CacheJob, create_job_teacher, fit_teacher, run_job
from distill.cli import key_value
from distill.data import open_dataset
from distill.synth import make_dataset


def device_name() -> str:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def bench_reads(work: Path, n_maps: int, size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = [f"img{i:06d}" for i in range(n_maps)]
    manifest = {
        "teacher": {"name": "random"},
        "dataset": {"items": {i: i for i in ids}},
        "views": ["identity"],
    }
    start = time.perf_counter()
    with CacheWriter(work / "reads", "bench", manifest) as writer:
        for item_id in ids:
            writer.write(item_id, "identity", rng.normal(size=(size, size)).astype(np.float32))
    write_s = time.perf_counter() - start
    cache = TeacherCache(work / "reads")
    cache.read(ids[0])  # parse the index once, outside the timing (it is parsed once per reader)
    order = rng.permutation(n_maps)
    start = time.perf_counter()
    checksum = 0.0
    for k in order:
        checksum += float(cache.read(ids[k])[size // 2, size // 2])
    read_s = time.perf_counter() - start
    return {
        "maps": n_maps,
        "size": size,
        "write_maps_per_s": n_maps / write_s,
        "read_maps_per_s": n_maps / read_s,
        "read_mb_per_s": n_maps * size * size * 2 / read_s / 1e6,
        "checksum": checksum,
    }


def bench_overhead(work: Path, args: argparse.Namespace) -> dict:
    data = make_dataset(work / "data", count=args.images, size=args.size, style="fundus", seed=0)
    job = CacheJob(
        teacher=args.teacher,
        teacher_options=dict(args.teacher_option),
        data_format="merged",
        data_root=data,
        out=work / "c",
        batch_size=args.batch_size,
    )
    summary = run_job(job)

    # The bare teacher on the same images, preloaded, same batches.
    dataset = open_dataset("merged", data)
    teacher = create_job_teacher(job, [0] if torch.cuda.is_available() else None)
    if teacher.needs_fit:
        fit_teacher(job, teacher, dataset)
    images = [dataset.get(i).image for i in dataset.ids]
    teacher.predict_logits(images[: args.batch_size])  # warm-up (loading, CUDA kernels), as the cache run had
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(images), args.batch_size):
        teacher.predict_logits(images[i : i + args.batch_size])
    bare_s = time.perf_counter() - start
    return {
        "teacher": args.teacher,
        "teacher_options": dict(args.teacher_option),
        "images": args.images,
        "size": args.size,
        "batch_size": args.batch_size,
        "bare_forward_s": bare_s,
        "cache_wall_s": summary["wall_s"],
        "cache_forward_s": summary["forward_s"],
        "overhead_vs_bare_pct": 100 * (summary["wall_s"] / bare_s - 1),
        "overhead_in_run_pct": summary["overhead_pct"],
        "images_per_s": summary["images_per_s"],
        "peak_memory_gib": summary.get("peak_memory_gib"),
    }


def main_bench(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", default="frangi")
    parser.add_argument("--teacher-option", action="append", type=key_value, default=[], metavar="K=V")
    parser.add_argument("--images", type=int, default=32, help="synthetic images for the overhead run")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--read-maps", type=int, default=1000)
    parser.add_argument("--workdir", help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", help="JSON result (default benchmarks/cache_<device>.json)")
    args = parser.parse_args(argv)
    device = device_name()
    out = Path(args.out or f"benchmarks/cache_{device}.json")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        reads = bench_reads(work, args.read_maps, args.size)
        overhead = bench_overhead(work, args)
    result = {
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S%z"),
        "command": " ".join([sys.executable, *sys.argv]),
        "host": platform.node(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "reads": reads,
        "overhead": overhead,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{'device':28s} {device}")
    print(
        f"{'random reads (maps/s)':28s} {reads['read_maps_per_s']:.0f}  ({reads['maps']} x {reads['size']}², {reads['read_mb_per_s']:.0f} MB/s)"
    )
    print(f"{'writes (maps/s)':28s} {reads['write_maps_per_s']:.0f}")
    print(
        f"{'teacher':28s} {overhead['teacher']} on {overhead['images']} x {overhead['size']}², batch {overhead['batch_size']}"
    )
    print(f"{'bare teacher forward (s)':28s} {overhead['bare_forward_s']:.2f}")
    print(
        f"{'cache_teacher wall (s)':28s} {overhead['cache_wall_s']:.2f}  (its forward {overhead['cache_forward_s']:.2f})"
    )
    print(f"{'overhead vs bare teacher':28s} {overhead['overhead_vs_bare_pct']:+.1f}%")
    print(f"{'overhead within the run':28s} {overhead['overhead_in_run_pct']:+.1f}%")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main_bench())
