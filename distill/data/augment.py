"""Joint augmentation of image, mask, roi and a float teacher map (albumentations 2.0.8).

Three stages, in this order:

1. a discrete D4 view (flip / quarter turn) chosen by name from `distill.views`, so the DataModule can
   pick the cached teacher view that matches it ("match" mode) and apply it with `apply_view`;
2. a *spatial* `A.Compose` (affine, elastic, crop) that moves image, mask, roi and teacher map
   together with the same random parameters;
3. a *photometric* `A.Compose` (brightness/contrast, gamma, CLAHE, hue, noise, blur) on the image alone.

Why two Composes: in albumentations an additional target is typed either "image" or "mask". Typed
"mask", a map is resampled with `mask_interpolation` (nearest by default); typed "image", it gets
bilinear resampling but also every pixel-level transform, which would add noise, gamma and contrast
to teacher logits. So the map is an "image" target of the spatial Compose only (bilinear, and that
Compose holds no pixel-level transform), and the photometric Compose is called with the image alone.
Masks use nearest (`INTER_NEAREST`, exact pixel-centre sampling where a resize happens).
Borders are reflected (`BORDER_REFLECT_101`) for every target: zero padding would put fake
"background, very sure" logits of 0 (or fake image edges) at the border; reflection keeps the image
and its teacher map plausible there, and the mask and roi reflect with them so all stay aligned.
OpenCV cannot warp float16, so a float16 map is converted to float32 before and back after.
Albumentations 2.0.8 keeps its own random generators and does not reseed them in DataLoader workers:
call `Augment.reseed` from the worker init function, or every worker repeats the same augmentations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np

from distill.errors import ConfigError
from distill.registry import Registry
from distill.views import VIEWS, apply_view

REFLECT = cv2.BORDER_REFLECT_101
D4 = tuple(VIEWS)


@dataclass(frozen=True)
class Preset:
    """What one augmentation strength means: the D4 views it samples and its two transform lists."""

    views: tuple[str, ...]
    spatial: list[A.BasicTransform]
    photometric: list[A.ImageOnlyTransform]


PRESETS = Registry("augmentation preset")


def register_preset(name: str) -> Callable[[Callable[[], Preset]], Callable[[], Preset]]:
    return PRESETS.register(name)


def list_presets() -> list[str]:
    return sorted(PRESETS)


def affine(scale: float, degrees: float, shift: float, p: float) -> A.Affine:
    return A.Affine(
        scale=(1 - scale, 1 + scale),
        rotate=(-degrees, degrees),
        translate_percent=(-shift, shift),
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=REFLECT,
        p=p,
    )


def photometric(strength: float, p: float) -> list[A.ImageOnlyTransform]:
    """Colour and texture changes of a fundus/angiogram camera; `strength` scales every range."""
    s = strength
    return [
        A.RandomBrightnessContrast(brightness_limit=0.2 * s, contrast_limit=0.2 * s, p=p),
        A.RandomGamma(gamma_limit=(100 - 20 * s, 100 + 20 * s), p=0.6 * p),
        A.CLAHE(clip_limit=(1.0, 1.0 + 2.0 * s), tile_grid_size=(8, 8), p=0.2 * p),
        A.HueSaturationValue(hue_shift_limit=5 * s, sat_shift_limit=10 * s, val_shift_limit=5 * s, p=0.4 * p),
        A.GaussNoise(std_range=(0.01 * s, 0.04 * s), p=0.4 * p),
        A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.3, 0.3 + 0.5 * s), p=0.2 * p),
    ]


@register_preset("none")
def preset_none() -> Preset:
    """No augmentation (crops only, when a crop size is set): ablations and debugging."""
    return Preset(views=("identity",), spatial=[], photometric=[])


@register_preset("light")
def preset_light() -> Preset:
    """D4 views and mild colour changes, no resampling: the teacher map is never interpolated."""
    return Preset(views=D4, spatial=[], photometric=photometric(strength=0.5, p=0.5))


@register_preset("default")
def preset_default() -> Preset:
    """D4 views, a gentle affine (thin vessels survive a +-15% zoom) and camera-like colour changes."""
    return Preset(
        views=D4,
        spatial=[affine(scale=0.15, degrees=20, shift=0.05, p=0.5)],
        photometric=photometric(strength=1.0, p=0.5),
    )


@register_preset("strong")
def preset_strong() -> Preset:
    """Default plus elastic deformation and wider ranges, for small datasets."""
    elastic = A.ElasticTransform(
        alpha=30,
        sigma=6,
        interpolation=cv2.INTER_LINEAR,
        mask_interpolation=cv2.INTER_NEAREST,
        border_mode=REFLECT,
        p=0.3,
    )
    return Preset(
        views=D4,
        spatial=[affine(scale=0.25, degrees=45, shift=0.1, p=0.7), elastic],
        photometric=photometric(strength=1.5, p=0.7),
    )


class Augment:
    """Callable that augments one sample; built by `build_augment`.

    `views` are the D4 views it may sample; `spatial` and `photometric` are the two Composes (see the
    module docstring for why they are separate).
    """

    def __init__(self, preset: Preset, crop_size: int | None = None, seed: int | None = None):
        spatial = list(preset.spatial)
        if crop_size is not None:
            # Native-resolution crops: rescaling whole images would blur 1-pixel vessels away.
            spatial.append(
                A.RandomCrop(height=crop_size, width=crop_size, pad_if_needed=True, border_mode=REFLECT, p=1)
            )
        self.views = preset.views
        self.crop_size = crop_size
        self.spatial = A.Compose(spatial, additional_targets={"roi": "mask", "teacher": "image"})
        self.photometric = A.Compose(preset.photometric)
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Give this copy its own random streams (call once per DataLoader worker)."""
        self.rng = np.random.default_rng(seed)
        seeds = self.rng.integers(0, 2**31, size=2)
        self.spatial.set_random_seed(int(seeds[0]))
        self.photometric.set_random_seed(int(seeds[1]))

    def sample_view(self, among: Iterable[str] | None = None) -> str:
        """A random D4 view of this preset, restricted to `among` (e.g. the views a cache holds)."""
        allowed = [v for v in self.views if among is None or v in among]
        if not allowed:
            raise ConfigError(
                f"augment: none of the preset's views {list(self.views)} is in {sorted(among or [])}; "
                "cache the identity view or choose another preset"
            )
        return allowed[self.rng.integers(len(allowed))]

    def __call__(
        self,
        image: np.ndarray,
        mask: np.ndarray,
        roi: np.ndarray,
        teacher: np.ndarray | None = None,
        view: str | None = None,
    ) -> dict[str, np.ndarray | str]:
        """Augment one sample. Returns {"image", "mask", "roi", "view"} (+ "teacher" when given).

        image HxWx3 uint8, mask and roi HxW uint8, teacher HxW or HxWxV float32/float16 logits in the
        same (original) orientation as the image. `view` forces the D4 view (else one is sampled).
        """
        view = self.sample_view() if view is None else view
        data = {"image": image, "mask": mask, "roi": roi}
        if teacher is not None:
            data["teacher"] = teacher.astype(np.float32, copy=False)
        data = {key: apply_view(value, view) for key, value in data.items()}
        if self.spatial.transforms:
            data = self.spatial(**data)
        if self.photometric.transforms:
            data["image"] = self.photometric(image=data["image"])["image"]
        if teacher is not None:
            data["teacher"] = np.ascontiguousarray(data["teacher"], dtype=teacher.dtype)
        return {**data, "view": view}


def build_augment(preset: str = "default", crop_size: int | None = None, seed: int | None = None) -> Augment:
    """Build the augmentation named `preset` ("none", "light", "default", "strong").

    `crop_size` adds a random native-resolution square crop (reflect-padded when the image is smaller),
    so that images of different sizes batch together in training.
    """
    if preset not in PRESETS:
        raise ConfigError(f"data.augment={preset!r} is unknown; choose one of {list_presets()}")
    if crop_size is not None and crop_size < 1:
        raise ConfigError(f"data.crop_size={crop_size} must be a positive number of pixels (or null)")
    return Augment(PRESETS[preset](), crop_size=crop_size, seed=seed)
