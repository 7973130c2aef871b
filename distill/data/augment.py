"""Joint augmentation of image, mask, roi and teacher logits: albumentations 2.0.8 per sample, kornia per batch.

A preset names the D4 views it samples and its transforms as specs (`AffineSpec`, `ElasticSpec`,
`ColourSpec`), each of which builds itself in albumentations (this module, one sample at a time in
DataLoader workers) and in kornia (`distill.data.device_augment`, a whole batch on the training
device), from the same numbers. One sample, in this order:

1. a random square *window* is cut from the image (reflected where it leaves the image): the crop
   plus the margin that the spatial transforms may pull pixels from (`Preset.window_side`), so the
   transforms warp a window rather than the whole image. Which of them run (each by its `p`) is
   drawn first, and the margin covers only those: a sample none of them touches cuts just its crop.
   A teacher map is cut the same way, and with `teacher_views: mean` its cached views are averaged
   on the window, not at full resolution;
2. a discrete D4 view (flip / quarter turn) by name from `distill.views`, so the DataModule can pick
   the cached teacher view that matches it (`teacher_views: match`);
3. the *spatial* transforms (affine, elastic) move image, mask, roi and teacher map together, each
   writing only the centre square that the next one reads (`Preset.sides`, `CentreCroppedAffine`):
   a warp costs its output's area, and the window's margin is cut away after them. When the first
   of them is an affine, steps 1 and 2 go into its matrix instead: it reads the part of the image
   the window covers, and the window is never cut, reflected or turned;
4. the centre `crop_size` square of the window is kept;
5. the *photometric* transforms (brightness/contrast, gamma, CLAHE, hue, noise, blur) change the image alone.

Without a crop size the window is the whole image. Extra albumentations transforms in
`Preset.spatial` (whose reach is unknown) make the spatial step run on the whole image and the crop
a random one after it.

Why two Composes: in albumentations an additional target is typed either "image" or "mask". Typed
"mask", a map is resampled with `mask_interpolation` (nearest by default); typed "image", it gets
bilinear resampling but also every pixel-level transform, which would add noise, gamma and contrast
to teacher logits. So the map is an "image" target of the spatial Compose only (bilinear, and that
Compose holds no pixel-level transform), and the photometric Compose is called with the image alone.
Masks use nearest (`INTER_NEAREST`). Borders are reflected (`BORDER_REFLECT_101`) for every target:
zero padding would put fake "background, very sure" logits of 0 (or fake image edges) at the
border; reflection keeps the image and its teacher map plausible there, and the mask and roi reflect
with them so all stay aligned. OpenCV cannot warp float16, so maps are warped in float32.

Randomness: every call takes a numpy Generator (`sample_rng(seed, draw number)`); the albumentations
Composes draw from it and from one Python Random seeded from it, so a sample's augmentation depends
only on the run's seed and the sample's place in the stream, not on which DataLoader worker makes it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
import numpy.typing as npt
import torch

from distill.errors import ConfigError
from distill.registry import Registry
from distill.views import VIEWS, apply_view, view_matrix

REFLECT = cv2.BORDER_REFLECT_101
D4 = tuple(VIEWS)
INTERPOLATION_MARGIN = 2  # pixels a bilinear sample reads beyond its source point, rounded up
# Every albumentations warp: images and maps bilinear, masks nearest, borders reflected.
WARP = {"interpolation": cv2.INTER_LINEAR, "mask_interpolation": cv2.INTER_NEAREST, "border_mode": REFLECT}


def sample_rng(seed: int, number: int) -> np.random.Generator:
    """The random generator of the `number`-th sample drawn in a run seeded `seed`."""
    return np.random.default_rng([seed, number])


@dataclass(frozen=True)
class AffineSpec:
    """Rotation by up to +-`degrees`, zoom by 1 +- `scale`, shift by up to +-`shift` of the output side, with probability `p`."""

    scale: float
    degrees: float
    shift: float
    p: float

    def source_side(self, side: float, output: int) -> float:
        """Side of the square the transform reads to fill the centre `side` of a window whose output is `output` px.

        A point p of the output comes from R^-1 (p - t) / s: at most (|cos| + |sin|) / s_min times
        (side / 2 + shift * output) from the centre along either axis (quarter turns beyond 45
        degrees are the D4 views' job, so the bound uses min(degrees, 45)).
        """
        theta = math.radians(min(self.degrees, 45.0))
        stretch = (math.cos(theta) + math.sin(theta)) / (1 - self.scale)
        return stretch * (side + 2 * self.shift * output) + 2 * INTERPOLATION_MARGIN

    def albumentations(self, output: int | None, side: int | None = None) -> A.Affine:
        """The transform; `side`: warp only the centre `side` square of its input (CentreCroppedAffine)."""
        shift = {"translate_percent": (-self.shift, self.shift)}
        if output is not None:  # relative to the crop, not to the window the transform sees
            shift = {"translate_px": (-round(self.shift * output), round(self.shift * output))}
        ranges = {"scale": (1 - self.scale, 1 + self.scale), "rotate": (-self.degrees, self.degrees)}
        if side is None:
            return A.Affine(**ranges, p=self.p, **shift, **WARP)
        return CentreCroppedAffine(side, **ranges, p=self.p, **shift, **WARP)

    def kornia(self, output: int, window: int) -> Any:
        import kornia.augmentation as K

        shift = self.shift * output / window  # kornia translates by a fraction of its input's side
        return K.RandomAffine(
            degrees=self.degrees,
            translate=(shift, shift),
            scale=(1 - self.scale, 1 + self.scale),
            padding_mode="reflection",
            p=self.p,
        )


class CentreCroppedAffine(A.Affine):
    """albumentations' Affine that writes only the centre `side` x `side` square of its output.

    A window's transforms only have to fill its centre (the rest is margin they read from), and a
    warp costs its output's area: for a 512 crop under `default` the window is 854 px, 2.8x the
    crop's area. Same parameters and sampling as Affine (its own code); the crop's offset is folded
    into the warp matrix, so each output pixel samples the same source point up to OpenCV's
    1/32-pixel fixed point. Images and masks only (the matrix for boxes is not cropped).

    With `reads_window` (the first transform of a window, `window_transforms`) and called with
    `window=(window side, matrix)`, the inputs are not the window itself but the part of the image it
    covers, and `matrix` (3x3) maps their pixel coordinates to the window's (its offset and D4 view,
    `Augment.__call__`): the warp then reads the image directly, and the window is never cut,
    reflected or turned (OpenCV reflects the border as `cut` does). It always warps, even by the
    identity (albumentations would hand back its input, here not the window).
    """

    reads_window = False

    def __init__(self, side: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.side = side

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        to_window = np.eye(3)
        if self.reads_window and "window" in data:
            side, to_window = data["window"]
            params = {**params, "shape": (side, side)}
        warp = super().get_params_dependent_on_data(params, data)
        height, width = params["shape"][:2]
        to_centre = np.array(
            [
                [1.0, 0.0, -((width - self.side) // 2)],
                [0.0, 1.0, -((height - self.side) // 2)],
                [0.0, 0.0, 1.0],
            ]
        )
        matrix = to_centre @ warp["matrix"] @ to_window
        return {**warp, "matrix": matrix, "output_shape": (self.side, self.side)}

    def apply(
        self, img: np.ndarray, matrix: np.ndarray, output_shape: tuple[int, int], **params: Any
    ) -> np.ndarray:
        return self._warp(img, matrix, output_shape, self.interpolation)

    def apply_to_mask(
        self, mask: np.ndarray, matrix: np.ndarray, output_shape: tuple[int, int], **params: Any
    ) -> np.ndarray:
        return self._warp(mask, matrix, output_shape, self.mask_interpolation)

    def _warp(
        self, array: np.ndarray, matrix: np.ndarray, output_shape: tuple[int, int], interpolation: int
    ) -> np.ndarray:
        height, width = output_shape
        out = cv2.warpAffine(
            array, matrix[:2], (width, height), flags=interpolation, borderMode=self.border_mode
        )
        return out.reshape(height, width, *array.shape[2:])  # (OpenCV drops a trailing channel of 1)


@dataclass(frozen=True)
class ElasticSpec:
    """Elastic deformation: smooth random displacements of at most `alpha` pixels (Gaussian `sigma`), probability `p`."""

    alpha: float
    sigma: float
    p: float

    def source_side(self, side: float, output: int) -> float:
        return side + 2 * math.ceil(self.alpha) + 2 * INTERPOLATION_MARGIN

    def albumentations(self, output: int | None, side: int | None = None) -> A.ElasticTransform:
        """The transform; it keeps its input's size, so `side` (its output's, in a window) is not used."""
        return A.ElasticTransform(alpha=self.alpha, sigma=self.sigma, p=self.p, **WARP)

    def kornia(self, output: int, window: int) -> Any:
        import kornia.augmentation as K

        size = 2 * math.ceil(3 * self.sigma) + 1
        alpha = self.alpha / (window / 2)  # kornia displaces in [-1, 1] coordinates of its input
        return K.RandomElasticTransform(
            kernel_size=(size, size),
            sigma=(self.sigma, self.sigma),
            alpha=(alpha, alpha),
            padding_mode="reflection",
            p=self.p,
        )


@dataclass(frozen=True)
class ColourSpec:
    """Colour and texture changes of a fundus/angiogram camera; `strength` scales every range, `p` every probability."""

    strength: float
    p: float

    def albumentations(self) -> list[A.ImageOnlyTransform]:
        s, p = self.strength, self.p
        return [
            A.RandomBrightnessContrast(brightness_limit=0.2 * s, contrast_limit=0.2 * s, p=p),
            A.RandomGamma(gamma_limit=(100 - 20 * s, 100 + 20 * s), p=0.6 * p),
            A.CLAHE(clip_limit=(1.0, 1.0 + 2.0 * s), tile_grid_size=(8, 8), p=0.2 * p),
            A.HueSaturationValue(
                hue_shift_limit=5 * s, sat_shift_limit=10 * s, val_shift_limit=5 * s, p=0.4 * p
            ),
            A.GaussNoise(std_range=(0.01 * s, 0.04 * s), p=0.4 * p),
            A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.3, 0.3 + 0.5 * s), p=0.2 * p),
        ]

    def kornia(self) -> list[Any]:
        """The same changes in kornia (images in [0, 1]); hue and saturation as in OpenCV's uint8 HSV units."""
        import kornia.augmentation as K

        s, p = self.strength, self.p
        return [
            K.RandomBrightness(brightness=(1 - 0.2 * s, 1 + 0.2 * s), p=p),
            K.RandomContrast(contrast=(1 - 0.2 * s, 1 + 0.2 * s), p=p),
            K.RandomGamma(gamma=(1 - 0.2 * s, 1 + 0.2 * s), p=0.6 * p),
            K.RandomClahe(clip_limit=(1.0, 1.0 + 2.0 * s), grid_size=(8, 8), p=0.2 * p),
            K.ColorJiggle(saturation=10 * s / 255, hue=5 * s / 180, p=0.4 * p),
            K.RandomGaussianNoise(std=0.025 * s, p=0.4 * p),
            K.RandomGaussianBlur(kernel_size=(3, 3), sigma=(0.3, 0.3 + 0.5 * s), p=0.2 * p),
        ]


