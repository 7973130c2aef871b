"""Images/s of Sa2VA's own generate path vs the teacher-forced path, on a Sa2VA-4B-size model built from
Sa2VA's real code with random weights (`scripts/sa2va_real.py --size 4b`), one GPU.

    python scripts/bench_sa2va_teacher_forced.py /path/to/Sa2VA/projects/sa2va/hf/models \\
        --images 32 --out benchmarks/sa2va_teacher_forced.json

Both paths run through the adapter (`create_teacher("sa2va", ...)`), with image preparation included:
generate = `predict_forward` one image per call (token-by-token answer, self-check); teacher-forced at
batch 1 and at batch `--batch` (one LLM forward per batch, SAM2 per image), its own sample check off so
that only the path is timed. Mask agreement: each forced map against the generate map of the same image
(what the sample check measures). Synthetic 512² fundus images; two warm-up images per path first.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(teacher, images: list[np.ndarray], batch: int) -> tuple[list, float]:
    """Maps of every image in batches of `batch`, and the wall seconds (GPU synchronised)."""
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    maps = []
    for i in range(0, len(images), batch):
        maps += teacher.predict_logits(images[i : i + batch])
    torch.cuda.synchronize()
    return maps, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("code_dir", help="Sa2VA's projects/sa2va/hf/models folder (a local clone)")
    parser.add_argument("--size", default="4b", choices=["tiny", "4b"])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default="/tmp/sa2va_bench_model", help="where the built checkpoint goes")
    parser.add_argument("--out", default="benchmarks/sa2va_teacher_forced.json")
    args = parser.parse_args()

    import torch

    from distill.synth import generate_sample
    from distill.teachers import create_teacher
    from distill.teachers.sa2va_forced import mask_agreement
    from scripts.sa2va_real import build, count_parameters

    start = time.perf_counter()
    model = build(args.code_dir, args.model, size=args.size, device="cuda")
    build_s = time.perf_counter() - start
    images = [generate_sample(seed, 512).image for seed in range(args.images + 2)]
    warmup, images = images[:2], images[2:]
    options = {"model_path": str(model), "trust_remote_code": True, "devices": [0]}

    generate = create_teacher("sa2va", **options)
    generate.predict_logits(warmup)
    reference, generate_s = timed(generate, images, 1)
    report = {"generate_b1": {"images_per_s": len(images) / generate_s, "seconds": generate_s}}
    report["generate_stats"] = generate.stats()
    generate.close()
    del generate
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    forced = create_teacher("sa2va", **options, path="teacher_forced", check_first=0, check_every=0)
    forced.predict_logits(warmup)  # also finds the answer with Sa2VA's own generation
    for batch in (1, args.batch):
        maps, seconds = timed(forced, images, batch)
        agreement = [
            mask_agreement(m, r, image.shape[:2]) for m, r, image in zip(maps, reference, images, strict=True)
        ]
        report[f"teacher_forced_b{batch}"] = {
            "images_per_s": len(images) / seconds,
            "seconds": seconds,
            "speedup_vs_generate": generate_s / seconds,
            "mean_mask_agreement": float(np.mean(agreement)),
            "min_mask_agreement": float(np.min(agreement)),
        }
    report["teacher_forced_stats"] = forced.stats()
    report.update(
        device=torch.cuda.get_device_name(0),
        date=time.strftime("%Y-%m-%d"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        python=platform.python_version(),
        torch=torch.__version__,
        model_size=args.size,
        parameters=count_parameters(model),
        build_and_save_s=round(build_s, 1),
        images=len(images),
        image_size=512,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for key in ("generate_b1", "teacher_forced_b1", f"teacher_forced_b{args.batch}"):
        print(key, json.dumps(report[key]))
    print(
        "parameters",
        report["parameters"],
        "fallbacks",
        report["teacher_forced_stats"]["teacher_forced"]["fallback"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
