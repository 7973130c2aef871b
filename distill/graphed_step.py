"""A whole training step (forward, loss, backward, clipping, optimizer update) as one CUDA graph.

Small students on small crops leave the GPU waiting for the host: a step launches several hundred
kernels (the network's, the loss's, one `AccumulateGrad` per parameter, clipping's, the optimizer's),
and at 256² x 16 launching them takes longer than running them. Captured once and replayed, the step
is one launch. This is torch's "whole-network capture"
(https://pytorch.org/docs/stable/notes/cuda.html#whole-network-capture): the batch is copied into
static inputs, gradients and optimizer state keep their addresses, and the learning rate is read from
device memory, so that a schedule still moves it.

Under DDP a replay skips what DDP does on the host: its reducer's hooks, which all-reduce gradients as
backward makes them, and its broadcast of buffers (e.g. BatchNorm's running statistics) from rank 0.
`average_gradients` and `broadcast_buffers` do both as plain collectives, which the graph captures
(NCCL kernels replay like any other). NCCL's watchdog does not see collectives inside a graph:
`ReplayWatchdog` takes its place.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

Outputs = TypeVar("Outputs")

# Eager steps before the capture: the first compiles (torch.compile), creates the optimizer's state and
# lets cuDNN and cuBLAS create their handles and workspaces, none of which may happen inside a capture.
WARMUP_STEPS = 3


class GraphedStep(Generic[Outputs]):
    """`step(batch)` captured as a CUDA graph on the first call's batch; each call copies its batch in
    and replays the graph.

    `step` must update the weights itself (backward, clipping, `optimizer.step()`), make no host sync
    and allocate no optimizer state: run it eagerly a few times first (`WARMUP_STEPS`). Its outputs are
    static tensors, overwritten by the next replay: read them (or queue work on them) before then.
    Each param group's "lr" stays a float for schedulers and checkpoints; the graph reads a device
    copy, refreshed before every replay.

    Args:
        step: the whole update on a batch of tensors; returns what each replay returns.
        optimizers: the optimizers `step` steps (each must already hold state for its parameters).
        batch: a batch as every later one will be: the same keys, shapes, dtypes, device, and strides.

    Raises:
        ValueError: a parameter without optimizer state (not warmed up, or one that gets no gradient),
            a later batch unlike the first, or param groups changed after the capture.
    """

    def __init__(self, step: Callable[[dict[str, Tensor]], Outputs], optimizers: Sequence[torch.optim.Optimizer],
                 batch: Mapping[str, Tensor]) -> None:  # fmt: skip
        for optimizer in optimizers:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
            stateless = [tuple(p.shape) for p in params if p not in optimizer.state]
            if stateless:
                raise ValueError(
                    f"{type(optimizer).__name__} has no state for {len(stateless)} of its {len(params)} "
                    f"parameters (shapes {stateless[:3]}...): step eagerly first (WARMUP_STEPS), and make sure "
                    "every trained parameter gets a gradient; a capture would record the state's creation "
                    "and replay it every step"
                )
        self._groups = [group for optimizer in optimizers for group in optimizer.param_groups]
        self._optimizers = list(optimizers)
        self._layout = self._param_layout()
        self._static = {key: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
                        for key, v in batch.items()}  # fmt: skip
        self._copy_in(batch)
        device = next(iter(self._static.values())).device
        # float32 whatever the default dtype (Lightning's true-half precisions change it)
        self._lrs = [
            torch.tensor(float(group["lr"]), dtype=torch.float32, device=device) for group in self._groups
        ]
        for optimizer in optimizers:
            # Backward writes fresh gradients in the graph's memory, at addresses each replay reuses.
            optimizer.zero_grad(set_to_none=True)
        saved = [(group["lr"], group.get("capturable", False)) for group in self._groups]
        for group, lr in zip(self._groups, self._lrs, strict=True):
            group["lr"], group["capturable"] = lr, True  # the optimizer refuses capture unless capturable
        self.graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: DataLoader threads (pinning batches) may call CUDA while the step is captured
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self._outputs = step(self._static)
        finally:
            for group, (lr, capturable) in zip(self._groups, saved, strict=True):
                group["lr"], group["capturable"] = lr, capturable

    def _param_layout(self) -> list[list[int]]:
        """How many parameters each param group of each optimizer holds (a cheap per-step check)."""
        return [[len(group["params"]) for group in optimizer.param_groups] for optimizer in self._optimizers]

    def _copy_in(self, batch: Mapping[str, Tensor]) -> None:
        if batch.keys() != self._static.keys():
            raise ValueError(f"batch keys {sorted(batch)} differ from the captured {sorted(self._static)}")
        for key, static in self._static.items():
            value = batch[key]
            if (value.shape, value.dtype, value.device) != (static.shape, static.dtype, static.device):
                raise ValueError(
                    f"batch[{key!r}] is {tuple(value.shape)} {value.dtype} on {value.device}; the step was "
                    f"captured for {tuple(static.shape)} {static.dtype} on {static.device}: a CUDA graph "
                    "replays one shape (fixed crop and batch sizes)"
                )
            static.copy_(value, non_blocking=True)

    def __call__(self, batch: Mapping[str, Tensor]) -> Outputs:
        """One step on `batch`: its outputs (static tensors, valid until the next call)."""
        if self._param_layout() != self._layout:
            raise ValueError(
                "the optimizer's param groups changed after the step was captured (e.g. a fine-tuning "
                "callback adding parameters): the graph updates only the captured ones"
            )
        self._copy_in(batch)
        for group, lr in zip(self._groups, self._lrs, strict=True):
            lr.fill_(group["lr"])  # a kernel argument: no copy, no sync
        self.graph.replay()
        return self._outputs


def _flat_collective(tensors: Iterable[Tensor], collective: Callable[[Tensor], None]) -> None:
    """Run `collective` in place on the tensors, concatenated into one flat tensor per dtype: one
    collective per dtype rather than one per tensor (hundreds of small NCCL kernels per step)."""
    by_dtype: defaultdict[torch.dtype, list[Tensor]] = defaultdict(list)
    for tensor in tensors:
        by_dtype[tensor.dtype].append(tensor)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        collective(flat)
        chunks = flat.split([t.numel() for t in same])
        torch._foreach_copy_(same, [chunk.view(t.shape) for chunk, t in zip(chunks, same, strict=True)])


def average_gradients(parameters: Iterable[Tensor]) -> None:
    """Replace each parameter's `.grad` by its mean over the ranks of the default process group, as
    DDP's reducer does. Parameters without a gradient are skipped: every rank must pass the same
    parameters with gradients, in the same order."""
    world_size = dist.get_world_size()

    def mean(flat: Tensor) -> None:
        dist.all_reduce(flat)
        flat.div_(world_size)

    _flat_collective([p.grad for p in parameters if p.grad is not None], mean)


def broadcast_buffers(buffers: Iterable[Tensor]) -> None:
    """Overwrite every rank's buffers with rank 0's, as DDP's `broadcast_buffers=True` does."""
    _flat_collective(buffers, lambda flat: dist.broadcast(flat, src=0))


