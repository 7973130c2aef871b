"""Decode any image file (or embedded bytes) the readers meet into the one layout they all yield.

Images become HxWx3 uint8 RGB whatever they were stored as: grayscale is repeated over the channels,
alpha is dropped, palettes are expanded, and 16-bit data is scaled by its full range (v / 257), so
that the same picture saved at 8 or 16 bits gives the same pixels. Masks become HxW bool (nonzero =
set). A file that does not decode, fully, is a DatasetError naming it: never a partial or zero image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from distill.errors import DatasetError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", ".pgm", ".webp")

# Modes PIL reads 16/32-bit integer data into; all are scaled from the 16-bit range.
WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def open_image(source: Path, data: bytes | None = None) -> Image.Image:
    """Open and fully decode `source` (or `data`, the bytes that stand for it), so truncation shows here."""
    try:
        image = Image.open(io.BytesIO(data) if data is not None else source)
        image.load()
    except FileNotFoundError:
        raise DatasetError(source, "image file not found") from None
    except UnidentifiedImageError:
        raise DatasetError(source, "not a readable image (unknown or corrupt format)") from None
    except (OSError, ValueError, SyntaxError) as error:
        raise DatasetError(source, f"image cannot be decoded ({error}); it may be truncated") from None
    return image


def image_size(source: Path) -> tuple[int, int] | None:
    """(height, width) from the file header alone, or None when the header does not read (load will say why)."""
    try:
        with Image.open(source) as image:
            return image.height, image.width
    except (OSError, ValueError, SyntaxError):
        return None


def to_rgb(image: Image.Image, source: Path) -> np.ndarray:
    """A decoded PIL image in any mode -> HxWx3 uint8 RGB."""
    if image.mode in WIDE_INTEGER_MODES:
        wide = np.asarray(image, dtype=np.int64)
        gray = np.round(np.clip(wide, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise DatasetError(source, "floating-point images are not supported", "save it as 8- or 16-bit PNG")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))


def to_binary(image: Image.Image) -> np.ndarray:
    """A decoded mask image -> HxW bool, nonzero = set. Colour masks count any colour channel; alpha is ignored."""
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    array = np.asarray(image)
    return array.any(axis=2) if array.ndim == 3 else array != 0


def read_image(source: Path, data: bytes | None = None) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of an image file (or of `data`, embedded bytes that belong to `source`)."""
    return to_rgb(open_image(source, data), source)


def read_binary_mask(source: Path) -> np.ndarray:
    """HxW bool mask of an image file whose nonzero pixels are set (vessel masks, regions of interest)."""
    return to_binary(open_image(source))
