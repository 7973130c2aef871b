"""Fixed-size train batches written by DataLoader workers in place, into shared memory pinned once.

A DataLoader worker returns each batch in new shared memory: the worker fills fresh pages (the kernel
zeroes each one first), sends one file descriptor per tensor, and the training process maps them and
faults every page in again while its pin-memory thread copies the batch into pinned memory. On a
2-core VM, copying a 512x512, batch 32 batch (58.7 MB) out of such fresh memory took 40.5 ms, out of
memory that stays mapped 13.3 ms; on an H200 host the pin-memory thread alone capped 12 workers at
614 img/s at 512x32 and 1824 at 256x16 (BENCHMARKS.md), below what the GPU trains.

`BatchRing` is shared memory made once, before the workers fork, with room for every batch that can
be in flight. A worker writes batch k's samples into slot k mod `slots` and returns only the slot and
the per-sample values (ids, indices). On CUDA the training process registers the ring as pinned
memory once (cudaHostRegister) and copies each slot straight to the GPU on a side stream: no new
pages, no pin-memory thread, no second copy.

When a slot is written again: the DataLoader hands a worker the job of batch k + `in_flight` (its
`prefetch_factor` x `num_workers`) inside the `next()` that returns batch k, so that job overwrites the
slot of batch k + in_flight - slots. `ring_batches` waits for that batch's copy to finish before
calling `next()`; with three slots to spare it finished long before. Every batch must have one
shape: crops (`data.crop_size`), or full-size images all of one square size
(`VesselDataModule._uses_ring`).
"""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distill.data.prefetch import hand_over, start_copy
from distill.data.sampling import Draw

PREFETCH_FACTOR = 2  # the ring's DataLoader: batches in flight per worker (torch's default)
# Slots beyond the DataLoader's jobs in flight. One is needed (the batch being copied); two more keep
# the wait for a slot's copy, which started two batches earlier, off the training step's path.
SPARE_SLOTS = 3


def ring_slots(num_workers: int) -> int:
    """Slots a ring needs for the batches `num_workers` workers have in flight, plus SPARE_SLOTS."""
    return PREFETCH_FACTOR * num_workers + SPARE_SLOTS


