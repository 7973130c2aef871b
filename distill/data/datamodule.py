"""`VesselDataModule`: any dataset reader + an optional teacher cache, joined by id, augmented together.

Batches are dicts of cheap CPU types (uint8 images/masks, float16 teacher logits) so the host->GPU
copy stays small; the LightningModule converts on the device. Shapes and dtypes:

    image    uint8   [B,3,H,W]  RGB, not normalised (channels_last strides)
    mask     uint8   [B,1,H,W]  0/1
    roi      uint8   [B,1,H,W]  0/1 (all ones when the dataset has none; 0 on batch padding)
    teacher  float16 [B,1,H,W]  logits aligned with the augmented image (only with cache_dir; in
                                training only when the module trains on them, see train_dataloader)
    teacher_valid uint8 [B]     1 where the teacher gave a map; 0 for a no_mask id, whose teacher
                                logits are NO_MAP_LOGIT everywhere (with teacher)
    skeleton uint8   [B,1,H,W]  skeleton of the augmented mask (only with skeletons=True)
    id       list[str]
    index    int64   [B]        position in its split (puts per-image scores gathered over DDP ranks in order)

Training batches are made by DataLoader workers (`augment_on: workers`, albumentations, one sample
at a time) or on the training device (`augment_on: device`, kornia, a batch at a time; see
distill.data.device_augment); both draw a sample's augmentation from the run's seed and the sample's
place in the stream, so the same seed gives the same batches whatever `num_workers` is. When every
training sample has one shape (crops, or full-size images of one square size held in memory), workers
write their batches into a shared ring that is pinned once (see distill.data.ring).

Images of different sizes: training crops to `crop_size` when it is set; validation and test are
never augmented or resized, so a batch whose images differ in size is padded at the bottom/right to
its largest image, with roi = 0 (and mask = teacher = 0) on the padding: losses and metrics count
only roi pixels, so padding changes no number. (The students pad to their stride themselves.)

Ids the teacher gave no map for (cache status no_mask: Sa2VA generated no [SEG]) stay in the data:
they train on ground truth alone (by teacher_valid, DistillLoss makes the ground truth their KD
target), and the teacher is scored on them as what it returned, an empty prediction. Leaving them
out instead would change the dataset's fingerprint and orphan the whole cache.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import shutil
from collections.abc import Callable
from typing import Any, Literal

import cv2
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from skimage.morphology import skeletonize
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from distill.cache import TeacherCache, read_manifest
from distill.data import Record, VesselDataset, open_dataset
from distill.data.augment import Augment, build_augment, mean_map, sample_rng
from distill.data.device_augment import DeviceAugment, DeviceBatches, ResidentSplit
from distill.data.ring import PREFETCH_FACTOR, RingBatches, channels_first
from distill.data.sampling import Draw, EndlessBatches, EpochStream, EvalShard, batches_per_epoch
from distill.data.splits import SPLITS
from distill.errors import CacheError, ConfigError, DistillError

FORKS = "fork" in multiprocessing.get_all_start_methods()  # whether ForkSafeLoader's workers are forked
NO_MAP_LOGIT = -20.0  # the teacher logit of an id without a map: probability 2e-9, below any threshold
WORKER_NICENESS = 10  # added to the DataLoader workers' niceness (see init_worker)
SHARED_MEMORY = "/dev/shm"  # where torch's DataLoader workers put the batches they return (Linux)


class TeacherMaps:
    """Reads the teacher maps of an id, from a cache opened lazily in whichever process reads.

    `views="mean"`: training and scoring use the mean of every cached view (test-time augmentation
    as a better teacher); `views="match"`: the map of the view that augmentation sampled. Maps come
    in the original orientation (the caller applies the view, as to the image) as read-only memory
    maps, so nothing is read until a window of them is used.
    """

    def __init__(self, cache_dir: str, views: Literal["mean", "match"], no_map: frozenset[str] = frozenset()):
        self.cache_dir = cache_dir
        self.views = views
        self.no_map = no_map  # ids with status no_mask (for any view): their map is NO_MAP_LOGIT everywhere
        self._cache: TeacherCache | None = None

    @property
    def cache(self) -> TeacherCache:
        if self._cache is None:
            self._cache = TeacherCache(self.cache_dir)
        return self._cache

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": None}  # each worker opens its own memory maps

    def read(self, id: str, view: str, shape: tuple[int, int]) -> list[np.ndarray]:
        """The float16 HxW maps to use for `id` seen as `view`: the view's own ("match", or a one-view
        cache) or every cached view ("mean": average them where they are used, see augment.mean_map)."""
        if id in self.no_map:  # an empty prediction; augmentation moves it like any map
            return [np.full(shape, NO_MAP_LOGIT, np.float16)]
        views = self.cache.views if self.views == "mean" else [view]
        maps = [self.cache.read(id, v, copy=False) for v in views]
        if maps[0].shape != shape:
            raise CacheError(
                f"{self.cache_dir}: teacher map of {id!r} is {maps[0].shape[0]}x{maps[0].shape[1]} but the "
                f"image is {shape[0]}x{shape[1]}; rebuild the cache for this dataset"
            )
        return maps

    def resident(self, id: str, shape: tuple[int, int]) -> np.ndarray:
        """What a resident split holds for `id`: the mean map ("mean"), or every cached view as HxWxV ("match")."""
        if self.views == "mean":
            return mean_map(self.read(id, "identity", shape))
        return np.stack([self.read(id, view, shape)[0] for view in self.cache.views], axis=-1)


class VesselSplit(Dataset):
    """One split as a torch Dataset: record -> (teacher join) -> augmentation -> per-sample arrays.

    `load` maps an id to its Record (a dict lookup when the data is held in RAM, else the reader).
    `augment=None` means evaluation: no augmentation, identity view, full size. Training items are
    `Draw`s (an int i counts as Draw(i, i)): the draw's number and `seed` (the run's, set by the
    DataModule) seed its augmentation.
    """

    def __init__(
        self,
        ids: list[str],
        load: Callable[[str], Record],
        augment: Augment | None,
        teacher: TeacherMaps | None,
        skeletons: bool,
        seed: int = 0,
    ):
        self.ids = ids
        self.load = load
        self.augment = augment
        self.teacher = teacher
        self.skeletons = skeletons
        self.seed = seed

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int | Draw) -> dict[str, np.ndarray | str]:
        index, number = item if isinstance(item, tuple) else (item, item)
        record = self.load(self.ids[index])
        shape = record.mask.shape
        roi = None if record.roi is None else as_bytes(record.roi)
        if self.augment is None:
            sample = {
                "image": record.image,
                "mask": record.mask,
                "roi": np.ones(shape, np.uint8) if roi is None else roi,
            }
            if self.teacher is not None:
                sample["teacher"] = mean_map(self.teacher.read(record.id, "identity", shape))
        else:
            rng = sample_rng(self.seed, number)
            among = self.teacher.cache.views if self.teacher and self.teacher.views == "match" else None
            view = self.augment.sample_view(rng, among)
            teacher = self.teacher.read(record.id, view, shape) if self.teacher else None
            sample = self.augment(record.image, record.mask, roi, teacher=teacher, view=view, rng=rng)
            del sample["view"]
        if self.teacher is not None:
            sample["teacher_valid"] = np.uint8(record.id not in self.teacher.no_map)
        if self.skeletons:
            sample["skeleton"] = skeletonize(sample["mask"].astype(bool)).astype(np.uint8)
        return {**sample, "id": record.id, "index": index}


PER_SAMPLE_VALUES = {"index": torch.int64, "teacher_valid": torch.uint8}  # one number per sample


def shared_memory_shortfall(what: str, need: int) -> str | None:
    """Why `need` bytes of batches in flight may not fit in /dev/shm, or None.

    DataLoader workers return each batch in new shared memory. Where /dev/shm is smaller (64 MiB in a
    Docker container by default), a worker fails at its first batch ("unable to allocate shared
    memory", a bus error, or a hang), which for validation comes only after an epoch of training.
    """
    if need == 0 or not os.path.isdir(SHARED_MEMORY):
        return None
    free = shutil.disk_usage(SHARED_MEMORY).free
    if need <= free:
        return None
    return (
        f"{what} may hold up to {need / 2**20:.1f} MiB of shared memory at once, more than the "
        f"{free / 2**20:.1f} MiB free in {SHARED_MEMORY}: its DataLoader workers would fail (unable to allocate "
        "shared memory, a bus error, or a hang). Give the container more (docker run --shm-size=8g, or "
        "--ipc=host) or lower data.num_workers or data.batch_size"
    )


def as_bytes(mask: np.ndarray) -> np.ndarray:
    """A 0/1 mask as uint8: a bool array is viewed as its bytes (no copy: to be read only), others converted."""
    return mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.uint8)


def collate_padded(samples: list[dict]) -> dict[str, torch.Tensor | list[str]]:
    """Stack samples into the batch dict of the module docstring, padding bottom/right to the largest.

    Arrays are stacked as they come (HxWxC); [B,C,H,W] is a view of that buffer (`channels_first`), i.e.
    channels_last, the layout the GPU wants.
    """
    height = max(s["mask"].shape[0] for s in samples)
    width = max(s["mask"].shape[1] for s in samples)
    batch: dict[str, torch.Tensor | list[str]] = {"id": [s["id"] for s in samples]}
    for key, dtype in PER_SAMPLE_VALUES.items():
        if key in samples[0]:
            batch[key] = torch.tensor([s[key] for s in samples], dtype=dtype)
    for key in samples[0]:
        if key in batch:
            continue
        first = samples[0][key]
        out = np.zeros((len(samples), height, width, *first.shape[2:]), first.dtype)
        for i, sample in enumerate(samples):
            array = sample[key]
            out[i, : array.shape[0], : array.shape[1]] = array
        batch[key] = channels_first(torch.from_numpy(out))
    return batch


class ForkSafeLoader(DataLoader):
    """A DataLoader whose workers are forked, and never free CUDA memory they inherited.

    Forked, whatever the process's default start method: in a process started by spawn (every rank
    of `ddp_spawn`) the default is spawn, and each worker would then re-import the main script and
    receive a pickled copy of the dataset, the decoded records included (gigabytes, for every worker
    of every rank: what made `bench_fit --devices 2` crawl on two H200s). Forked, they share it.

    Any garbage cycle holding a CUDA tensor in the parent at fork time is copied into a forked worker,
    and a garbage collection there would free it with CUDA calls a forked child cannot make ("CUDA
    error: initialization error", the worker dies). So the parent collects right before its workers
    start, and each worker freezes what it inherited (`init_worker`).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        if kwargs.get("num_workers", 0) > 0 and FORKS:
            kwargs.setdefault("multiprocessing_context", "fork")
        super().__init__(*args, **kwargs)

    def __iter__(self):
        if self.num_workers > 0:
            gc.collect()
        return super().__iter__()


class _Decode(Dataset):
    def __init__(self, dataset: VesselDataset, ids: list[str]):
        self.dataset, self.ids = dataset, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Record | DistillError:
        try:
            return self.dataset.get(self.ids[index])
        except DistillError as error:  # raised as itself in the main process (a DataLoader would rewrap it)
            return error


def _as_is(item: Record | DistillError) -> Record | DistillError:
    return item


def decode_all(dataset: VesselDataset, ids: list[str], num_workers: int) -> dict[str, Record]:
    """Every record, decoded once by `num_workers` processes (rasterising polygons is the slow part)."""
    loader = ForkSafeLoader(
        _Decode(dataset, ids),
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_as_is,
        worker_init_fn=freeze_inherited_objects,
    )
    records = {}
    for item in tqdm(loader, total=len(ids), desc="decoding dataset", unit="img"):
        if isinstance(item, DistillError):
            raise item
        records[item.id] = item
    return records


def freeze_inherited_objects(worker_id: int = 0) -> None:
    """Keep the garbage collector of a forked worker off everything it inherited (see ForkSafeLoader)."""
    gc.freeze()


def init_worker(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: inherited objects frozen (see ForkSafeLoader); one OpenCV thread; a lower priority.

    Augmentations need no per-worker seeding: each sample is seeded by its draw (VesselSplit). The
    workers are the parallelism: OpenCV's own thread pool in each of them would oversubscribe the
    cores (0 = no pool; unlike 1, safe in a forked child whose parent already used the pool). Workers
    run at a lower priority (nice +10): when cores are short, the training process, whose kernel
    launches keep the GPU busy, goes first (SegFormer-B0 on an H200 with 14 workers on 16 cores: +5%
    images/s; BENCHMARKS.md).
    """
    freeze_inherited_objects()
    cv2.setNumThreads(0)
    os.nice(WORKER_NICENESS)


class VesselDataModule(pl.LightningDataModule):
    """Dataset (any reader) + optional teacher cache, joined by id; configured as `data:` in fit YAML.

    Args:
        data_format: reader name ("merged", "labelme", "coco", "mask_folder").
        data_root: dataset directory.
        reader_options: extra options of the reader (e.g. {"categories": [1]} for coco).
        cache_dir: teacher cache directory; None trains on ground truth only. A cache built for other
            data is refused (CacheError).
        teacher_views: "mean" averages every cached view; "match" uses the cached view equal to the
            sampled flip/rotation (only cached views are sampled then).
        batch_size: samples per batch and process (train, val and test). May exceed the train split:
            its images then repeat within a batch.
        samples_per_epoch: training samples per epoch, all processes together, drawn from the endless
            stream of shuffled passes over the train split (so epochs of a small split can be long);
            None: one pass over the split.
        num_workers: DataLoader worker processes (0 = load in the main process).
        in_memory: decode every record once in setup (in num_workers processes) and keep it in RAM
            (forked workers share it).
        crop_size: random square crop (pixels) for training; None trains at full size.
        augment: augmentation preset: "none", "light", "default", "strong".
        augment_on: where training batches are made: "workers" (DataLoader workers, albumentations,
            per sample) or "device" (the training device, kornia, per batch; needs crop_size, no
            skeletons; the train split is held in GPU memory when it fits, see device_augment).
        split_seed: seed of the dataset's train/val/test split (used when no split file exists yet).
        skeletons: add the skeleton of the (augmented) mask for thin-vessel losses.
        pin_memory: pin batches for a faster copy to the GPU (only used when CUDA is available); the
            train batch ring, where used, is pinned once (see distill.data.ring).
        persistent_workers: keep validation/test workers alive between epochs (num_workers > 0); the
            train workers always run for the whole fit (see distill.data.sampling).
    """

    def __init__(
        self,
        data_format: str = "merged",
        data_root: str = "data/synthetic",
        reader_options: dict | None = None,
        cache_dir: str | None = None,
        teacher_views: Literal["mean", "match"] = "mean",
        batch_size: int = 8,
        samples_per_epoch: int | None = None,
        num_workers: int = 2,
        in_memory: bool = True,
        crop_size: int | None = None,
        augment: str = "default",
        augment_on: Literal["workers", "device"] = "workers",
        split_seed: int = 0,
        skeletons: bool = False,
        pin_memory: bool = True,
        persistent_workers: bool = True,
    ):
        super().__init__()
        if teacher_views not in ("mean", "match"):
            raise ConfigError(f"data.teacher_views={teacher_views!r}: choose 'mean' or 'match'")
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(
                f"data.batch_size={batch_size} must be >= 1, data.num_workers={num_workers} >= 0"
            )
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ConfigError(f"data.samples_per_epoch={samples_per_epoch} must be >= 1 (or null: one pass)")
        if augment_on not in ("workers", "device"):
            raise ConfigError(f"data.augment_on={augment_on!r}: choose 'workers' or 'device'")
        if augment_on == "device" and skeletons:
            raise ConfigError(
                "data.skeletons=true needs data.augment_on=workers (skeletons are computed per sample "
                "by scikit-image); thin.kind=cldice needs no skeletons"
            )
        self.save_hyperparameters()
        self.data_format = data_format
        self.data_root = data_root
        self.reader_options = dict(reader_options or {})
        self.cache_dir = cache_dir
        self.teacher_views = teacher_views
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.num_workers = num_workers
        self.in_memory = in_memory
        self.crop_size = crop_size
        self.train_augment = build_augment(augment, crop_size)  # validates the preset here, not in a worker
        self.augment_on = augment_on
        if augment_on == "device":
            DeviceAugment(self.train_augment, "cpu")  # refuses what the device path cannot do, now
        self.split_seed = split_seed
        self.skeletons = skeletons
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.persistent_workers = persistent_workers and num_workers > 0
        self.dataset: VesselDataset | None = None
        self.cache: TeacherCache | None = None
        self.teacher: TeacherMaps | None = None
        self.teacher_no_mask_ids: frozenset[str] = frozenset()  # set in setup (see the module docstring)
        self.records: dict[str, Record] | None = None
        self.splits: dict[str, VesselSplit] = {}
        self.resident: ResidentSplit | None = None  # the train split on the device (augment_on=device)
        self.train_stream: EpochStream | None = None
        self.train_shared_bytes = 0  # what the open training stream's workers may hold in /dev/shm

    @property
    def has_teacher(self) -> bool:
        return self.cache_dir is not None

    def scored_teacher(self) -> dict[str, Any] | None:
        """What decides the teacher maps that validation and test score (None without a cache): the
        cache's teacher fingerprint and views, and `teacher_views`. A teacher threshold chosen on one
        holds for no other (`DistillModule` keeps it in checkpoints; `distill.evaluate` compares)."""
        if self.cache_dir is None:
            return None
        manifest = self.cache.manifest if self.cache is not None else read_manifest(self.cache_dir)
        return {
            "teacher": manifest["teacher"],
            "views": sorted(manifest["views"]),
            "teacher_views": self.teacher_views,
        }

    @property
    def train_ids(self) -> list[str]:
        return self.splits["train"].ids

    @property
    def val_ids(self) -> list[str]:
        return self.splits["val"].ids

    @property
    def test_ids(self) -> list[str]:
        return self.splits["test"].ids

    def setup(self, stage: str | None = None) -> None:
        """Open the dataset, check the cache against it, decode records (in_memory). Idempotent."""
        if self.splits:
            return
        self.dataset = open_dataset(
            self.data_format, self.data_root, split_seed=self.split_seed, **self.reader_options
        )
        if self.cache_dir is not None:
            self.cache = TeacherCache(self.cache_dir)
            self.cache.check_dataset(self.dataset.fingerprint())
            if self.teacher_views == "match" and "identity" not in self.cache.views:
                raise ConfigError(
                    f"data.teacher_views='match' needs the identity view in {self.cache_dir} for un-augmented "
                    f"validation (it holds {self.cache.views}); use teacher_views='mean' or cache identity"
                )
            self.teacher_no_mask_ids = frozenset(
                i for i in self.dataset.ids if self.cache.status(i) == "no_mask"
            )
            if self.teacher_no_mask_ids:
                rank_zero_warn(
                    f"{self.cache_dir}: the teacher gave no map for {len(self.teacher_no_mask_ids)} of "
                    f"{len(self.dataset.ids)} id(s) (status no_mask, e.g. {sorted(self.teacher_no_mask_ids)[:5]}): "
                    "they train on ground truth alone, and count as an empty teacher prediction in the "
                    "teacher's metrics (metrics.json lists them under teacher_no_mask_ids)"
                )
            self.teacher = TeacherMaps(self.cache_dir, self.teacher_views, self.teacher_no_mask_ids)
        load = self.dataset.get
        if self.in_memory:
            ids = [i for split in SPLITS for i in self.dataset.split_ids(split)]
            self.records = decode_all(self.dataset, ids, self.num_workers)
            load = self.records.__getitem__
        for split in SPLITS:
            augment = self.train_augment if split == "train" else None
            self.splits[split] = VesselSplit(
                self.dataset.split_ids(split), load, augment, self.teacher, self.skeletons
            )

    def _split(self, split: str) -> VesselSplit:
        data = self.splits[split]
        if len(data) == 0:
            raise ConfigError(
                f"the {split} split of {self.data_root} is empty; add images or change its splits file"
            )
        return data

    def _ranks(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, data: Dataset, **kwargs: Any) -> DataLoader:
        settings = {
            "num_workers": self.num_workers,
            "collate_fn": collate_padded,
            "pin_memory": self.pin_memory,
            "worker_init_fn": init_worker if self.num_workers > 0 else None,
            **kwargs,
        }
        return ForkSafeLoader(data, **settings)

    def _uses_ring(self, data: VesselSplit) -> bool:
        """Whether train workers write into a BatchRing: forked workers, and samples of one shape, which
        crops give, and so do full-size images held in memory that are all one square size (a square
        stays a square under the D4 views; albumentations' warps keep the size)."""
        if self.num_workers == 0 or not FORKS:
            return False
        if self.crop_size is not None:
            return True
        if self.records is None or self.train_augment.preset.spatial:
            return False  # sizes unknown beforehand: read per sample, or extra transforms that may resize
        shapes = {self.records[i].mask.shape for i in data.ids}
        return len(shapes) == 1 and len(set(next(iter(shapes)))) == 1

    def _no_ring_path(self) -> str:
        if self.num_workers == 0:
            return "made in the training process (data.num_workers=0)"
        why = "workers are not forked on this platform" if not FORKS else "samples may differ in shape"
        return f"{self.num_workers} DataLoader workers, each batch in new shared memory ({why})"

    def train_dataloader(self) -> EpochStream:
        """Shuffled, augmented batches as one stream that runs across epochs (see distill.data.sampling).

        Teacher maps are read for training only when the module trains on them (its
        `trains_on_teacher`, e.g. False with kd.alpha = 0); validation and test always score the teacher.
        """
        data = self._split("train")
        rank, world_size = self._ranks()
        seed = int(torch.randint(2**31, ()).item())  # follows seed_everything
        first_batch, device, module = 0, torch.device("cpu"), None
        if self.trainer is not None:
            seed = self.trainer.strategy.broadcast(seed)  # every rank must deal the same permutation
            loop = self.trainer.fit_loop.epoch_loop
            first_batch = lambda: loop.batch_progress.total.completed  # noqa: E731  resumed: continue (read once restored)
            device = self.trainer.strategy.root_device
            module = self.trainer.lightning_module
        teacher = self.teacher if getattr(module, "trains_on_teacher", True) else None
        per_step = self.batch_size * world_size
        if per_step > len(data):
            rank_zero_info(
                f"data.batch_size={self.batch_size} x {world_size} process(es) exceeds the {len(data)} train "
                "images: images repeat within a step"
            )
        steps = batches_per_epoch(
            self.samples_per_epoch or max(len(data), per_step), self.batch_size, world_size
        )
        batches = EndlessBatches(len(data), self.batch_size, seed, rank, world_size, first_batch)
        self.close_train_stream()
        if self.augment_on == "device":
            stream = DeviceBatches(
                self._resident(data, teacher, device),
                DeviceAugment(self.train_augment, device),
                batches,
                seed,
            )
            self.train_stream = EpochStream(stream, steps)
        else:
            train = VesselSplit(data.ids, data.load, data.augment, teacher, self.skeletons, seed)
            if self._uses_ring(train):
                stream = RingBatches.of(
                    train,
                    batches,
                    self.batch_size,
                    self.num_workers,
                    PER_SAMPLE_VALUES,
                    device,
                    self.pin_memory,
                    self._loader,
                )
                rank_zero_info(
                    f"training batches: {self.num_workers} workers write into a shared ring of {stream.ring.slots} "
                    f"batches ({stream.ring.nbytes / 2**20:.0f} MiB)"
                )
                self.train_stream = EpochStream(stream, steps)
            else:
                rank_zero_info(f"training batches: {self._no_ring_path()}")
                self.train_shared_bytes = self._shared_bytes(train, self.crop_size, teacher is not None)
                shortfall = shared_memory_shortfall("training", self.train_shared_bytes)
                if shortfall is not None:
                    rank_zero_warn(f"{shortfall}; or set data.crop_size, whose batches need no /dev/shm")
                self.train_stream = EpochStream(self._loader(train, batch_sampler=batches), steps, device)
        return self.train_stream

    def _resident(
        self, data: VesselSplit, teacher: TeacherMaps | None, device: torch.device
    ) -> ResidentSplit:
        """The train split held on `device` (built once per fit setting: device and whether it holds the teacher)."""
        if self.resident is None or self.resident.requested != (device, teacher is not None):
            records = [data.load(i) for i in data.ids]
            maps = None if teacher is None else [teacher.resident(r.id, r.mask.shape) for r in records]
            self.resident = ResidentSplit(
                records,
                maps,
                teacher_views=self.cache.views
                if teacher is not None and self.teacher_views == "match"
                else None,
                teacher_valid=None if teacher is None else [r.id not in teacher.no_map for r in records],
                device=device,
            )
        return self.resident

    def close_train_stream(self) -> None:
        try:
            if self.train_stream is not None:
                self.train_stream.close()
        finally:
            self.train_stream, self.train_shared_bytes = None, 0

    def _shared_bytes(self, data: VesselSplit, side: int | None, teacher: bool) -> int:
        """Bytes of batches that this machine's workers of a loader over `data` may hold in /dev/shm at
        once: per process, each worker's `PREFETCH_FACTOR` batches and the one being read, each padded to
        the split's largest height and width (or `side` square). 0 without workers, or when the image
        sizes are unknown until read (in_memory: false), which is not checked."""
        if self.num_workers == 0:
            return 0
        if side is not None:
            height = width = side
        elif self.records is not None:
            height, width = (max(self.records[i].mask.shape[axis] for i in data.ids) for axis in (0, 1))
        else:
            return 0
        pixel = 3 + 1 + 1 + (2 if teacher else 0) + (1 if self.skeletons else 0)  # image, mask, roi, ...
        processes = self.trainer.num_devices if self.trainer is not None else 1
        in_flight = processes * (self.num_workers * PREFETCH_FACTOR + 1)
        return in_flight * self.batch_size * height * width * pixel

    def _eval_loader(self, split: str) -> DataLoader:
        data = self._split(split)
        # The training stream keeps its batches in flight while validation runs.
        need = self._shared_bytes(data, None, self.teacher is not None) + self.train_shared_bytes
        together = " (with the training workers' batches)" if self.train_shared_bytes else ""
        shortfall = shared_memory_shortfall(f"{split} loading{together}", need)
        if shortfall is not None:
            rank_zero_warn(shortfall)
        rank, world_size = self._ranks()
        return self._loader(
            data,
            batch_size=self.batch_size,
            sampler=EvalShard(data, rank, world_size),
            persistent_workers=self.persistent_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            self.close_train_stream()

    def on_exception(self, exception: BaseException) -> None:
        # A fit that fails or is interrupted gets no teardown: stop its workers (and unpin the batch
        # ring) here, so that the process goes on (a notebook, a loop of fits) as before.
        self.close_train_stream()
