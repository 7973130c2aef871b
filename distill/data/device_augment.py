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

kornia samples the per-sample parameters of its transforms (angles, factors) on the CPU and copies
them without a host sync; the two whose parameters are whole maps (elastic displacements, noise)
sample on the device. Both generators are seeded per batch from its first sample's generator, so a
run is repeatable.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import kornia.augmentation as K
import numpy as np
import torch
from kornia.constants import DataKey
from torch import Tensor

from distill.data.augment import Augment, sample_rng
from distill.data.record import Record
from distill.data.sampling import Draw, EndlessBatches
from distill.errors import ConfigError

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

    def __call__(self, store: ResidentSplit, draws: Sequence[Draw], seed: int) -> dict[str, Any]:
        """The batch of `draws` (see the DataModule's contract), made on this augmenter's device."""
        plan, batch_seed = self.plan(store, draws, seed)
        plan = _to(plan, store.device)
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
        with seeded(batch_seed, self.device):
            if self.spatial is not None:
                x, planes = self.spatial(x, planes)
            x, planes = x[centre], planes[centre]
            image = x[:, :3] if self.colour is None else self.colour(x[:, :3])
        index = plan[:, 0]
        batch: dict[str, Any] = {
            "image": (image * 255)
            .round()
            .clamp(0, 255)
            .to(torch.uint8)
            .contiguous(memory_format=torch.channels_last),
            "mask": planes[:, :1].round().to(torch.uint8),
            "roi": planes[:, 1:].round().to(torch.uint8),
            "id": [store.ids[draw.index] for draw in draws],
            "index": index,
        }
        if "teacher" in windows:
            batch["teacher"] = x[:, 3:].to(torch.float16)
            batch["teacher_valid"] = windows["teacher_valid"]
        return batch


class DeviceBatches:
    """The endless train stream of a resident split: `sampler`'s batches made by `augment` (see EpochStream)."""

    def __init__(self, store: ResidentSplit, augment: DeviceAugment, sampler: EndlessBatches, seed: int):
        self.store, self.augment, self.sampler, self.seed = store, augment, sampler, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for draws in self.sampler:
            with torch.profiler.record_function("augment"):  # a range of its own in profiles
                batch = self.augment(self.store, draws, self.seed)
            yield batch
