"""VesselDataModule on real pieces: synthetic vessels written as mask_folder, a real TeacherCache.

The cached map of (id, view number k) is `10 k + mask + offset(id)` in the original orientation, so
a batch's teacher tells which id and which view it came from, and must line up with the mask.
"""

import dataclasses
import gc
import multiprocessing
import os
import shutil
import warnings
from pathlib import Path

import albumentations as A
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from skimage.morphology import skeletonize

from distill.cache import CacheWriter, TeacherCache
from distill.data import open_dataset
from distill.data.augment import Augment, Preset
from distill.data.datamodule import (
    NO_MAP_LOGIT,
    WORKER_NICENESS,
    ForkSafeLoader,
    VesselDataModule,
    VesselSplit,
    collate_padded,
    decode_all,
    init_worker,
)
from distill.data.ring import RingBatches
from distill.data.writers import write_dataset
from distill.errors import CacheError, ConfigError, DatasetError
from distill.module import DistillModule
from distill.students import StudentConfig
from distill.synth import generate_sample
from distill.views import apply_view

FORMAT = "mask_folder"
VIEWS = ["identity", "hflip", "rot90"]
LARGE = {0, 5, 7}  # ids written at 80 px (the rest at 64): the splits hold several sizes


def offset(item_id: str) -> float:
    return 0.25 * int(item_id[1:])


def cached_map(record, k: int) -> np.ndarray:
    return (10.0 * k + record.mask + offset(record.id)).astype(np.float16)


def write_cache(root: Path, dataset, fingerprint: dict, views: list[str]) -> Path:
    manifest = {"teacher": {"name": "test-pattern"}, "dataset": fingerprint, "views": views}
    with CacheWriter(root, "w0", manifest) as writer:
        for item_id in dataset.ids:
            record = dataset.get(item_id)
            for k, view in enumerate(views):
                writer.write(item_id, view, cached_map(record, k))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("datamodule")
    samples = [
        dataclasses.replace(generate_sample(i, 80 if i in LARGE else 64, "fundus"), id=f"s{i:02d}")
        for i in range(12)
    ]
    root = write_dataset(base / "data", samples, FORMAT)
    dataset = open_dataset(FORMAT, root)
    fingerprint = dataset.fingerprint()
    stale = {**fingerprint, "items": {**fingerprint["items"], dataset.ids[0]: "0" * 64}}
    return {
        "root": str(root),
        "dataset": dataset,
        "cache": str(write_cache(base / "cache", dataset, fingerprint, VIEWS)),
        "stale": str(write_cache(base / "stale", dataset, stale, ["identity"])),
    }


def module(data: dict, **options) -> VesselDataModule:
    defaults = {"data_format": FORMAT, "data_root": data["root"], "num_workers": 0, "batch_size": 2}
    dm = VesselDataModule(**{**defaults, **options})
    dm.setup("fit")
    return dm


def check_contract(batch: dict, teacher: bool, skeleton: bool) -> None:
    expected = {"image", "mask", "roi", "id", "index"} | ({"teacher", "teacher_valid"} if teacher else set())
    assert set(batch) == expected | ({"skeleton"} if skeleton else set())
    b, _, h, w = batch["image"].shape
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1] == 3
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    for key, dtype in [("mask", torch.uint8), ("roi", torch.uint8), ("teacher", torch.float16)]:
        if key in batch:
            assert batch[key].dtype == dtype and batch[key].shape == (b, 1, h, w)
    if skeleton:
        assert batch["skeleton"].dtype == torch.uint8 and batch["skeleton"].shape == (b, 1, h, w)
    assert isinstance(batch["id"], list) and len(batch["id"]) == b
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (b,)
    if teacher:
        assert batch["teacher_valid"].dtype == torch.uint8 and batch["teacher_valid"].shape == (b,)
    assert set(batch["mask"].unique().tolist()) <= {0, 1} and set(batch["roi"].unique().tolist()) <= {0, 1}


