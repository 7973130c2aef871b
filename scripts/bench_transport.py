"""How fast do training batches cross from DataLoader workers to the training process, augmentation aside?

Workers hand out one constant batch-sized sample set (no decoding, no augmentation), so the figure is
the transport alone, over two paths of `VesselDataModule`:

  fresh  torch's default, as for full-size training: `collate_padded` in the worker, the batch moved
         to new shared memory, then on CUDA pinned by the DataLoader's pin-memory thread and copied
         to the GPU; on a CPU machine copied once into a reused buffer, which is what pinning does
         (so the two paths do the same work per batch there as on a GPU host, minus the DMA).
  ring   `distill.data.ring`: workers write slots of one shared ring in place; on CUDA the ring is
         pinned once and each slot goes straight to the GPU; on a CPU machine copied into a reused
         buffer likewise.

Reports batches/s and the training process's CPU time per batch, per regime; JSON to --out.

    python scripts/bench_transport.py --regimes 256x16 512x32 --num-workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.data.datamodule import PER_SAMPLE_VALUES, ForkSafeLoader, collate_padded  # noqa: E402
from distill.data.prefetch import prefetch_to_device  # noqa: E402
from distill.data.ring import PREFETCH_FACTOR, RingBatches  # noqa: E402
from distill.data.sampling import EndlessBatches  # noqa: E402


class Constant(Dataset):
    """Training samples of one size with the arrays a distillation sample has (image, mask, roi, teacher)."""

    def __init__(self, side: int):
        self.sample = {
            "image": np.full((side, side, 3), 7, np.uint8),
            "mask": np.ones((side, side), np.uint8),
            "roi": np.ones((side, side), np.uint8),
            "teacher": np.zeros((side, side), np.float16),
            "teacher_valid": np.uint8(1),
        }

    def __len__(self) -> int:
        return 64

    def __getitem__(self, draw) -> dict:
        return {**self.sample, "id": f"s{draw.index}", "index": draw.index}


def fresh_stream(data: Constant, batch: int, workers: int, device: torch.device):
    loader = ForkSafeLoader(
        data,
        batch_sampler=EndlessBatches(len(data), batch, seed=0),
        num_workers=workers,
        collate_fn=collate_padded,
        pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH_FACTOR,
    )
    batches = (batch for batch in loader)
    return prefetch_to_device(batches, device) if device.type == "cuda" else batches


def ring_stream(data: Constant, batch: int, workers: int, device: torch.device):
    batches = EndlessBatches(len(data), batch, seed=0)
    stream = RingBatches.of(data, batches, batch, workers, PER_SAMPLE_VALUES, device, True, ForkSafeLoader)
    if device.type == "cuda":
        return iter(stream)
    # On a CPU machine: the slot itself, copied below like the other path's batch.
    return ({**small, **stream.ring.batch(small.pop("slot"))} for small in stream.loader)


def measure(path: str, side: int, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    data = Constant(side)
    stream = (fresh_stream if path == "fresh" else ring_stream)(data, batch, args.num_workers, device)
    kept: dict[str, torch.Tensor] = {}
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start, cpu = time.perf_counter(), time.process_time()
        out = next(stream)
        if device.type != "cuda":  # what pinning does: one copy into memory that is reused
            for key, value in out.items():
                if isinstance(value, torch.Tensor) and value.dim() == 4:
                    kept.setdefault(key, torch.empty_like(value)).copy_(value)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    stream.close()
    return {
        "batches_s": args.steps / seconds,
        "img_s": args.steps * batch / seconds,
        "main_cpu_ms_per_batch": 1000 * cpu / args.steps,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--regimes", nargs="+", default=["256x16", "512x32"], help="SIZExBATCH")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument(
        "--warmup", type=int, default=20, help="batches before timing (the workers' queue fills)"
    )
    parser.add_argument("--steps", type=int, default=100, help="timed batches")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if args.num_workers < 1:
        parser.error("--num-workers must be >= 1: the transport is between processes")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    report = {
        "device": name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "settings": {"num_workers": args.num_workers, "warmup": args.warmup, "steps": args.steps},
        "results": [],
    }
    slug = name.lower().replace(" ", "_") + (f"_{args.tag}" if args.tag else "")
    out = args.out / f"transport_{slug}.json"
    args.out.mkdir(parents=True, exist_ok=True)
    for regime in args.regimes:
        side, batch = (int(v) for v in regime.split("x"))
        for path in ("fresh", "ring"):
            result = measure(path, side, batch, args, device)
            report["results"].append({"regime": regime, "path": path, **result})
            print(
                f"{regime:>7} {path:<5} {result['batches_s']:8.1f} batches/s {result['img_s']:9.1f} img/s "
                f"{result['main_cpu_ms_per_batch']:7.2f} ms CPU per batch in the training process",
                flush=True,
            )
            out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
