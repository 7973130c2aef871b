"""BatchRing: workers write batches in place; every batch arrives whole, in order, never overwritten."""

import time

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from distill.data.datamodule import PER_SAMPLE_VALUES, ForkSafeLoader
from distill.data.ring import PREFETCH_FACTOR, BatchRing, RingBatches, fields_of
from distill.data.sampling import Draw, EndlessBatches

SIDE = 24


class Numbered(Dataset):
    """Sample `number` of the stream: every pixel says which draw made it; some take longer than others."""

    def __len__(self) -> int:
        return 5

    def __getitem__(self, draw: Draw) -> dict:
        time.sleep(0.002 * (draw.number % 3))  # workers finish out of order
        return {
            "image": np.full((SIDE, SIDE, 3), draw.number % 251, np.uint8),
            "mask": np.full((SIDE, SIDE), draw.index, np.uint8),
            "teacher": np.full((SIDE, SIDE), draw.number, np.float16),
            "id": f"s{draw.index}",
            "index": draw.index,
        }


def ring_stream(device: torch.device, workers: int = 3, batch_size: int = 4) -> RingBatches:
    batches = EndlessBatches(5, batch_size, seed=0)
    pin = device.type == "cuda"
    return RingBatches.of(
        Numbered(), batches, batch_size, workers, PER_SAMPLE_VALUES, device, pin, ForkSafeLoader
    )


def check_in_order(batches, count: int, batch_size: int = 4, wait=None) -> None:
    """The first `count` batches hold draws 0, 1, 2, ... in order, each pixel as written; `wait` runs
    between taking a batch and reading it (a slow consumer)."""
    expected = EndlessBatches(5, batch_size, seed=0)
    iterator = iter(batches)
    for step in range(count):
        batch = next(iterator)
        if wait is not None:
            wait()
        draws = expected.batch(step)
        numbers = torch.tensor([d.number for d in draws], dtype=torch.float32)
        assert batch["id"] == [f"s{d.index}" for d in draws]
        assert batch["index"].tolist() == [d.index for d in draws]
        assert batch["image"].shape == (batch_size, 3, SIDE, SIDE)
        assert batch["image"].is_contiguous(memory_format=torch.channels_last)
        assert batch["teacher"].dtype == torch.float16 and batch["mask"].shape == (batch_size, 1, SIDE, SIDE)
        teacher = batch["teacher"].float().amin(dim=(1, 2, 3)), batch["teacher"].float().amax(dim=(1, 2, 3))
        assert torch.equal(teacher[0].cpu(), numbers) and torch.equal(teacher[1].cpu(), numbers), step
        image = batch["image"].float()
        assert torch.equal(image.amin(dim=(1, 2, 3)).cpu(), numbers % 251), step
        assert torch.equal(image.amax(dim=(1, 2, 3)).cpu(), numbers % 251), step
    iterator.close()


def test_batches_arrive_whole_and_in_order_while_the_consumer_is_slow():
    # Four times the ring's slots: every slot is written again many times while batches are read.
    stream = ring_stream(torch.device("cpu"))
    check_in_order(stream, 4 * stream.ring.slots, wait=lambda: time.sleep(0.01))


def test_a_batch_handed_out_is_a_copy_that_later_batches_never_change():
    stream = ring_stream(torch.device("cpu"), workers=2)
    iterator = iter(stream)
    first = next(iterator)
    kept = first["teacher"].clone()
    for _ in range(3 * stream.ring.slots):
        next(iterator)
    iterator.close()
    assert torch.equal(first["teacher"], kept)


def test_a_sample_of_another_size_names_the_id_and_the_fix():
    ring = BatchRing({"mask": ((8, 8), np.uint8)}, batch_size=2, slots=3)
    with pytest.raises(
        ValueError, match=r"'s7': mask is \(9, 8\), the batch ring holds \(8, 8\).*data.crop_size"
    ):
        ring.write(1, 0, {"mask": np.zeros((9, 8), np.uint8), "id": "s7"})


def test_fields_are_the_per_pixel_arrays_and_the_layout_is_collate_padded_s():
    sample = Numbered()[Draw(1, 2)]
    fields = fields_of(sample)
    assert fields == {
        "image": ((SIDE, SIDE, 3), np.uint8),
        "mask": ((SIDE, SIDE), np.uint8),
        "teacher": ((SIDE, SIDE), np.float16),
    }
    ring = BatchRing(fields, batch_size=2, slots=2)
    ring.write(1, 1, sample)
    batch = ring.batch(1)
    assert batch["image"].shape == (2, 3, SIDE, SIDE) and batch["mask"].shape == (2, 1, SIDE, SIDE)
    assert batch["image"][1].eq(2).all() and batch["image"][0].eq(0).all()
    assert ring.nbytes >= 2 * 2 * SIDE * SIDE * (3 + 1 + 2)


def test_a_ring_too_small_for_the_batches_in_flight_is_refused():
    stream = ring_stream(torch.device("cpu"), workers=2)
    stream.ring = BatchRing(fields_of(Numbered()[Draw(0, 0)]), 4, slots=PREFETCH_FACTOR * 2)
    with pytest.raises(ValueError, match="too small"):
        next(iter(stream))


def test_closing_the_stream_gives_the_ring_s_memory_back():
    stream = ring_stream(torch.device("cpu"), workers=2)
    batches = iter(stream)
    next(batches)
    assert stream.ring.arrays["teacher"].any()  # written by the workers
    batches.close()
    assert not stream.ring.arrays["teacher"].any()  # the pages were dropped: they read zeros again


def test_a_loader_that_would_break_the_batch_count_is_refused():
    for setting in ({"persistent_workers": True}, {"pin_memory": True}):
        stream = ring_stream(torch.device("cpu"), workers=1)
        loader = stream.loader
        stream.loader = type(loader)(
            loader.dataset,
            batch_sampler=loader.batch_sampler,
            num_workers=1,
            collate_fn=loader.collate_fn,
            prefetch_factor=PREFETCH_FACTOR,
            **setting,
        )
        with pytest.raises(ValueError, match="in order, unpinned, from its own workers"):
            next(iter(stream))