GeometrySpec = AffineSpec | ElasticSpec


@dataclass(frozen=True)
class Preset:
    """What one augmentation strength means: the D4 views it samples and its transforms.

    `geometry` (applied in order) and `colour` build themselves for both paths. `spatial` and
    `photometric` take any further albumentations transforms, for the DataLoader-worker path only;
    spatial ones there make the spatial step see the whole image (their reach is unknown).
    """

    views: tuple[str, ...]
    geometry: tuple[GeometrySpec, ...] = ()
    colour: ColourSpec | None = None
    spatial: tuple[A.BasicTransform, ...] = ()
    photometric: tuple[A.ImageOnlyTransform, ...] = ()

    def window_side(self, crop_size: int) -> int | None:
        """Side of the window cut before the spatial transforms for a `crop_size` output; None: the whole image."""
        return None if self.spatial else self.sides(crop_size)[0]

    def sides(self, crop_size: int) -> list[int]:
        """[the window, what geometry[0] must output, ..., what geometry[-1] must output (crop_size)].

        Each is the square the next transform reads to fill its own (`source_side`), rounded up to
        an even margin around the crop so that every centre lies on whole pixels.
        """
        sides = [crop_size]
        for spec in reversed(self.geometry):
            side = math.ceil(spec.source_side(sides[0], crop_size))
            sides.insert(0, side + (side - crop_size) % 2)
        return sides


