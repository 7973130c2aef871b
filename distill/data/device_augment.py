"""Training batches made on the training device: the split held once in memory, a whole batch cropped and augmented at a time.

`data.augment_on: device`. The train split is decoded once into tensors (`ResidentSplit`: uint8
images, mask and roi, float16 teacher logits), on the GPU when they fit in half its free memory, else
in pinned host memory. Each step then, with no DataLoader worker and no per-sample Python work
beyond drawing its parameters:

1. draws each sample's D4 view and window exactly as the worker path does (`Augment.sample_view`,
   `Augment.sample_window`, from the same per-sample generator), and gathers the windows of the
   whole batch with one indexing op per tensor (reflected at image borders);
2. takes the teacher channel of each sample's view ("match"; the store holds every cached view) or
   the one stored mean map ("mean": averaged once per image when the store is built, never per
   sample) from the window, i.e. after cropping;
3. applies the D4 views (exact flips and transposes, selected per sample with `torch.where`);
4. runs the preset's spatial transforms in kornia (`AugmentationSequential`: image and teacher
   bilinear as one "input", mask and roi nearest as one "mask"), keeps the centre crop, and runs
   the colour transforms on the image alone;
5. returns the batch of the DataModule's contract (uint8 image/mask/roi, float16 teacher) on the device.

Making a batch is host-bound (kornia's Python and kernel launches), so on a GPU a producer thread
makes the next batches on a side CUDA stream while the step runs (`DeviceBatches`). The random
choices of each batch (step 1's draws and kornia's parameters) are drawn beforehand in the training
thread (`DeviceAugment.draw`): kornia samples from torch's global generators, which the training
step shares.

kornia samples the per-sample parameters of its transforms (angles, factors) on the CPU and copies
them without a host sync; the two whose parameters are whole maps (elastic displacements, noise)
sample on the device. Both generators are seeded per batch from its first sample's generator, so a
run is repeatable.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import kornia.augmentation as K
import numpy as np
import torch
from kornia.constants import DataKey
from torch import Tensor

from distill.data.augment import Augment, sample_rng
from distill.data.record import Record
from distill.data.sampling import Draw, EndlessBatches
from distill.errors import ConfigError

AHEAD = 2  # batches a producer thread makes ahead of the training step on a GPU (DeviceBatches)
RESIDENT_SHARE = 0.5  # hold the split on the GPU when it takes at most this share of its free memory
# view -> (transpose, then flip columns, then flip rows): the D4 views of distill.views on [..., H, W]
D4_FLAGS = {
    "identity": (0, 0, 0),
    "hflip": (0, 1, 0),
    "vflip": (0, 0, 1),
    "rot180": (0, 1, 1),
    "transpose": (1, 0, 0),
    "rot90": (1, 0, 1),
    "rot270": (1, 1, 0),
    "antitranspose": (1, 1, 1),
}
MAP_SAMPLERS = (K.RandomElasticTransform, K.RandomGaussianNoise)  # their random parameters are whole maps


def apply_views(x: Tensor, flags: Tensor) -> Tensor:
    """Apply each sample's D4 view to square maps x [B, C, S, S]; flags [B, 3] bool from D4_FLAGS."""
    transpose, hflip, vflip = (flags[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = torch.where(transpose, x.transpose(-2, -1), x)
    x = torch.where(hflip, x.flip(-1), x)
    return torch.where(vflip, x.flip(-2), x)


def _reflect(positions: Tensor, size: Tensor) -> Tensor:
    """Fold positions into [0, size) by reflection without repeating the edge (BORDER_REFLECT_101)."""
    period = (2 * (size - 1)).clamp_min(1)
    positions = positions.remainder(period)
    return torch.where(positions >= size, period - positions, positions)


def _to(tensor: Tensor, device: torch.device) -> Tensor:
    """Copy a fresh CPU tensor to `device` without making the host wait for the GPU's queue."""
    if device.type != "cuda" or tensor.is_cuda:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class ResidentSplit:
    """A split's samples held once as tensors [N, H, W, C] (padded to the largest image; roi 0 there).

    `teacher` [N] HxWxC float16 maps: one channel per cached view named in `teacher_views` (to be
    picked by the sampled view, "match"), or one channel when `teacher_views` is None (the mean of
    the cached views, or the only one). `teacher_valid` [N] is 0 for ids the teacher gave no map.
    Placement: on `device` when it is a GPU with room (RESIDENT_SHARE of its free memory), else in
    host memory (pinned when a GPU is used).
    """

    def __init__(
        self,
        records: Sequence[Record],
        teacher: Sequence[np.ndarray] | None = None,
        teacher_views: Sequence[str] | None = None,
        teacher_valid: Sequence[bool] | None = None,
        device: torch.device | str = "cpu",
    ):
        device = torch.device(device)
        self.requested = (device, teacher is not None)
        self.ids = [r.id for r in records]
        self.shapes = [r.mask.shape for r in records]
        height, width = (max(s[i] for s in self.shapes) for i in (0, 1))
        self.teacher_views = None if teacher_views is None else tuple(teacher_views)
        channels = 0 if teacher is None else 1 if teacher_views is None else len(teacher_views)
        per_pixel = 3 + 2 + 2 * channels
        bytes_needed = len(records) * height * width * per_pixel
        self.device = device
        if device.type == "cuda" and bytes_needed > RESIDENT_SHARE * torch.cuda.mem_get_info(device)[0]:
            self.device = torch.device("cpu")
        self.images = torch.zeros(len(records), height, width, 3, dtype=torch.uint8, device=self.device)
        self.planes = torch.zeros(len(records), height, width, 2, dtype=torch.uint8, device=self.device)
        self.teacher = None
        if teacher is not None:
            shape = (len(records), height, width, channels)
            self.teacher = torch.zeros(shape, dtype=torch.float16, device=self.device)
        for i, record in enumerate(records):
            h, w = record.mask.shape
            roi = np.ones((h, w), np.uint8) if record.roi is None else record.roi.astype(np.uint8)
            self.images[i, :h, :w] = torch.from_numpy(np.ascontiguousarray(record.image))
            self.planes[i, :h, :w] = torch.from_numpy(np.stack([record.mask, roi], axis=-1))
            if self.teacher is not None:
                self.teacher[i, :h, :w] = torch.from_numpy(np.ascontiguousarray(teacher[i])).view(
                    h, w, channels
                )
        sizes = torch.tensor(self.shapes, dtype=torch.int64, device=self.device)
        self.heights, self.widths = sizes[:, 0], sizes[:, 1]
        valid = [True] * len(records) if teacher_valid is None else list(teacher_valid)
        self.teacher_valid = torch.tensor(valid, dtype=torch.uint8, device=self.device)
        if self.device.type == "cpu" and device.type == "cuda":
            for name in ("images", "planes", "teacher", "teacher_valid"):
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name).pin_memory())

    def __len__(self) -> int:
        return len(self.ids)

    def cut(self, index: Tensor, top: Tensor, left: Tensor, side: int) -> dict[str, Tensor]:
        """Square windows [B, side, side, C] of samples `index` at (top, left) (tensors on this store's device)."""
        steps = torch.arange(side, device=index.device)
        rows = _reflect(top[:, None] + steps, self.heights[index][:, None])
        cols = _reflect(left[:, None] + steps, self.widths[index][:, None])
        at = (index[:, None, None], rows[:, :, None], cols[:, None, :])
        windows = {"image": self.images[at], "planes": self.planes[at]}
        if self.teacher is not None:
            windows["teacher"] = self.teacher[at]
            windows["teacher_valid"] = self.teacher_valid[index]
        return windows


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run kornia's sampling on the CPU generator (and `device`'s) seeded with `seed`, leaving the global ones as they were."""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class DeviceAugment:
    """The kornia twin of an `Augment` (same preset and crop size), applied to a whole batch on its device."""

    def __init__(self, augment: Augment, device: torch.device | str):
        preset, crop = augment.preset, augment.crop_size
        if crop is None or augment.window is None:
            raise ConfigError(
                "data.augment_on=device needs data.crop_size and a preset made of geometry/colour specs "
                "(its extra albumentations transforms run only with data.augment_on=workers)"
            )
        if preset.photometric:
            raise ConfigError(
                "data.augment_on=device: this preset has albumentations-only photometric transforms; "
                "use data.augment_on=workers"
            )
        self.augment, self.crop, self.window = augment, crop, augment.window
        self.device = torch.device(device)
        spatial = [spec.kornia(crop, self.window) for spec in preset.geometry]
        colour = preset.colour.kornia() if preset.colour is not None else []
        for module in spatial + colour:
            if isinstance(module, MAP_SAMPLERS):
                module.to(self.device)
        nearest = {DataKey.MASK: {"resample": "nearest", "align_corners": False}}
        self.spatial = (
            K.AugmentationSequential(*spatial, data_keys=["input", "mask"], extra_args=nearest)
            if spatial
            else None
        )
        self.colour = K.ImageSequential(*colour) if colour else None

    def plan(self, store: ResidentSplit, draws: Sequence[Draw], seed: int) -> tuple[Tensor, int]:
        """Per sample (index, top, left, D4 flags x3, teacher channel) as an int64 [B, 7] CPU tensor,
        drawn as the worker path draws them, and a seed for the batch's kornia transforms."""
        rngs = [sample_rng(seed, draw.number) for draw in draws]
        among = store.teacher_views if store.teacher is not None else None  # match: only cached views
        rows = []
        for draw, rng in zip(draws, rngs, strict=True):
            view = self.augment.sample_view(rng, among)
            top, left, _ = self.augment.sample_window(store.shapes[draw.index], rng)
            channel = store.teacher_views.index(view) if among else 0
            rows.append((draw.index, top, left, *D4_FLAGS[view], channel))
        return torch.tensor(rows, dtype=torch.int64), int(rngs[0].integers(2**62))

    def draw(self, store: ResidentSplit, draws: Sequence[Draw], seed: int) -> Order:
        """Every random choice of the batch of `draws`: its plan and its kornia transforms' parameters.

        kornia samples from the global generators (seeded here per batch), so this runs in the thread
        that trains; `make` then uses no randomness and may run in another thread.
        """
        plan, batch_seed = self.plan(store, draws, seed)
        channels = 3 + (store.teacher is not None)
        with seeded(batch_seed, self.device):
            spatial = (
                self.spatial.forward_parameters(torch.Size((len(draws), channels, self.window, self.window)))
                if self.spatial is not None
                else None
            )
            colour = (
                self.colour.forward_parameters(torch.Size((len(draws), 3, self.crop, self.crop)))
                if self.colour is not None
                else None
            )
        return Order([store.ids[draw.index] for draw in draws], plan, spatial, colour)

    def make(self, store: ResidentSplit, order: Order) -> dict[str, Any]:
        """The batch that `order` describes (see the DataModule's contract), made on this augmenter's device."""
        plan = _to(order.plan, store.device)
        windows = store.cut(plan[:, 0], plan[:, 1], plan[:, 2], self.window)
        windows = {key: _to(value, self.device) for key, value in windows.items()}
        plan = _to(plan, self.device)

        x = windows["image"].permute(0, 3, 1, 2).float() / 255
        planes = windows["planes"].permute(0, 3, 1, 2).float()
        if "teacher" in windows:  # the channel of each sample's view (the only one for "mean")
            pick = plan[:, 6].view(-1, 1, 1, 1).expand(-1, self.window, self.window, 1)
            teacher = windows["teacher"].gather(-1, pick)
            x = torch.cat([x, teacher.permute(0, 3, 1, 2).float()], dim=1)
        flags = plan[:, 3:6].bool()
        x, planes = apply_views(x, flags), apply_views(planes, flags)
        margin = (self.window - self.crop) // 2
        centre = (..., slice(margin, margin + self.crop), slice(margin, margin + self.crop))
        if self.spatial is not None:
            x, planes = self.spatial(x, planes, params=order.spatial)
        x, planes = x[centre], planes[centre]
        image = x[:, :3] if self.colour is None else self.colour(x[:, :3], params=order.colour)
        batch: dict[str, Any] = {
            "image": (image * 255)
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
            .contiguous(memory_format=torch.channels_last),
            "mask": planes[:, :1].round().to(torch.uint8),
            "roi": planes[:, 1:].round().to(torch.uint8),
            "id": order.ids,
            "index": plan[:, 0],
        }
        if "teacher" in windows:
            batch["teacher"] = x[:, 3:].to(torch.float16)
            batch["teacher_valid"] = windows["teacher_valid"]
        return batch

    def __call__(self, store: ResidentSplit, draws: Sequence[Draw], seed: int) -> dict[str, Any]:
        """The batch of `draws` (see the DataModule's contract), made on this augmenter's device."""
        return self.make(store, self.draw(store, draws, seed))