def test_batches_follow_the_contract(data):
    dm = module(data, cache_dir=data["cache"], crop_size=48, skeletons=True)
    assert dm.has_teacher and isinstance(dm.cache, TeacherCache) and dm.dataset is not None
    assert sorted(dm.train_ids + dm.val_ids + dm.test_ids) == data["dataset"].ids
    train = next(iter(dm.train_dataloader()))
    check_contract(train, teacher=True, skeleton=True)
    assert train["image"].shape == (2, 3, 48, 48)
    for i in range(2):  # the skeleton is that of the augmented mask
        expected = skeletonize(train["mask"][i, 0].numpy().astype(bool))
        np.testing.assert_array_equal(train["skeleton"][i, 0].numpy(), expected)
    assert train["skeleton"].sum() > 0
    check_contract(next(iter(dm.val_dataloader())), teacher=True, skeleton=True)
    plain = module(data)
    assert not plain.has_teacher and plain.cache is None
    check_contract(next(iter(plain.test_dataloader())), teacher=False, skeleton=False)


@pytest.mark.parametrize("teacher_views", ["mean", "match"])
def test_validation_joins_the_teacher_by_id_unaugmented(data, teacher_views):
    dm = module(data, cache_dir=data["cache"], teacher_views=teacher_views, batch_size=1)
    cache = TeacherCache(data["cache"])
    seen = []
    for batch in dm.val_dataloader():
        (item_id,) = batch["id"]
        record = data["dataset"].get(item_id)
        np.testing.assert_array_equal(batch["image"][0].permute(1, 2, 0).numpy(), record.image)
        np.testing.assert_array_equal(batch["mask"][0, 0].numpy(), record.mask)
        np.testing.assert_array_equal(batch["roi"][0, 0].numpy(), record.roi.astype(np.uint8))
        if teacher_views == "mean":
            expected = cache.read_views(item_id).astype(np.float32).mean(axis=0).astype(np.float16)
            np.testing.assert_array_equal(expected, cached_map(record, 1))  # mean of k = 0, 1, 2
        else:
            expected = cache.read(item_id, "identity")
        np.testing.assert_array_equal(batch["teacher"][0, 0].numpy(), expected)
        assert batch["index"].tolist() == [len(seen)]  # position in the split
        seen.append(item_id)
    assert seen == dm.val_ids


def test_stale_cache_is_refused(data):
    with pytest.raises(CacheError, match="changed content"):
        module(data, cache_dir=data["stale"])


def test_a_cache_serves_a_smaller_dataset_and_refuses_a_changed_image_by_id(data, tmp_path):
    smaller = tmp_path / "smaller"
    shutil.copytree(data["root"], smaller)
    gone, edited = data["dataset"].ids[1], data["dataset"].ids[4]
    for path in smaller.glob(f"*/{gone}.*"):
        path.unlink()
    dm = module({**data, "root": str(smaller)}, cache_dir=data["cache"])  # extra cached ids are fine
    assert gone not in dm.dataset.ids and len(dm.dataset.ids) == 11
    image = next(smaller.glob(f"images/{edited}.*"))
    image.write_bytes(image.read_bytes() + b"\0")  # same pixels for a decoder, different content hash
    with pytest.raises(
        CacheError, match=rf"1 id\(s\) with changed content since they were cached \(e.g. {edited}\)"
    ):
        module({**data, "root": str(smaller)}, cache_dir=data["cache"])


PATHS = pytest.mark.parametrize("augment_on", ["workers", "device"])


@PATHS
def test_match_mode_uses_the_sampled_view_among_the_cached_ones(data, augment_on):
    options = {"teacher_views": "match", "augment": "light", "crop_size": 64, "augment_on": augment_on}
    dm = module(data, cache_dir=data["cache"], batch_size=1, **options)
    views_seen = set()
    for batch in stream_batches(dm, 3 * len(dm.train_ids)):
        (item_id,) = batch["id"]
        record = data["dataset"].get(item_id)
        mask = batch["mask"][0, 0].numpy()
        # 10 k + mask + offset(id), moved with the mask: constant once mask and offset are removed.
        residual = batch["teacher"][0, 0].numpy().astype(np.float32) - mask - offset(item_id)
        k = int(round(residual[0, 0] / 10))
        np.testing.assert_array_equal(residual, np.full_like(residual, 10 * k))
        view = VIEWS[k]
        if record.mask.shape == mask.shape:  # a 64 px image: the crop is all of it
            np.testing.assert_array_equal(mask, apply_view(record.mask, view))
            np.testing.assert_array_equal(batch["roi"][0, 0].numpy(), apply_view(record.roi, view))
        views_seen.add(view)
    assert views_seen == set(VIEWS)


