"""How batches are drawn: an endless train stream that never stalls the GPU, and DDP evaluation without repeats.

Train: a plain DataLoader restarts its workers' pipeline at every epoch, and the first batch of each
epoch then costs one worker a whole batch of decoding and augmenting while the GPU waits (about 0.5 s
at 512x512, batch 32, ~25% of a 26-batch epoch of UNet-R34 on an H200). `EpochStream` keeps one
DataLoader iterator over `EndlessBatches` alive for the whole fit, so the workers run ahead across
epoch boundaries and during validation, and hands Lightning one epoch of it per `iter()`.

Validation and test under DDP: Lightning's default DistributedSampler pads the last round by
repeating images, so pooled metrics would count a few images twice. `EvalShard` deals every image to
exactly one rank (ranks may differ by one image).
"""

from __future__ import annotations

import itertools
from collections.abc import Generator, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from distill.data.prefetch import prefetch_to_device
from distill.errors import ConfigError


def _check_ranks(n: int, rank: int, world_size: int, what: str) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if n < world_size:
        raise ConfigError(
            f"{what} has {n} image(s) for {world_size} processes: every process needs at least one; "
            "use fewer devices or more data"
        )


class EndlessBatches(Sampler[list[int]]):
    """Index batches of shuffled passes over `n` items, pass after pass, forever; this rank's share under DDP.

    Pass p is the permutation drawn from `seed + p` (the same on every rank), dealt like
    DistributedSampler deals (rank r takes positions r, r + world_size, ...) and cut to
    n // world_size items so that every rank makes the same number of steps; it is then cut into
    batches, dropping a short last batch (a pass shorter than one batch is a single short batch).
    `first_pass` lets a resumed run continue the sequence at its epoch.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, first_pass: int = 0
    ):
        _check_ranks(n, rank, world_size, "the train split")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.first_pass = rank, world_size, first_pass

    @property
    def per_rank(self) -> int:
        return self.n // self.world_size

    @property
    def batches_per_pass(self) -> int:
        return max(1, self.per_rank // self.batch_size)

    def pass_batches(self, index: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + index)
        order = torch.randperm(self.n, generator=generator)[self.rank :: self.world_size][: self.per_rank]
        order = order.tolist()
        return [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(self.batches_per_pass)]

    def __iter__(self) -> Iterator[list[int]]:
        for index in itertools.count(self.first_pass):
            yield from self.pass_batches(index)


class EpochStream:
    """One DataLoader iterator kept alive across epochs; each `iter()` yields the next `len(self)` batches.

    Lightning sees a sized iterable (so it counts steps and epochs as usual, and leaves the sampling
    to us: it only injects samplers into DataLoader objects). The workers start at the first batch
    and stop at `close()` (the DataModule's teardown) or when this object is collected. With a CUDA
    `device`, batches come already on it (see distill.data.prefetch).
    """

    def __init__(self, loader: DataLoader, batches_per_epoch: int, device: torch.device | None = None):
        self.loader = loader
        self.batches_per_epoch = batches_per_epoch
        self.device = device
        self._batches: Iterator[Any] | None = None

    @property
    def dataset(self) -> Dataset:
        return self.loader.dataset

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        if self._batches is None:
            self._batches = iter(self.loader)
            if self.device is not None and self.device.type == "cuda":
                self._batches = prefetch_to_device(self._batches, self.device)
        for _ in range(self.batches_per_epoch):
            yield next(self._batches)

    def close(self) -> None:
        """Stop the worker processes now rather than at garbage collection."""
        if isinstance(self._batches, Generator):
            self._batches.close()  # the prefetcher: closing it releases the loader iterator it holds
        shutdown = getattr(self._batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._batches = None


class EvalShard(DistributedSampler):
    """Rank r evaluates items r, r + world_size, ...: every item exactly once over all ranks, in order.

    A DistributedSampler subclass only so that Lightning keeps it instead of injecting its padded one.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        _check_ranks(len(dataset), rank, world_size, "an evaluation split")
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(rank, len(dataset), world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
