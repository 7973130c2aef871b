"""Decode any image file (or embedded bytes) the readers meet into the one layout they all yield.

Every file is read as its author saw it in a viewer or annotation tool:

- EXIF orientation (all 8 values) is applied on decoding (Pillow's `ImageOps.exif_transpose`), for
  images, masks and ROIs alike, so pixels, sizes and annotations agree with what LabelMe showed.
- Images become HxWx3 uint8 RGB: grayscale is repeated over the channels, alpha is dropped and
  palettes are expanded. Grayscale stored in 16 bits is scaled by the range its data uses: the
  smallest of 8, 10, 12, 14 or 16 bits that holds its largest value (12-bit X-ray data in a 16-bit
  TIFF is scaled by 255/4095, not 1/257, which would leave it near black), or by a fixed `bit_depth`.
  16-bit RGB is what Pillow makes of it (the high byte of each channel).
- Masks and ROIs become HxW bool by brightness, not by stored number: a pixel is set when its
  brightest channel exceeds half the image's brightest value, transparent pixels being background
  (as a viewer composites them onto black). A palette mask is read by its colours
  (a [white, black] palette, as `quantize(2)` writes, is not inverted), 0/1 and 0/255 masks read the
  same, and JPEG noise around edges is cut at mid-range rather than widening every vessel.

A file that does not decode, fully, is a DatasetError naming it: never a partial or zero image.
Decoding rules a user should know of (a bit depth detected, a lossy or many-valued mask) are a
`DecodeWarning`, whose text names no file so that a long run prints each kind once;
`python -m distill.data check` lists every file by its `source`.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from distill.errors import ConfigError, DatasetError, DatasetWarning

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".webp")

# Modes PIL reads 16/32-bit integer data into; their range is detected (see `data_bits`).
WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
CONTAINER_BITS = (8, 10, 12, 14, 16)  # the depths 16-bit grayscale data is recognised as
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class DecodeWarning(DatasetWarning):
    """A file was read by a rule its author may not expect; `source` is the file."""

    def __init__(self, message: str, source: Path):
        super().__init__(message)
        self.source = source


def open_image(source: Path, data: bytes | None = None) -> Image.Image:
    """Open and fully decode `source` (or `data`, the bytes that stand for it), upright by its EXIF orientation."""
    try:
        image = Image.open(io.BytesIO(data) if data is not None else source)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except FileNotFoundError:
        raise DatasetError(source, "image file not found") from None
    except UnidentifiedImageError:
        raise DatasetError(source, "not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise DatasetError(source, f"image cannot be decoded ({error}); it may be truncated") from None
    return image


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 = upright) of an opened image."""
    return int(image.getexif().get(ExifTags.Base.Orientation, 1))


def image_size(source: Path) -> tuple[int, int] | None:
    """Upright (height, width) from the file header alone, or None when it does not read (load will say why)."""
    try:
        with Image.open(source) as image:
            swap = orientation(image) in TRANSPOSED_ORIENTATIONS
            return (image.width, image.height) if swap else (image.height, image.width)
    except (OSError, ValueError, SyntaxError):
        return None


