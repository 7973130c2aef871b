"""Run `python -m distill.cache_teacher` on a random-weight Sa2VA built from Sa2VA's real code, on GPUs.

    python scripts/check_sa2va_real.py /path/to/Sa2VA/projects/sa2va/hf/models --out benchmarks/sa2va_real_check.json

CI cannot run this (it needs Sa2VA's code, which we never commit, and a GPU): it is the check that the
adapter works on the real thing. It builds a tiny checkpoint with `scripts/sa2va_real.py` (the real
InternViT, Qwen2 LLM, SAM2 Hiera-L and remote-code loading; few LLM layers), writes a synthetic dataset,
and caches it with the CLI as a user would:

  generate          Sa2VA's own predict_forward on 1 GPU (self-check against its masks), then a rerun
                    that must find nothing to do, and the same model copied to another path (accepted);
  teacher_forced    the batched path on 1 GPU (greedy check, sample check vs predict_forward);
  views             full model per view (identity, hflip, rot90) vs `sam2_views` (LLM once, SAM2 per view);
  sharded           generate and teacher_forced with --gpus-per-model 2 (one model over two GPUs; when 2
                    GPUs are visible).

Every cache is `--verify`d; forced and generated caches are compared map by map. The JSON holds every
run's summary and the comparisons; the exit status is 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.cache import TeacherCache  # noqa: E402
from distill.teachers.sa2va_forced import mask_agreement  # noqa: E402


def cache_teacher(work: Path, name: str, model: Path, data: Path, *flags: str, gpus: str = "0") -> dict:
    """One CLI run into work/name; returns its summary (plus the tail of its output and its exit code)."""
    out, summary = work / name, work / f"{name}.json"
    command = [sys.executable, "-m", "distill.cache_teacher", "--teacher", "sa2va", "--model-path", str(model),
               "--trust-remote-code", "--data-format", "merged", "--data-root", str(data), "--out", str(out),
               "--batch-size", "8", "--summary-json", str(summary), *flags]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
    start = time.perf_counter()
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    result = json.loads(summary.read_text()) if summary.exists() and run.returncode == 0 else {}
    result.update(returncode=run.returncode, seconds=round(time.perf_counter() - start, 1))
    result["output_tail"] = [line for line in (run.stdout + run.stderr).splitlines() if "it/s" not in line][
        -12:
    ]
    verify = subprocess.run([sys.executable, "-m", "distill.cache_teacher", "--verify", str(out)], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
    result["verify"] = (verify.stdout + verify.stderr).strip().splitlines()[-1:]
    result["verified"] = verify.returncode == 0
    print(
        f"{name}: exit {run.returncode}, verify {'OK' if result['verified'] else 'FAILED'}, {result['seconds']} s"
    )
    print("  " + "\n  ".join(result["output_tail"][-6:]))
    return result


def compare(work: Path, a: str, b: str, views: list[str]) -> dict:
    """Mask agreement and max |logit difference| of two caches over every (id, view) both hold."""
    first, second = TeacherCache(work / a), TeacherCache(work / b)
    per_view = {}
    for view in views:
        agreements, diffs = [], []
        for item_id in sorted(set(first.ids) & set(second.ids)):
            x, y = first.read(item_id, view), second.read(item_id, view)
            agreements.append(mask_agreement(x, y, x.shape))
            diffs.append(float(np.abs(x.astype(np.float32) - y.astype(np.float32)).max()))
        per_view[view] = {
            "images": len(agreements),
            "mean_agreement": float(np.mean(agreements)),
            "min_agreement": float(np.min(agreements)),
            "max_abs_logit_diff": float(np.max(diffs)),
        }
    return per_view


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("code_dir", help="Sa2VA's projects/sa2va/hf/models folder (a local clone)")
    parser.add_argument(
        "--work", default="/tmp/sa2va_real_check", help="scratch folder (model, data, caches)"
    )
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/sa2va_real_check.json")
    args = parser.parse_args()

    import torch

    from distill.synth import make_dataset
    from scripts.sa2va_real import build, count_parameters

    if not torch.cuda.is_available():
        raise SystemExit("check_sa2va_real: needs a CUDA GPU (Sa2VA's code calls .cuda())")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    model = build(args.code_dir, work / "model", size="tiny", device="cuda")
    build_s = time.perf_counter() - start
    data = make_dataset(work / "data", count=args.images, size=args.size, style="fundus", seed=0)
    views = ["identity", "hflip", "rot90"]
    runs = {
        "generate_1gpu": cache_teacher(work, "generate_1gpu", model, data),
        "forced_1gpu": cache_teacher(work, "forced_1gpu", model, data, "--teacher-option", "path=teacher_forced",
                                     "--teacher-option", "check_every=4"),  # fmt: skip
        "views_generate": cache_teacher(work, "views_generate", model, data, "--views", ",".join(views)),
        "views_sam2": cache_teacher(work, "views_sam2", model, data, "--views", ",".join(views),
                                    "--teacher-option", "path=teacher_forced", "--teacher-option", "sam2_views=true"),
    }  # fmt: skip
    rerun = cache_teacher(work, "generate_1gpu", model, data)
    moved = shutil.copytree(model, work / "moved" / "model")
    rerun_moved = cache_teacher(work, "generate_1gpu", moved, data)
    if torch.cuda.device_count() >= 2:
        runs["generate_2gpu_sharded"] = cache_teacher(work, "generate_2gpu_sharded", model, data,
                                                      "--gpus-per-model", "2", gpus="0,1")  # fmt: skip
        runs["forced_2gpu_sharded"] = cache_teacher(work, "forced_2gpu_sharded", model, data, "--gpus-per-model", "2",
                                                    "--teacher-option", "path=teacher_forced", gpus="0,1")  # fmt: skip
    comparisons = {
        "forced_vs_generate": compare(work, "forced_1gpu", "generate_1gpu", ["identity"]),
        "sam2_views_vs_full_model_per_view": compare(work, "views_sam2", "views_generate", views),
    }
    if "generate_2gpu_sharded" in runs:
        comparisons["sharded_vs_1gpu_generate"] = compare(
            work, "generate_2gpu_sharded", "generate_1gpu", ["identity"]
        )
        comparisons["sharded_vs_1gpu_forced"] = compare(
            work, "forced_2gpu_sharded", "forced_1gpu", ["identity"]
        )
    checks = {
        name: run["returncode"] == 0 and run["verified"] and run.get("done", 0) > 0
        for name, run in runs.items()
    }
    checks["rerun_nothing_to_do"] = rerun["returncode"] == 0 and any(
        "nothing to do" in x for x in rerun["output_tail"]
    )
    checks["moved_model_accepted"] = rerun_moved["returncode"] == 0 and any(
        "nothing to do" in x for x in rerun_moved["output_tail"]
    )
    checks["forced_equals_generate"] = comparisons["forced_vs_generate"]["identity"]["min_agreement"] >= 0.98
    report = {
        "device": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "images": args.images,
        "image_size": args.size,
        "build_s": round(build_s, 1),
        "parameters": count_parameters(model),
        "runs": runs,
        "rerun": rerun,
        "rerun_moved_model": rerun_moved,
        "comparisons": comparisons,
        "checks": checks,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({"checks": checks, "comparisons": comparisons}, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
