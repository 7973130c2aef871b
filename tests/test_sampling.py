"""Samplers: the endless train stream (passes, ranks, resume, workers running ahead) and DDP eval shards."""

import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from distill.data.sampling import EndlessBatches, EpochStream, EvalShard, batches_per_epoch
from distill.errors import ConfigError


def first_batches(sampler, count):
    stream = iter(sampler)
    return [next(stream) for _ in range(count)]


def indices(batches):
    return [[draw.index for draw in batch] for batch in batches]


def test_the_stream_is_seeded_passes_cut_into_full_batches_that_may_span_two_passes():
    sampler = EndlessBatches(n=10, batch_size=3, seed=7)
    batches = first_batches(sampler, 7)  # 21 draws: two whole passes and one draw of the third
    assert all(len(b) == 3 for b in batches)
    assert [draw.number for batch in batches for draw in batch] == list(range(21))
    flat = sum(indices(batches), [])
    passes = [flat[:10], flat[10:20]]
    assert sorted(passes[0]) == sorted(passes[1]) == list(range(10))  # nothing dropped
    assert passes[0] != passes[1]
    assert passes[0] == torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    assert first_batches(EndlessBatches(n=10, batch_size=3, seed=7), 7) == batches  # seeded
    assert first_batches(EndlessBatches(n=10, batch_size=3, seed=8), 3) != batches[:3]


def test_a_batch_larger_than_the_split_repeats_its_items_rather_than_shrinking():
    batches = indices(first_batches(EndlessBatches(n=3, batch_size=8, seed=0), 3))
    assert [len(b) for b in batches] == [8, 8, 8]
    counts = np.bincount(sum(batches, []), minlength=3)
    assert counts.tolist() == [8, 8, 8]  # 24 draws = 8 whole passes


def test_a_resumed_run_continues_the_stream():
    whole = first_batches(EndlessBatches(n=8, batch_size=3, seed=0), 12)
    assert first_batches(EndlessBatches(n=8, batch_size=3, seed=0, first_batch=5), 7) == whole[5:]


def test_ranks_share_each_step_of_the_one_process_stream():
    one = indices(first_batches(EndlessBatches(n=11, batch_size=4, seed=3), 6))
    ranks = [
        indices(first_batches(EndlessBatches(n=11, batch_size=2, seed=3, rank=r, world_size=2), 6))
        for r in range(2)
    ]
    for step in range(6):
        assert ranks[0][step] == one[step][0::2] and ranks[1][step] == one[step][1::2]


def test_epochs_are_counted_in_samples():
    assert batches_per_epoch(100, batch_size=8) == 12
    assert batches_per_epoch(100, batch_size=8, world_size=2) == 6
    with pytest.raises(ConfigError, match="data.samples_per_epoch=10 is less than one step's 16"):
        batches_per_epoch(10, batch_size=8, world_size=2)


def test_an_empty_split_or_too_many_eval_processes_are_refused():
    with pytest.raises(ConfigError, match="train split is empty"):
        EndlessBatches(n=0, batch_size=2, seed=0)
    with pytest.raises(ConfigError, match="at least one"):
        EvalShard(list(range(3)), rank=0, world_size=4)


class Recorded(Dataset):
    """Items are their draw's index; every load leaves a file behind, so the test sees what workers loaded."""

    def __init__(self, n, folder):
        self.n, self.folder = n, folder

    def __len__(self):
        return self.n

    def __getitem__(self, draw):
        (self.folder / f"{time.monotonic_ns()}_{draw.number}").touch()
        return draw.index


def test_the_stream_hands_out_epochs_of_one_uninterrupted_loader(tmp_path):
    batches = EndlessBatches(n=8, batch_size=2, seed=0)
    loader = DataLoader(Recorded(8, tmp_path), batch_sampler=batches, num_workers=2)
    stream = EpochStream(loader, batches_per_epoch=4)
    assert len(stream) == 4
    first = [b.tolist() for b in stream]
    # The workers are already loading the next pass while nobody asks for it (a DataLoader restarted
    # per epoch would load nothing until the next iter()).
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) <= 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(tmp_path.iterdir())) > 8
    second = [b.tolist() for b in stream]
    assert first + second == indices(first_batches(EndlessBatches(n=8, batch_size=2, seed=0), 8))
    stream.close()
    assert stream._iterator is None


def test_eval_shards_cover_every_item_exactly_once_and_lightning_keeps_them():
    data = list(range(7))
    shards = [EvalShard(data, rank=r, world_size=3) for r in range(3)]
    assert [list(s) for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(s) for s in shards] == [3, 2, 2]
    assert isinstance(shards[0], DistributedSampler)  # Lightning injects its padded sampler otherwise
    loader = DataLoader(data, batch_size=2, sampler=shards[1])
    assert torch.cat(list(loader)).tolist() == [1, 4]