def decode_facts(source: Path, data: bytes | None = None, bit_depth: int | None = None) -> dict[str, Any]:
    """What, besides the file's bytes, decides its pixels: a non-upright orientation, a wide grayscale mode
    (and the bit_depth it is read with). Empty for most files, so content hashes made before these
    rules existed still hold for the files the rules do not change."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else source) as image:
            facts: dict[str, Any] = {}
            if orientation(image) != 1:
                facts["orientation"] = orientation(image)
            if image.mode in WIDE_INTEGER_MODES:
                facts["wide"] = bit_depth or "detected"
            return facts
    except (OSError, ValueError, SyntaxError):
        return {}


def check_bit_depth(bit_depth: Any) -> int | None:
    """The `bit_depth` option (reader option, predict --bit-depth) checked: None, or the bits 1-16."""
    if bit_depth is not None and (type(bit_depth) is not int or not 1 <= bit_depth <= 16):
        raise ConfigError(
            f"bit_depth={bit_depth!r}: give the bits 16-bit grayscale images hold (1-16, e.g. 12), "
            "or leave it unset to detect each image's depth"
        )
    return bit_depth


def data_bits(largest: int) -> int:
    """The depth 16-bit grayscale data uses: the smallest of CONTAINER_BITS holding `largest` (16 when none)."""
    return next((bits for bits in CONTAINER_BITS if largest < 1 << bits), CONTAINER_BITS[-1])


def wide_to_uint8(image: Image.Image, source: Path, bit_depth: int | None) -> np.ndarray:
    """HxW uint8 of a 16/32-bit grayscale image, scaled by the range its data uses (see the module doc)."""
    wide = np.asarray(image)
    largest = int(wide.max())
    if bit_depth is not None and largest >= 1 << bit_depth:
        raise DatasetError(
            source,
            f"has values up to {largest}, more than bit_depth={bit_depth} allows ({(1 << bit_depth) - 1})",
            "raise bit_depth, or leave it unset to detect each image's depth",
        )
    bits = bit_depth or data_bits(largest)
    if bit_depth is None and bits < 16:
        message = (
            f"16-bit grayscale images whose values stay below {1 << bits} are read as {bits}-bit data "
            f"(scaled by 255/{(1 << bits) - 1}, not 1/257, which would leave them near black); the "
            "reader option bit_depth=N reads every image with one fixed depth instead"
        )
        warnings.warn(DecodeWarning(message, source), stacklevel=4)
    full = (1 << bits) - 1
    return np.round(np.clip(wide, 0, full) * (255.0 / full)).astype(np.uint8)


def to_rgb(image: Image.Image, source: Path, bit_depth: int | None = None) -> np.ndarray:
    """A decoded PIL image in any mode -> HxWx3 uint8 RGB."""
    if image.mode in WIDE_INTEGER_MODES:
        gray = wide_to_uint8(image, source, bit_depth)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise DatasetError(source, "floating-point images are not supported", "save it as 8- or 16-bit PNG")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    # A copy: np.asarray of a PIL image is a read-only view, which torch.from_numpy warns about.
    return np.array(image.convert("RGB"), dtype=np.uint8, order="C")


def brightness(image: Image.Image) -> np.ndarray:
    """HxW brightness of a mask image: grayscale as stored, colour (palette too) by its brightest channel."""
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode in ("LA", "RGBA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # What a viewer shows: fully transparent pixels are background, whatever colour they store.
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, image.convert("RGBA")).convert("RGB")
    elif image.mode not in ("L", "F", *WIDE_INTEGER_MODES):
        image = image.convert("RGB")  # palettes by colour, not index
    array = np.asarray(image)
    return array.max(axis=2) if array.ndim == 3 else array


def to_binary(image: Image.Image, source: Path) -> np.ndarray:
    """A decoded mask image -> HxW bool: set where brighter than half its brightest value (module doc)."""
    values = brightness(image)
    top, bottom = values.max(), values.min()
    binary = values > top / 2
    if image.format == "JPEG":
        note = "JPEG masks and ROIs: lossy compression leaves grey levels around every edge"
    elif not ((values == top) | (values == bottom)).all():
        note = "masks and ROIs with more than two grey levels (anti-aliased edges, or a label map?)"
    else:
        return binary
    warnings.warn(
        DecodeWarning(f"{note}: read as set where brighter than half the brightest value", source),
        stacklevel=4,
    )
    return binary


def read_image(source: Path, data: bytes | None = None, bit_depth: int | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of an image file (or of `data`, embedded bytes that belong to `source`).

    `bit_depth` fixes the depth 16-bit grayscale data is read with (default: detected per image).
    """
    return to_rgb(open_image(source, data), source, bit_depth)


def read_binary_mask(source: Path, data: bytes | None = None) -> np.ndarray:
    """HxW bool mask of an image file (or of `data`, bytes that belong to `source`): vessel masks, ROIs."""
    return to_binary(open_image(source, data), source)