PRESETS = Registry("augmentation preset")


def register_preset(name: str) -> Callable[[Callable[[], Preset]], Callable[[], Preset]]:
    return PRESETS.register(name)


def list_presets() -> list[str]:
    return sorted(PRESETS)


@register_preset("none")
def preset_none() -> Preset:
    """No augmentation (crops only, when a crop size is set): ablations and debugging."""
    return Preset(views=("identity",))


@register_preset("light")
def preset_light() -> Preset:
    """D4 views and mild colour changes, no resampling: the teacher map is never interpolated."""
    return Preset(views=D4, colour=ColourSpec(strength=0.5, p=0.5))


@register_preset("default")
def preset_default() -> Preset:
    """D4 views, a gentle affine (thin vessels survive a +-15% zoom) and camera-like colour changes."""
    return Preset(
        views=D4,
        geometry=(AffineSpec(scale=0.15, degrees=20, shift=0.05, p=0.5),),
        colour=ColourSpec(strength=1.0, p=0.5),
    )


@register_preset("strong")
def preset_strong() -> Preset:
    """Default plus elastic deformation and wider ranges, for small datasets."""
    return Preset(
        views=D4,
        geometry=(
            AffineSpec(scale=0.25, degrees=45, shift=0.1, p=0.7),
            ElasticSpec(alpha=30, sigma=6, p=0.3),
        ),
        colour=ColourSpec(strength=1.5, p=0.7),
    )