@PATHS
def test_mean_mode_trains_on_the_averaged_map(data, augment_on):
    dm = module(
        data, cache_dir=data["cache"], augment="light", batch_size=1, crop_size=64, augment_on=augment_on
    )
    for batch in stream_batches(dm, 4):
        (item_id,) = batch["id"]
        residual = batch["teacher"][0, 0].numpy() - batch["mask"][0, 0].numpy() - offset(item_id)
        np.testing.assert_array_equal(residual, np.full_like(residual, 10.0))  # mean of 10 k over k = 0, 1, 2


def test_workers_and_in_memory_give_the_same_validation_batches(data):
    reference = list(module(data, cache_dir=data["cache"], in_memory=True).val_dataloader())
    dm = module(data, cache_dir=data["cache"], in_memory=False, num_workers=2, crop_size=48, skeletons=True)
    assert dm.records is None
    for ours, theirs in zip(dm.val_dataloader(), reference, strict=True):
        assert ours["id"] == theirs["id"]
        for key in ("image", "mask", "roi", "teacher"):
            assert torch.equal(ours[key], theirs[key])
    train = list(dm.train_dataloader())
    assert len(train) == len(dm.train_ids) // 2  # drop_last
    for batch in train:
        check_contract(batch, teacher=True, skeleton=True)


def stream_batches(dm: VesselDataModule, count: int) -> list[dict]:
    """The first `count` train batches, across epoch boundaries."""
    stream, batches = dm.train_dataloader(), []
    while len(batches) < count:
        batches.extend(stream)
    dm.close_train_stream()
    return batches[:count]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_the_same_seed_gives_the_same_batches_whatever_the_number_of_workers(data):
    options = {"cache_dir": data["cache"], "teacher_views": "match", "augment": "strong", "crop_size": 40}
    runs = {}
    for workers in (0, 1, 3):
        torch.manual_seed(0)
        runs[workers] = stream_batches(module(data, num_workers=workers, batch_size=3, **options), 6)
    for workers in (1, 3):
        for ours, theirs in zip(runs[workers], runs[0], strict=True):
            assert ours["id"] == theirs["id"]
            for key in ("image", "mask", "roi", "teacher", "teacher_valid", "index"):
                assert torch.equal(ours[key], theirs[key]), (workers, key)
    torch.manual_seed(1)
    other = stream_batches(module(data, num_workers=0, batch_size=3, **options), 1)[0]
    assert not torch.equal(other["image"], runs[0][0]["image"])


def test_full_size_images_of_one_square_size_go_through_the_ring_others_do_not(data, tmp_path):
    samples = [dataclasses.replace(generate_sample(i, 48, "fundus"), id=f"u{i:02d}") for i in range(8)]
    uniform = {"root": str(write_dataset(tmp_path / "uniform", samples, FORMAT))}
    runs = {}
    for workers in (0, 2):
        dm = module(uniform, num_workers=workers, batch_size=3)
        assert isinstance(dm.train_dataloader().batches, RingBatches) == (workers > 0)
        torch.manual_seed(0)
        runs[workers] = stream_batches(dm, 4)
    for ours, theirs in zip(runs[2], runs[0], strict=True):
        assert ours["id"] == theirs["id"]
        for key in ("image", "mask", "roi", "index"):
            assert torch.equal(ours[key], theirs[key]), key
    mixed = module(data, num_workers=2)  # 64 and 80 px images, no crop: batches are padded per batch
    assert not isinstance(mixed.train_dataloader().batches, RingBatches)
    mixed.close_train_stream()
    on_disk = module(uniform, num_workers=2, in_memory=False)  # sizes unknown until read
    assert not isinstance(on_disk.train_dataloader().batches, RingBatches)
    on_disk.close_train_stream()
    resizing = module(uniform, num_workers=2)  # an extra albumentations transform may change the size
    resizing.train_augment = Augment(Preset(views=("identity",), spatial=(A.RandomScale(0.2, p=1),)))
    assert not isinstance(resizing.train_dataloader().batches, RingBatches)
    resizing.close_train_stream()