class ReplayWatchdog:
    """Ends this process when a replayed step has not finished `timeout_s` seconds after its replay.

    NCCL's watchdog times out the collectives c10d launches, not those a CUDA graph replays: under DDP,
    were another rank to stop, this one would wait for the graph's all-reduce forever, in whichever host
    call next waits for the GPU. Each replay records an event on `device`; a daemon thread drops the
    finished ones and, once the oldest unfinished one is `timeout_s` old, writes `message(step)` to
    stderr and exits the process with status 1, as NCCL's watchdog aborts it. Call `close()` when
    training ends.
    """

    def __init__(self, timeout_s: float, message: Callable[[int], str], device: torch.device) -> None:
        self._timeout_s, self._message, self._device = timeout_s, message, device
        # (replayed at, step, its event), oldest first: this thread appends, the watchdog's pops
        self._replays: deque[tuple[float, int, torch.cuda.Event]] = deque()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="replay-watchdog", daemon=True)
        self._thread.start()

    def replayed(self, step: int) -> None:
        """Watch the replay just queued on the current stream."""
        event = torch.cuda.Event()
        event.record()
        self._replays.append((time.monotonic(), step, event))

    def close(self) -> None:
        self._closed.set()
        self._thread.join()

    def _watch(self) -> None:
        torch.cuda.set_device(self._device)  # this thread's CUDA device (the events' own)
        while not self._closed.wait(min(1.0, self._timeout_s / 10)):
            while self._replays and self._replays[0][2].query():
                self._replays.popleft()
            if self._replays and time.monotonic() - self._replays[0][0] > self._timeout_s:
                sys.stderr.write(self._message(self._replays[0][1]) + "\n")
                sys.stderr.flush()
                os._exit(1)