class BatchRing:
    """`slots` batches of `batch_size` samples, each field an array [slots, batch_size, *shape] in shared memory.

    Args:
        fields: name -> (shape of one sample's array, HxW or HxWxC; numpy dtype), e.g. the arrays of
            one sample made by the split (`fields_of`).
        batch_size: samples per batch.
        slots: batches the ring holds.

    The memory is anonymous and shared (mmap): processes forked after this see and write the same
    pages, and nothing lands in /dev/shm (64 MB in a default Docker container).
    """

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], np.dtype]], batch_size: int, slots: int):
        if slots < 1 or batch_size < 1:
            raise ValueError(f"a ring needs slots >= 1 and batch_size >= 1, got {slots} and {batch_size}")
        self.slots, self.batch_size = slots, batch_size
        layout, offset = {}, 0
        for key, (shape, dtype) in fields.items():
            dtype = np.dtype(dtype)
            offset = -(-offset // 64) * 64  # each field cache-line aligned
            layout[key] = (offset, (slots, batch_size, *shape), dtype)
            offset += int(np.prod((slots, batch_size, *shape))) * dtype.itemsize
        self.nbytes = offset
        self._memory = mmap.mmap(-1, max(offset, 1))
        self.arrays = {
            key: np.ndarray(shape, dtype, buffer=self._memory, offset=start)
            for key, (start, shape, dtype) in layout.items()
        }
        self._pinned_at: int | None = None

    def write(self, slot: int, position: int, sample: dict[str, Any]) -> None:
        """Copy a sample's arrays into place `position` of `slot`; ValueError naming the id if a shape differs."""
        for key, array in self.arrays.items():
            value = sample[key]
            if value.shape != array.shape[2:]:
                raise ValueError(
                    f"train sample {sample.get('id')!r}: {key} is {value.shape}, the batch ring holds "
                    f"{array.shape[2:]} (the ring needs one training size: set data.crop_size)"
                )
            array[slot, position] = value

    def batch(self, slot: int) -> dict[str, torch.Tensor]:
        """The tensors of `slot`, views in the batch layout ([B,C,H,W], channels_last strides; `channels_first`)."""
        return {key: channels_first(torch.from_numpy(array[slot])) for key, array in self.arrays.items()}

    def pin(self) -> None:
        """Register the ring as page-locked memory with CUDA, so copies from it are asynchronous DMA."""
        if self._pinned_at is not None:
            return
        address = torch.from_numpy(np.frombuffer(self._memory, np.uint8)).data_ptr()
        try:
            torch.cuda.check_error(int(torch.cuda.cudart().cudaHostRegister(address, self.nbytes, 0)))
        except torch.cuda.CudaError as error:
            raise RuntimeError(
                f"pinning the {self.nbytes / 2**20:.0f} MiB train batch ring failed (cudaHostRegister: {error}): "
                f"lower data.num_workers (the ring holds {PREFETCH_FACTOR} x num_workers + {SPARE_SLOTS} "
                "batches) or set data.pin_memory=false"
            ) from error
        self._pinned_at = address

    def release(self) -> None:
        """Unpin the ring and give its pages back (its arrays then read zeros). Call once no worker writes."""
        if self._pinned_at is not None:
            torch.cuda.check_error(int(torch.cuda.cudart().cudaHostUnregister(self._pinned_at)))
            self._pinned_at = None
        if hasattr(mmap, "MADV_REMOVE"):  # Linux; elsewhere the pages go when the ring is collected
            self._memory.madvise(mmap.MADV_REMOVE)


def channels_first(stacked: torch.Tensor) -> torch.Tensor:
    """Stacked samples [B,H,W,C] or [B,H,W] as a [B,C,H,W] view (channels_last strides for C > 1).

    Samples are stacked as they come, so each one's copy is one memcpy rather than a strided transpose.
    """
    return stacked.permute(0, 3, 1, 2) if stacked.dim() == 4 else stacked[:, None]


def fields_of(sample: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The per-pixel arrays of one sample (2-D or 3-D numpy arrays) as BatchRing fields."""
    return {
        key: (value.shape, value.dtype)
        for key, value in sample.items()
        if isinstance(value, np.ndarray) and value.ndim >= 2
    }


class RingWriter(Dataset):
    """In a worker: makes a batch's samples with `split` and writes them into the ring's slot.

    The DataLoader hands `__getitems__` what its batch sampler yields, here (slot, draws) from
    `NumberedBatches`; the batch it returns holds only the slot, the ids and the per-sample values named
    in `small` (as lists: a tensor would travel through /dev/shm), made tensors of those dtypes by
    `ring_batches`.
    """

    def __init__(self, split: Dataset, ring: BatchRing, small: dict[str, torch.dtype]):
        self.split, self.ring, self.small = split, ring, small

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, job: tuple[int, list[Draw]]) -> dict[str, Any]:
        slot, draws = job
        values: dict[str, list] = {"id": []}
        for position, draw in enumerate(draws):
            sample = self.split[draw]
            self.ring.write(slot, position, sample)
            values["id"].append(sample["id"])
            for key in self.small:
                if key in sample:
                    values.setdefault(key, []).append(sample[key])
        return {"slot": slot, **values}


class NumberedBatches:
    """(slot, draws) for each batch of `batches` in order: batch k goes to slot k mod `slots`."""

    def __init__(self, batches: Iterable[list[Draw]], slots: int):
        self.batches, self.slots = batches, slots

    def __iter__(self) -> Iterator[tuple[int, list[Draw]]]:
        for k, draws in enumerate(self.batches):
            yield k % self.slots, draws


def unwrapped(batch: dict) -> dict:
    """The DataLoader's collate_fn for a RingWriter, which returns the batch itself."""
    return batch


class RingBatches:
    """The train batches of `loader` (over a RingWriter) as an iterable for `EpochStream` (see ring_batches)."""

    def __init__(self, loader: DataLoader, ring: BatchRing, device: torch.device, pin: bool):
        self.loader, self.ring, self.device, self.pin = loader, ring, device, pin

    @classmethod
    def of(
        cls,
        split: Dataset,
        batches: Iterable[list[Draw]],
        batch_size: int,
        num_workers: int,
        small: dict[str, torch.dtype],
        device: torch.device,
        pin: bool,
        make_loader: Callable[..., DataLoader] = DataLoader,
    ) -> RingBatches:
        """Batches of `split`'s samples drawn by `batches`, made by `num_workers` workers through a ring
        sized for all their batches in flight; its fields are those of the sample `split[Draw(0, 0)]`.
        `make_loader(dataset, **settings)` builds the DataLoader (e.g. one whose workers are forked)."""
        ring = BatchRing(fields_of(split[Draw(0, 0)]), batch_size, ring_slots(num_workers))
        loader = make_loader(
            RingWriter(split, ring, small),
            batch_sampler=NumberedBatches(batches, ring.slots),
            num_workers=num_workers,
            collate_fn=unwrapped,
            pin_memory=False,
            prefetch_factor=PREFETCH_FACTOR,
        )
        return cls(loader, ring, device, pin)

    def __iter__(self) -> Iterator[dict]:
        return ring_batches(self.loader, self.ring, self.device, self.pin)


def ring_batches(loader: DataLoader, ring: BatchRing, device: torch.device, pin: bool) -> Iterator[dict]:
    """The loader's batches with their tensors read from the ring: on CUDA `device`, copied there on a
    side stream one batch ahead (from pinned memory when `pin`); elsewhere, copied out of the ring.

    A slot's copy has finished before the DataLoader can hand its next job to a worker (see the module
    doc). Closing the generator stops the workers, waits for the last copies and releases the ring.

    Raises:
        ValueError: a ring too small for the loader's batches in flight, or a loader that would break
            the count of batches (pinning itself, keeping its workers, or handing batches out of order).
    """
    in_flight = loader.prefetch_factor * loader.num_workers
    if ring.slots < in_flight + 1:
        raise ValueError(f"a ring of {ring.slots} slots is too small for {in_flight} batches in flight")
    if loader.pin_memory or loader.persistent_workers or not getattr(loader, "in_order", True):
        raise ValueError("a ring's DataLoader hands its batches out in order, unpinned, from its own workers")
    small_dtypes = loader.dataset.small
    cuda = device.type == "cuda"
    copier = torch.cuda.Stream(device) if cuda else None
    copies: deque[tuple[int, torch.cuda.Event]] = deque()  # (batch number, its copy), oldest first
    iterator, ready = None, None
    try:
        iterator = iter(loader)  # forks the workers: pin after, so that they share the pages
        if cuda and pin:
            ring.pin()
        for k, small in enumerate(iterator):
            tensors = ring.batch(small.pop("slot"))
            values = {
                key: torch.tensor(v, dtype=small_dtypes[key]) if key in small_dtypes else v
                for key, v in small.items()
            }
            if cuda:
                moved, copied = start_copy({**values, **tensors}, copier, device)
                copies.append((k, copied))
                if ready is not None:
                    yield hand_over(*ready, device)
                ready = moved, copied
            else:
                yield {**values, **{key: value.clone() for key, value in tensors.items()}}
            reused = k + 1 + in_flight - ring.slots  # the batch whose slot the next next() may hand out
            while copies and copies[0][0] <= reused:
                copies.popleft()[1].synchronize()
        if ready is not None:
            yield hand_over(*ready, device)
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        if copier is not None:
            copier.synchronize()
        ring.release()