def test_an_epoch_is_samples_per_epoch_and_a_batch_may_exceed_the_split(data):
    dm = module(data, samples_per_epoch=20, batch_size=4, crop_size=48)
    assert len(dm.train_dataloader()) == 5
    n = len(dm.train_ids)
    big = module(data, batch_size=n + 3, crop_size=48)
    batch = stream_batches(big, 1)[0]
    assert batch["image"].shape[0] == n + 3 and len(set(batch["id"])) == n  # every image, three twice
    with pytest.raises(ConfigError, match="data.samples_per_epoch=3 is less than one step's 4"):
        module(data, samples_per_epoch=3, batch_size=4).train_dataloader()


def test_mixed_sizes_pad_with_roi_zero(data):
    dataset = data["dataset"]
    every = VesselSplit(dataset.ids, dataset.get, augment=None, teacher=None, skeletons=False)
    small, large = every[1], every[0]
    assert small["mask"].shape == (64, 64) and large["mask"].shape == (80, 80)
    batch = collate_padded([small, large])
    assert batch["image"].shape == (2, 3, 80, 80)
    assert batch["roi"][0, 0, 64:].sum() == 0 and batch["roi"][0, 0, :, 64:].sum() == 0
    np.testing.assert_array_equal(batch["roi"][0, 0, :64, :64].numpy(), small["roi"])
    np.testing.assert_array_equal(batch["image"][0, :, :64, :64].permute(1, 2, 0).numpy(), small["image"])
    np.testing.assert_array_equal(batch["roi"][1, 0].numpy(), large["roi"])


class _FailSecondStep(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 1:
            raise RuntimeError("a failing step")


def test_a_failed_fit_stops_its_workers(data, tmp_path):
    dm = module(data, num_workers=1, crop_size=32)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, callbacks=[_FailSecondStep()],
    )  # fmt: skip
    student = StudentConfig(
        name="unet", encoder="resnet18", extra={"encoder_depth": 3, "decoder_channels": [16, 8, 4]}
    )
    before = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match="a failing step"):
        trainer.fit(DistillModule(student=student, loss={"kd_alpha": 0.0}), datamodule=dm)
    assert dm.train_stream is None
    assert not set(multiprocessing.active_children()) - before  # the train worker stopped


def test_bad_settings_are_named(data):
    with pytest.raises(ConfigError, match="data.teacher_views"):
        VesselDataModule(data_root=data["root"], teacher_views="median")
    with pytest.raises(ConfigError, match="data.augment"):
        VesselDataModule(data_root=data["root"], augment="heavy")


def test_configurable_as_data_section_of_a_fit_yaml(data):
    parser = ArgumentParser()
    parser.add_class_arguments(VesselDataModule, "data")
    config = parser.parse_string(
        f"data:\n  data_format: {FORMAT}\n  data_root: {data['root']}\n  teacher_views: match\n  crop_size: 48\n"
    )
    dm = VesselDataModule(**config.data)
    assert (dm.teacher_views, dm.crop_size, dm.train_augment.crop_size) == ("match", 48, 48)
    with pytest.raises(SystemExit):
        parser.parse_string("data:\n  teacher_views: median\n")


def test_records_decoded_by_workers_equal_those_decoded_here(data):
    dataset = data["dataset"]
    here = decode_all(dataset, dataset.ids, num_workers=0)
    there = decode_all(dataset, dataset.ids, num_workers=2)
    assert list(there) == list(here) == dataset.ids
    for item_id, record in here.items():
        np.testing.assert_array_equal(there[item_id].image, record.image)
        np.testing.assert_array_equal(there[item_id].mask, record.mask)


