"""What each part of the Lightning training step costs: bench_fit's `loop` figure (the Trainer on one
pre-made batch, no data pipeline) with parts of DistillModule.training_step taken away, in one process.

Figures vary by several tens of percent between GPU machines of one kind, so only variants measured
together compare. Variants (each may repeat, to see the spread within a process):

  pure              bench_fit's `pure`: the module's loss, backward, clipping, AdamW, without the Trainer
  as_is             the `loop` figure
  loss_only         training_step returns the loss alone: no finiteness check, epoch means or logging
  loss_only_noclip  that, and no gradient clipping
  gpu_batch         as_is with the batch already on the GPU (no host-to-GPU copy per step)

    python scripts/bench_loop_variants.py --variants pure as_is loss_only loss_only_noclip gpu_batch as_is
    python scripts/bench_loop_variants.py --tiny --regime 32x2   # CPU smoke test: tiny model, eager

Other options (--warmup, --steps, --precision, ...) go to bench_fit. Writes
benchmarks/loop_variants_<gpu>_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import bench_fit  # noqa: E402

from distill.module import DistillModule  # noqa: E402

VARIANTS = ("pure", "as_is", "loss_only", "loss_only_noclip", "gpu_batch")


def loss_only(module: DistillModule, batch: dict, batch_idx: int) -> torch.Tensor:
    return module.training_loss(batch)[0]


class BatchOnDevice(bench_fit.SameBatch):
    """SameBatch with its batch already on the GPU."""

    def __init__(self, batch: dict[str, torch.Tensor], length: int):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.batch = {key: value.to(device) for key, value in batch.items()}
        self.length = length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="unet_mnv3", choices=list(bench_fit.MODELS))
    parser.add_argument("--regime", default="256x16")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", default="benchmarks")
    args, rest = parser.parse_known_args()
    if not torch.cuda.is_available() and "--tiny" not in rest:
        sys.exit("bench_loop_variants needs a CUDA GPU (or --tiny, a CPU smoke test)")
    bench = bench_fit.parse_args(
        [
            "--compile",
            "reduce-overhead",
            "--regimes",
            args.regime,
            "--models",
            args.model,
            "--figures",
            "loop",
        ]
        + rest
    )
    torch.backends.cudnn.benchmark = True
    regime, student = (
        bench.regimes[0],
        (bench_fit.TINY_MODELS if bench.tiny else bench_fit.MODELS)[args.model],
    )
    step, same_batch, clip = DistillModule.training_step, bench_fit.SameBatch, bench_fit.GRADIENT_CLIP
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as work:
        bench.work = Path(work)
        for variant in args.variants:
            DistillModule.training_step = loss_only if variant.startswith("loss_only") else step
            bench_fit.GRADIENT_CLIP = None if variant.endswith("noclip") else clip
            bench_fit.SameBatch = BatchOnDevice if variant == "gpu_batch" else same_batch
            if variant == "pure":
                device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
                figure = bench_fit.bench_pure(student, regime, bench, device)
            else:
                figure = bench_fit.bench_loop(student, regime, bench)
            results.setdefault(variant, []).append(round(figure["img_s"], 1))
            print(variant, results[variant][-1], "img/s", flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    name = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    path = Path(args.out) / f"loop_variants_{name}_{args.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": gpu,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(["python3", *sys.argv]),
        "torch": torch.__version__,
        "model": args.model,
        "regime": args.regime,
        "img_s": results,
    }
    path.write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
