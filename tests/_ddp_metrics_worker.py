"""Worker for the 2-process gloo test: each rank updates ThresholdCurves with its half of the data."""

import os

import torch
from _distributed import gloo_group

from distill.metrics import ThresholdCurves


def run(rank: int, world_size: int, port: int, data: dict, out_dir: str) -> None:
    with gloo_group(rank, world_size, port):
        metric = ThresholdCurves()
        for index in range(rank, len(data["probs"]), world_size):
            metric.update(data["probs"][index], data["target"][index], data["roi"][index])
        curves = metric.compute()  # torchmetrics all-reduces the tp/fp/fn sums here
        torch.save({"curves": curves, "tp": metric.tp.clone()}, os.path.join(out_dir, f"rank{rank}.pt"))
