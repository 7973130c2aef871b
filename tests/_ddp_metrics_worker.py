"""Worker for the 2-process gloo test: each rank updates ThresholdCurves with its half of the data."""

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from distill.metrics import ThresholdCurves


def run(rank: int, world_size: int, port: int, data: dict, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        metric = ThresholdCurves()
        for index in range(rank, len(data["probs"]), world_size):
            metric.update(data["probs"][index], data["target"][index], data["roi"][index])
        curves = metric.compute()  # torchmetrics all-reduces the tp/fp/fn sums here
        torch.save({"curves": curves, "tp": metric.tp.clone()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
