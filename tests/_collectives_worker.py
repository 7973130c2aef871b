"""Worker for the 2-process gloo test of the graphed step's collectives (average_gradients, broadcast_buffers)."""

import os

import torch
from _distributed import gloo_group

from distill.graphed_step import average_gradients, broadcast_buffers


def run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, world_size, port):
        plain = torch.nn.Parameter(torch.zeros(2, 3))
        plain.grad = torch.full((2, 3), float(rank + 1))
        conv = torch.nn.Parameter(torch.zeros(2, 3, 4, 5))  # a channels_last gradient keeps its layout
        conv.grad = (torch.arange(120.0).reshape(2, 3, 4, 5) * (rank + 1)).contiguous(
            memory_format=torch.channels_last
        )
        unused = torch.nn.Parameter(torch.zeros(4))  # no gradient: skipped
        average_gradients([plain, unused, conv])
        running = torch.full((3,), float(rank + 10))
        tracked = torch.tensor(rank + 100)  # an int64 buffer, 0-dim (BatchNorm's num_batches_tracked)
        broadcast_buffers([running, tracked])
        result = {
            "plain": plain.grad,
            "conv": conv.grad,
            "unused": unused.grad,
            "running": running,
            "tracked": tracked,
        }
        result["conv_channels_last"] = conv.grad.is_contiguous(memory_format=torch.channels_last)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
