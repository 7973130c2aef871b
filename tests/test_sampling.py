"""Samplers: the endless train stream (passes, ranks, resume, workers running ahead) and DDP eval shards."""

import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from distill.data.sampling import EndlessBatches, EpochStream, EvalShard
from distill.errors import ConfigError


def first_batches(sampler, count):
    stream = iter(sampler)
    return [next(stream) for _ in range(count)]


def test_each_pass_is_a_fresh_permutation_cut_into_full_batches():
    sampler = EndlessBatches(n=10, batch_size=3, seed=7)
    assert sampler.batches_per_pass == 3  # 9 of 10 items; the short last batch is dropped
    batches = first_batches(sampler, 6)
    assert all(len(b) == 3 for b in batches)
    passes = [sum(batches[:3], []), sum(batches[3:], [])]
    for items in passes:
        assert len(set(items)) == 9 and set(items) <= set(range(10))
    assert passes[0] != passes[1]
    assert first_batches(EndlessBatches(n=10, batch_size=3, seed=7), 6) == batches  # seeded
    assert first_batches(EndlessBatches(n=10, batch_size=3, seed=8), 3) != batches[:3]


def test_a_resumed_run_continues_the_sequence_of_passes():
    whole = first_batches(EndlessBatches(n=8, batch_size=2, seed=0), 12)
    assert first_batches(EndlessBatches(n=8, batch_size=2, seed=0, first_pass=2), 4) == whole[8:]


def test_ranks_get_disjoint_equal_shares_of_every_pass():
    shares = [EndlessBatches(n=11, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    assert [s.batches_per_pass for s in shares] == [2, 2]  # 5 items each: two batches of 2
    for index in range(3):
        items = [sum(s.pass_batches(index), []) for s in shares]
        assert len(items[0]) == len(items[1]) == 4 and not set(items[0]) & set(items[1])


def test_a_pass_shorter_than_a_batch_is_one_short_batch():
    assert first_batches(EndlessBatches(n=3, batch_size=8, seed=0), 2)[0].__len__() == 3


def test_more_processes_than_images_is_refused():
    with pytest.raises(ConfigError, match="3 image"):
        EndlessBatches(n=3, batch_size=2, seed=0, rank=0, world_size=4)
    with pytest.raises(ConfigError, match="at least one"):
        EvalShard(list(range(3)), rank=0, world_size=4)


class Recorded(Dataset):
    """Items are their index; every load leaves a file behind, so the test sees what workers loaded."""

    def __init__(self, n, folder):
        self.n, self.folder = n, folder

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        (self.folder / f"{time.monotonic_ns()}_{index}").touch()
        return index


def test_the_stream_hands_out_epochs_of_one_uninterrupted_loader(tmp_path):
    batches = EndlessBatches(n=8, batch_size=2, seed=0)
    loader = DataLoader(Recorded(8, tmp_path), batch_sampler=batches, num_workers=2)
    stream = EpochStream(loader, batches.batches_per_pass)
    assert len(stream) == 4
    first = [b.tolist() for b in stream]
    # The workers are already loading the next pass while nobody asks for it (a DataLoader restarted
    # per epoch would load nothing until the next iter()).
    deadline = time.monotonic() + 30
    while len(list(tmp_path.iterdir())) <= 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(tmp_path.iterdir())) > 8
    second = [b.tolist() for b in stream]
    assert first + second == first_batches(EndlessBatches(n=8, batch_size=2, seed=0), 8)
    stream.close()
    assert stream._batches is None


def test_eval_shards_cover_every_item_exactly_once_and_lightning_keeps_them():
    data = list(range(7))
    shards = [EvalShard(data, rank=r, world_size=3) for r in range(3)]
    assert [list(s) for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(s) for s in shards] == [3, 2, 2]
    assert isinstance(shards[0], DistributedSampler)  # Lightning injects its padded sampler otherwise
    loader = DataLoader(data, batch_size=2, sampler=shards[1])
    assert torch.cat(list(loader)).tolist() == [1, 4]