Window = tuple[int, int, int]  # top, left, side: a square of an image; the parts outside it are reflected
OPENCV_DTYPES = frozenset(map(np.dtype, ("u1", "i1", "u2", "i2", "i4", "f2", "f4", "f8")))  # cv2's depths


def widened(window: Window, side: int) -> Window:
    """The square of `side` px centred on the square `window` (sides of the same parity)."""
    top, left, inner = window
    margin = (side - inner) // 2
    return top - margin, left - margin, side


def reflect(positions: np.ndarray, size: int) -> np.ndarray:
    """Fold positions into [0, size) by reflection without repeating the edge (BORDER_REFLECT_101)."""
    period = max(2 * (size - 1), 1)
    positions = np.remainder(positions, period)
    return np.where(positions >= size, period - positions, positions)


def covered(window: Window, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The rows and columns of an image of `shape` that `window` covers.

    Where the window leaves the image, these reach the image's border, and the window's reflected part
    mirrors them about that border: what a warp with BORDER_REFLECT_101 reads from them is what it reads
    from `cut(image, window)`. Along an axis where the window leaves the image on one side only, it
    reaches out by at most its margin, less than the part it covers (the crop, inside the image, and
    the margin on the other side); where it leaves on both, it covers the whole axis and OpenCV
    reflects as often as `cut`.
    """
    top, left, side = window
    return slice(max(top, 0), min(top + side, shape[0])), slice(max(left, 0), min(left + side, shape[1]))


def cut(array: np.ndarray, window: Window | None) -> np.ndarray:
    """The `window` of an HxW[xC] array (a view when it lies inside), reflected (BORDER_REFLECT_101) outside it."""
    if window is None:
        return array
    top, left, side = window
    height, width = array.shape[:2]
    rows, cols = covered(window, array.shape)
    pad = ((rows.start - top, top + side - rows.stop), (cols.start - left, left + side - cols.stop))
    if not any(any(p) for p in pad):
        return array[rows, cols]
    inside = array[rows, cols]
    if all(
        p < n
        for p, n in zip((*pad[0], *pad[1]), (*[inside.shape[0]] * 2, *[inside.shape[1]] * 2), strict=True)
    ):
        # The part inside touches the image border it is reflected about: mirroring it is mirroring the
        # image. OpenCV's border is numpy's pad(mode="reflect") bit for bit, ~6x faster on HxWx3 uint8.
        if array.ndim > 3 or not array.dtype.isnative or array.dtype not in OPENCV_DTYPES:
            return np.pad(inside, pad + ((0, 0),) * (array.ndim - 2), mode="reflect")
        (up, down), (before, after) = pad
        padded = cv2.copyMakeBorder(inside, up, down, before, after, cv2.BORDER_REFLECT_101)
        return padded.reshape(side, side, *array.shape[2:])  # (OpenCV drops a trailing channel of 1)
    return array[
        reflect(np.arange(top, top + side), height)[:, None], reflect(np.arange(left, left + side), width)
    ]


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor sharing `array`'s memory, to be read only (cache maps are read-only memory maps)."""
    if any(step < 0 for step in array.strides):  # a flipped view: torch takes positive strides only
        array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not writable": nothing here writes to it
        return torch.from_numpy(array)


def converted(array: np.ndarray, dtype: npt.DTypeLike) -> np.ndarray:
    """A contiguous copy of `array` as `dtype`, converted by torch.

    numpy converts float16 one element at a time: on one core, an 854² teacher window took 1.29 ms
    to float32 and a 512² crop 0.69 ms back, torch 0.11 and 0.03 ms (BENCHMARKS.md). Both round to
    nearest even: the values are numpy's bit for bit.
    """
    out = np.empty(array.shape, dtype)
    torch.from_numpy(out).copy_(_tensor(array))
    return out


def mean_map(maps: Sequence[np.ndarray]) -> np.ndarray:
    """float16 mean of same-shape logit maps (summed in float32, in order); the one map itself when there is one."""
    if len(maps) == 1:
        return maps[0]
    total = torch.zeros(maps[0].shape, dtype=torch.float32)
    for logits in maps:
        total += _tensor(logits)
    return (total / len(maps)).half().numpy()


def _seed(compose: A.Compose, rng: np.random.Generator) -> None:
    """Let `compose` and all its transforms draw from the sample's generators: `rng` and a Python Random
    seeded from it. One pair per sample: a pair per transform cost ~10% of a worker's 256 crop."""
    compose.set_random_state(rng, random.Random(int(rng.integers(2**31))))


def window_transforms(preset: Preset, crop_size: int) -> list[A.BasicTransform]:
    """The preset's geometry for a window (`Preset.sides`), each transform always applied (whether it
    runs is drawn before the window is cut, `Augment.geometry_for`): each reads and writes only the
    centre the next one needs, so none warps margin that is cut away after it."""
    sides = preset.sides(crop_size)
    transforms: list[A.BasicTransform] = []
    for spec, reads, writes in zip(preset.geometry, sides[:-1], sides[1:], strict=True):
        if transforms:  # the transform before may output more (elastic keeps its input's size)
            transforms.append(A.CenterCrop(reads, reads))
        transform = spec.albumentations(crop_size, writes)
        transform.p = 1.0
        transforms.append(transform)
    if transforms and isinstance(transforms[0], CentreCroppedAffine):
        transforms[0].reads_window = True  # only the first: the window's matrix maps the image to its input
    return transforms


class Augment:
    """Callable that augments one sample; built by `build_augment` (see the module docstring for the steps)."""

    def __init__(self, preset: Preset, crop_size: int | None = None):
        self.preset = preset
        self.views = preset.views
        self.crop_size = crop_size
        self.window = None if crop_size is None else preset.window_side(crop_size)
        targets = {"roi": "mask", "teacher": "image"}
        # Without a window: every spatial transform on the whole image, each by its own p.
        self.spatial: A.Compose | None = None
        # With a window: per set of geometry transforms that run, the window they need and them.
        self.windows: dict[tuple[bool, ...], tuple[int, A.Compose]] = {}
        if self.window is None:
            self.spatial = A.Compose(
                [spec.albumentations(crop_size) for spec in preset.geometry] + list(preset.spatial),
                additional_targets=targets,
            )
        else:
            for runs in itertools.product((False, True), repeat=len(preset.geometry)):
                chosen = dataclasses.replace(
                    preset, geometry=tuple(itertools.compress(preset.geometry, runs))
                )
                transforms = window_transforms(chosen, crop_size)
                self.windows[runs] = (
                    chosen.sides(crop_size)[0],
                    A.Compose(transforms, additional_targets=targets),
                )
        colour = preset.colour.albumentations() if preset.colour is not None else []
        self.photometric = A.Compose(colour + list(preset.photometric))

    def geometry_for(self, rng: np.random.Generator) -> tuple[int, A.Compose]:
        """Which geometry transforms run for a sample (each by its `p`), as (the window side they need,
        their Compose): a sample whose affine does not run cuts, reflects and turns only its crop."""
        runs = tuple(bool(rng.random() < spec.p) for spec in self.preset.geometry)
        return self.windows[runs]

    def sample_view(self, rng: np.random.Generator, among: Iterable[str] | None = None) -> str:
        """A random D4 view of this preset, restricted to `among` (e.g. the views a cache holds)."""
        allowed = [v for v in self.views if among is None or v in among]
        if not allowed:
            raise ConfigError(
                f"augment: none of the preset's views {list(self.views)} is in {sorted(among or [])}; "
                "cache the identity view or choose another preset"
            )
        return allowed[rng.integers(len(allowed))]

    def sample_window(
        self, shape: tuple[int, int], rng: np.random.Generator, side: int | None = None
    ) -> Window | None:
        """A random crop of an HxW image widened to the window around it (`side`, default this preset's).

        The crop lies inside the image when the image is at least as large, else the image lies
        inside the crop; None when there is no crop size (the whole image is used).
        """
        if self.crop_size is None:
            return None
        crop = self.crop_size
        top, left = (int(rng.integers(min(0, n - crop), max(0, n - crop) + 1)) for n in shape)
        return widened((top, left, crop), side or self.window or crop)

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        roi: np.ndarray | None = None,
        teacher: np.ndarray | Sequence[np.ndarray] | None = None,
        view: str | None = None,
        rng: np.random.Generator | int | None = None,
    ) -> dict[str, np.ndarray | str]:
        """Augment one sample. Returns {"image", "mask", "roi", "view"} (+ "teacher" when given).

        image HxWx3 uint8, mask and roi HxW uint8 (roi None: every pixel counts, and the sample's roi is
        all ones, not cut or warped unless the preset's extra transforms may fill pixels, e.g. a
        constant border); teacher: HxW float16/float32 logits in the same
        (original) orientation as the image, or a sequence of such maps (cached views) that are cut
        to the window and averaged there. `view` forces the D4 view (else one is sampled); `rng`
        (a Generator or a seed) draws everything random.
        """
        rng = np.random.default_rng(rng)
        view = self.sample_view(rng) if view is None else view
        if roi is None and self.preset.spatial:
            # Extra transforms may fill pixels (e.g. a constant border): the roi marks them as not counting.
            roi = np.ones(mask.shape, np.uint8)
        window, spatial = None, self.spatial
        if self.window is not None:
            crop = self.sample_window(mask.shape, rng, self.crop_size)  # where the crop lies
            side, spatial = self.geometry_for(rng)
            window = widened(crop, side)
        # A first warp that is an affine reads the image itself: the window's offset and view go into its matrix.
        folded = window is not None and getattr((spatial.transforms or [None])[0], "reads_window", False)
        if folded:
            rows, cols = covered(window, mask.shape)  # image, mask, roi and teacher share it
        part = (lambda a: a[rows, cols]) if folded else (lambda a: cut(a, window))
        data = {"image": part(image), "mask": part(mask)} | ({} if roi is None else {"roi": part(roi)})
        if teacher is not None:
            maps = [teacher] if isinstance(teacher, np.ndarray) else teacher
            dtype = maps[0].dtype
            data["teacher"] = mean_map([part(m) for m in maps])
            if spatial.transforms:
                data["teacher"] = converted(data["teacher"], np.float32)
        if folded:
            offset = np.array([[1, 0, cols.start - window[1]], [0, 1, rows.start - window[0]], [0, 0, 1]])
            data["window"] = (window[2], view_matrix(view, window[2]) @ offset)
        else:
            data = {key: apply_view(value, view) for key, value in data.items()}
        if spatial.transforms:
            _seed(spatial, rng)
            data = spatial(**data)
            data.pop("window", None)
        if self.crop_size is not None:
            size = data["mask"].shape
            crop = (
                self.sample_window(size, rng, self.crop_size)
                if self.window is None
                else ((size[0] - self.crop_size) // 2, (size[1] - self.crop_size) // 2, self.crop_size)
            )
            data = {key: np.ascontiguousarray(cut(value, crop)) for key, value in data.items()}
        if self.photometric.transforms:
            _seed(self.photometric, rng)
            data["image"] = self.photometric(image=data["image"])["image"]
        if teacher is not None:
            data["teacher"] = converted(data["teacher"], dtype)
        if roi is None:
            data["roi"] = np.ones(data["mask"].shape, np.uint8)
        return {**data, "view": view}


def build_augment(preset: str = "default", crop_size: int | None = None) -> Augment:
    """Build the augmentation named `preset` ("none", "light", "default", "strong").

    `crop_size` crops a random native-resolution square (reflect-padded when the image is smaller),
    so that images of different sizes batch together in training.
    """
    if preset not in PRESETS:
        raise ConfigError(f"data.augment={preset!r} is unknown; choose one of {list_presets()}")
    if crop_size is not None and crop_size < 1:
        raise ConfigError(f"data.crop_size={crop_size} must be a positive number of pixels (or null)")
    return Augment(PRESETS[preset](), crop_size=crop_size)