class Order(NamedTuple):
    """A batch's random choices (`DeviceAugment.draw`): ids, the plan [B, 7] int64 (CPU), kornia parameters."""

    ids: list[str]
    plan: Tensor
    spatial: list | None
    colour: list | None


def _tensors(value: Any) -> Iterator[Tensor]:
    """Every tensor inside nested dicts, lists and tuples (kornia's ParamItems are tuples)."""
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


class DeviceBatches:
    """The endless train stream of a resident split: `sampler`'s batches made by `augment` (see EpochStream).

    With `ahead` > 0 (default on a GPU: AHEAD) a producer thread makes the next `ahead` batches, on
    its own CUDA stream, while the training step runs: making a batch is host-bound (kornia's Python
    and launches, 20-28 ms per batch on an H200 host; BENCHMARKS.md), and the thread overlaps that
    time with the step's instead of adding to it. Every random choice is drawn in the consuming
    thread, in stream order (`DeviceAugment.draw`), so the batches are the same with or without it.
    """

    def __init__(
        self,
        store: ResidentSplit,
        augment: DeviceAugment,
        sampler: EndlessBatches,
        seed: int,
        ahead: int | None = None,
    ):
        self.store, self.augment, self.sampler, self.seed = store, augment, sampler, seed
        self.ahead = (AHEAD if augment.device.type == "cuda" else 0) if ahead is None else ahead

    def _orders(self) -> Iterator[Order]:
        for draws in self.sampler:
            with torch.profiler.record_function("augment_draw"):
                yield self.augment.draw(self.store, draws, self.seed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.ahead == 0:
            for order in self._orders():
                with torch.profiler.record_function("augment"):  # a range of its own in profiles
                    batch = self.augment.make(self.store, order)
                yield batch
        else:
            yield from self._made_ahead()

    def _made_ahead(self) -> Iterator[dict[str, Any]]:
        device = self.augment.device
        cuda = device.type == "cuda"
        side = torch.cuda.Stream(device) if cuda else None
        todo: queue.Queue = queue.Queue()  # (order, event after its draw) or None: stop
        made: queue.Queue = queue.Queue()  # (batch, event after its making, exception)

        def produce() -> None:
            while (job := todo.get()) is not None and not stop.is_set():
                order, drawn = job
                try:
                    with torch.cuda.stream(side) if cuda else nullcontext():
                        if cuda:  # kornia's noise maps were drawn on the consumer's stream
                            side.wait_event(drawn)
                            for tensor in _tensors(order):
                                if tensor.is_cuda:
                                    tensor.record_stream(side)
                        with torch.profiler.record_function("augment"):
                            batch = self.augment.make(self.store, order)
                        done = None
                        if cuda:
                            done = torch.cuda.Event()
                            done.record(side)
                    made.put((batch, done, None))
                except BaseException as error:  # re-raised in the consuming thread
                    made.put((None, None, error))

        def submit(orders: Iterator[Order]) -> bool:
            order = next(orders, None)
            if order is None:
                return False
            drawn = None
            if cuda:
                drawn = torch.cuda.Event()
                drawn.record(torch.cuda.current_stream(device))
            todo.put((order, drawn))
            return True

        stop = threading.Event()  # the stream was closed: skip the batches still queued
        producer = threading.Thread(target=produce, name="device-batches", daemon=True)
        producer.start()
        orders = self._orders()
        try:
            pending = sum(submit(orders) for _ in range(self.ahead))
            while pending:
                batch, done, error = made.get()
                pending -= 1
                if error is not None:
                    raise error
                if cuda:
                    current = torch.cuda.current_stream(device)
                    current.wait_event(done)
                    for tensor in _tensors(batch):
                        if tensor.is_cuda:
                            tensor.record_stream(current)
                pending += submit(orders)
                yield batch
        finally:
            stop.set()
            todo.put(None)
            producer.join()
