"""How batches are drawn: an endless train stream that never stalls the GPU, and DDP evaluation without repeats.

Train: a plain DataLoader restarts its workers' pipeline at every epoch, and the first batch of each
epoch then costs one worker a whole batch of decoding and augmenting while the GPU waits (about 0.5 s
at 512x512, batch 32, ~25% of a 26-batch epoch of UNet-R34 on an H200). `EpochStream` keeps one
iterator over `EndlessBatches` alive for the whole fit, so the workers run ahead across epoch
boundaries and during validation, and hands Lightning one epoch of it per `iter()`.

An epoch is a number of steps, not a pass: `batches_per_epoch` turns "N samples per epoch" (by
default the split's size) into steps, so a 16-image split can have epochs of 4000 samples, and a
batch may be larger than the split (its images then repeat within the batch).

Validation and test under DDP: Lightning's default DistributedSampler pads the last round by
repeating images, so pooled metrics would count a few images twice. `EvalShard` deals every image to
exactly one rank (ranks may differ by one image).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from distill.data.prefetch import prefetch_to_device
from distill.errors import ConfigError


class Draw(NamedTuple):
    """One training sample to make: item `index` of the split, drawn `number`-th in the stream.

    `number` is unique over the whole run and all ranks and does not depend on how samples are
    spread over DataLoader workers, so seeding a sample's augmentation with it (with the run's seed)
    makes the batches the same whatever `num_workers` is.
    """

    index: int
    number: int


def batches_per_epoch(samples: int, batch_size: int, world_size: int = 1) -> int:
    """Steps in an epoch of `samples` training samples over all ranks; ConfigError if not even one."""
    per_step = batch_size * world_size
    if samples < per_step:
        raise ConfigError(
            f"data.samples_per_epoch={samples} is less than one step's {per_step} samples "
            f"(data.batch_size={batch_size} x {world_size} process(es)): raise it or lower data.batch_size"
        )
    return samples // per_step


class EndlessBatches(Sampler[list[Draw]]):
    """This rank's batches of an endless stream of shuffled passes over `n` items.

    The stream is pass after pass (pass p: the permutation drawn from `seed + p`, the same on every
    rank), cut into steps of `batch_size * world_size` consecutive draws; rank r takes every
    world_size-th draw of each step, starting at r. So every rank makes as many steps, a batch may
    span two passes or be larger than the split, and nothing is dropped. `first_batch` makes a
    resumed run continue where it stopped; a callable is read when iteration starts (Lightning
    restores the step count from a checkpoint after it has asked for the loader).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        first_batch: int | Callable[[], int] = 0,
    ):
        if n < 1:
            raise ConfigError("the train split is empty; add images or change its splits file")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.first_batch = rank, world_size, first_batch
        self._passes: dict[int, list[int]] = {}

    def _pass(self, index: int) -> list[int]:
        if index not in self._passes:
            generator = torch.Generator().manual_seed(self.seed + index)
            self._passes = {k: v for k, v in self._passes.items() if k >= index - 1}  # a batch spans <= 2
            self._passes[index] = torch.randperm(self.n, generator=generator).tolist()
        return self._passes[index]

    def draw(self, number: int) -> Draw:
        """The `number`-th draw of the whole stream (all ranks)."""
        pass_index, position = divmod(number, self.n)
        return Draw(self._pass(pass_index)[position], number)

    def batch(self, step: int) -> list[Draw]:
        """This rank's share of step `step` (counted from the start of the run)."""
        per_step = self.batch_size * self.world_size
        return [
            self.draw(number)
            for number in range(step * per_step + self.rank, (step + 1) * per_step, self.world_size)
        ]

    def __iter__(self) -> Iterator[list[Draw]]:
        first = self.first_batch() if callable(self.first_batch) else self.first_batch
        for step in itertools.count(first):
            yield self.batch(step)


class EpochStream:
    """One iterator over `batches` kept alive across epochs; each `iter()` yields the next `len(self)` batches.

    Lightning sees a sized iterable (so it counts steps and epochs as usual, and leaves the sampling
    to us: it only injects samplers into DataLoader objects). DataLoader workers start at the first
    batch and stop at `close()` (the DataModule's teardown) or when this object is collected. With a
    CUDA `device`, batches come already on it (see distill.data.prefetch).

    Resuming needs no state of its own: the DataModule starts the stream at the batch count the fit
    loop restored. `state_dict`/`load_state_dict` only tell Lightning that it may resume mid-epoch.
    """

    def __init__(self, batches: Iterable[Any], batches_per_epoch: int, device: torch.device | None = None):
        self.batches = batches
        self.batches_per_epoch = batches_per_epoch
        self.device = device
        self._iterator: Iterator[Any] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[Any]:
        if self._iterator is None:
            self._iterator = iter(self.batches)
            if self.device is not None and self.device.type == "cuda":
                self._iterator = prefetch_to_device(self._iterator, self.device)
        for _ in range(self.batches_per_epoch):
            yield next(self._iterator)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Stop the worker processes now rather than at garbage collection."""
        if isinstance(self._iterator, Generator):
            self._iterator.close()  # a generator (the prefetcher): closing it releases what it iterates
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._iterator = None


class EvalShard(DistributedSampler):
    """Rank r evaluates items r, r + world_size, ...: every item exactly once over all ranks, in order.

    A DistributedSampler subclass only so that Lightning keeps it instead of injecting its padded one.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if len(dataset) < world_size:
            raise ConfigError(
                f"an evaluation split has {len(dataset)} image(s) for {world_size} processes: every "
                "process needs at least one; use fewer devices or more data"
            )
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False)
        self.indices = list(range(rank, len(dataset), world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