def test_a_bad_item_decoded_by_a_worker_raises_its_own_error(data, tmp_path):
    root = shutil.copytree(data["root"], tmp_path / "data")
    image = next((root / "images").iterdir())
    image.write_bytes(image.read_bytes()[:100])  # truncated
    dataset = open_dataset(FORMAT, root)
    with pytest.raises(DatasetError, match=rf"{image.name}: image cannot be decoded"):
        decode_all(dataset, dataset.ids, num_workers=2)


def test_a_bad_training_item_in_a_ring_worker_names_its_file(data, tmp_path):
    root = shutil.copytree(data["root"], tmp_path / "data")
    dm = module({**data, "root": str(root)}, num_workers=2, crop_size=32, in_memory=False)
    image = root / "images" / f"{dm.train_ids[1]}.png"
    image.write_bytes(image.read_bytes()[:100])  # truncated after setup, before training reads it
    before = set(multiprocessing.active_children())
    with pytest.raises(RuntimeError, match=rf"{image.name}: image cannot be decoded"):
        stream_batches(dm, 2 * len(dm.train_ids))
    dm.close_train_stream()
    assert not set(multiprocessing.active_children()) - before


class _Niceness(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return os.nice(0)


def test_workers_yield_the_cpu_to_the_training_process():
    loader = torch.utils.data.DataLoader(
        _Niceness(), batch_size=None, num_workers=1, worker_init_fn=init_worker
    )
    assert {int(n) for n in loader} == {min(19, os.nice(0) + WORKER_NICENESS)}


class _Cycle:
    """Garbage that says which process freed it (as a CUDA tensor's deleter would run there)."""

    def __init__(self, folder):
        self.folder, self.me = folder, self

    def __del__(self):
        (self.folder / str(os.getpid())).touch()


class _MakesGarbage(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        for _ in range(5000):  # enough young cycles to run the worker's garbage collector
            cycle = []
            cycle.append(cycle)
        gc.collect()
        return index


def test_workers_never_free_garbage_inherited_from_the_training_process(tmp_path):
    gc.disable()
    try:
        _Cycle(tmp_path)  # unreachable at once, freed only by a collection
        loader = ForkSafeLoader(_MakesGarbage(), batch_size=None, num_workers=2, worker_init_fn=init_worker)
        assert sorted(loader) == [0, 1, 2, 3]
    finally:
        gc.enable()
    gc.collect()
    assert [p.name for p in tmp_path.iterdir()] == [str(os.getpid())]


class _SharedOnly(torch.utils.data.Dataset):
    """A dataset that refuses to be pickled: workers can only have it by fork."""

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return index

    def __reduce__(self):
        raise TypeError("pickled: a worker was spawned")


def test_workers_are_forked_even_where_spawn_is_the_default():
    """Every rank of ddp_spawn defaults to spawn: workers would re-import the script and unpickle the dataset."""
    previous = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method("spawn", force=True)
    try:
        loader = ForkSafeLoader(_SharedOnly(), batch_size=None, num_workers=2, worker_init_fn=init_worker)
        assert sorted(loader) == [0, 1, 2, 3]
    finally:
        multiprocessing.set_start_method(previous, force=True)


@PATHS
def test_ids_without_a_teacher_map_stay_with_an_empty_teacher_and_teacher_valid_0(data, tmp_path, augment_on):
    splits = module(data)
    missing = {splits.train_ids[0], splits.val_ids[0]}
    dataset = data["dataset"]
    manifest = {"teacher": {"name": "test-pattern"}, "dataset": dataset.fingerprint(), "views": ["identity"]}
    with CacheWriter(tmp_path / "cache", "w0", manifest) as writer:
        for item_id in dataset.ids:
            if item_id in missing:
                writer.write_status(item_id)
            else:
                writer.write(item_id, "identity", cached_map(dataset.get(item_id), 0))
    with pytest.warns(UserWarning, match="no map for 2 of 12 id"):
        dm = module(
            data,
            cache_dir=str(tmp_path / "cache"),
            batch_size=len(splits.train_ids),
            crop_size=48,
            augment_on=augment_on,
        )
    assert dm.teacher_no_mask_ids == missing
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        check_contract(batch, teacher=True, skeleton=False)
        for i, item_id in enumerate(batch["id"]):
            assert batch["teacher_valid"][i].item() == (item_id not in missing)
            if item_id in missing:
                assert (batch["teacher"][i] == NO_MAP_LOGIT).all()
            else:
                assert (batch["teacher"][i] != NO_MAP_LOGIT).any()
        assert set(batch["id"]) & missing


class _Drawn(pl.Callback):
    """Records the split positions of every training batch."""

    def __init__(self):
        self.indices = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(batch["index"].tolist())


def _fit_steps(data: dict, max_steps: int, root, ckpt_path=None, workers=0) -> tuple[list, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    student = StudentConfig(
        name="unet", encoder="resnet18", extra={"encoder_depth": 3, "decoder_channels": [16, 8, 4]}
    )
    drawn = _Drawn()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[drawn],
    )
    dm = VesselDataModule(
        data_format=FORMAT,
        data_root=data["root"],
        num_workers=workers,
        batch_size=2,
        crop_size=32,
        samples_per_epoch=6,
    )
    trainer.fit(DistillModule(student=student, loss={"kd_alpha": 0.0}), datamodule=dm, ckpt_path=ckpt_path)
    return drawn.indices, trainer


@pytest.mark.parametrize("workers", [0, 2])  # in the process; workers writing into the batch ring
def test_a_run_resumed_mid_epoch_continues_the_stream_where_it_stopped(data, tmp_path, workers):
    whole, _ = _fit_steps(data, 7, tmp_path / "whole", workers=workers)  # epochs of 3 steps
    first, trainer = _fit_steps(data, 4, tmp_path / "first", workers=workers)  # stops inside the second epoch
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    rest, _ = _fit_steps(data, 7, tmp_path / "rest", ckpt_path=tmp_path / "mid.ckpt", workers=workers)
    assert first == whole[:4] and rest == whole[4:]


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="Linux shared memory")
def test_loaders_whose_batches_may_not_fit_in_shared_memory_say_so_before_they_start(data, monkeypatch):
    import distill.data.datamodule as datamodule

    dm = module(data, num_workers=2, batch_size=4, cache_dir=data["cache"])  # 64 and 80 px images

    def need(ids: list[str]) -> int:  # (2 workers x 2 batches + the one read) of image, mask, roi, teacher
        height, width = (max(dm.records[i].mask.shape[axis] for i in ids) for axis in (0, 1))
        return (2 * 2 + 1) * 4 * height * width * (3 + 1 + 1 + 2)

    def free(size: int) -> None:
        monkeypatch.setattr(
            datamodule.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(size, 0, size)
        )

    free(need(dm.val_ids) - 1)
    with pytest.warns(UserWarning, match=r"val loading may hold up to .* MiB .*--shm-size"):
        dm.val_dataloader()
    free(need(dm.val_ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        dm.val_dataloader()
        free(need(dm.train_ids))
        dm.train_dataloader()  # mixed sizes: no ring, the batches go through shared memory
    assert dm.train_shared_bytes == need(dm.train_ids)
    # While training runs, its workers' batches stay in flight: validation needs room beside them.
    with pytest.warns(UserWarning, match=r"val loading \(with the training workers' batches\)"):
        dm.val_dataloader()
    free(need(dm.train_ids) - 1)
    with pytest.warns(UserWarning, match=r"training may hold .* or set data.crop_size"):
        dm.train_dataloader()
    dm.close_train_stream()
    assert dm.train_shared_bytes == 0
    ring = module(data, num_workers=2, batch_size=4, crop_size=32)  # the ring needs no shared memory
    ring.train_dataloader()
    assert ring.train_shared_bytes == 0
    ring.close_train_stream()
