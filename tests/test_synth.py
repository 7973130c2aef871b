"""Synthetic vessels: deterministic, exact annotations, tapering to 1 px, and hard for a global threshold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import skeletonize

from distill.data.rasterize import rasterize_polygons
from distill.errors import ConfigError
from distill.synth import STYLES, generate_sample, make_dataset

ROOT = Path(__file__).resolve().parents[1]
# Measured: pooled Otsu recall 0.595 on these 8 images (fundus 0.44-0.63, angiogram 0.46-0.94 per image),
# ~0.60 over 16 seeds per style; the bound leaves a 0.1 margin.
RECALL_BOUND = 0.7


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_via_cli_and_make_dataset(tmp_path):
    command = [sys.executable, "-m", "distill.synth", "--count", "3", "--size", "96", "--seed", "5"]
    subprocess.run([*command, "--out", str(tmp_path / "cli")], cwd=ROOT, check=True, capture_output=True)
    make_dataset(tmp_path / "a", count=3, size=96, seed=5)
    make_dataset(tmp_path / "b", count=3, size=96, seed=5)
    cli, a, b = (tree_bytes(tmp_path / name) for name in ("cli", "a", "b"))
    assert sorted(cli) == ["annotations.json", *(f"images/fundus_0000{i}.jpg" for i in range(3))]
    assert cli == a == b


def test_different_seeds_differ_and_count_is_a_prefix(tmp_path):
    one, two = generate_sample(1, 96, "fundus"), generate_sample(2, 96, "fundus")
    assert not np.array_equal(one.image, two.image) and not np.array_equal(one.mask, two.mask)
    make_dataset(tmp_path / "two", count=2, size=64, seed=3, format="mask_folder")
    make_dataset(tmp_path / "three", count=3, size=64, seed=3, format="mask_folder")
    two_files, three_files = tree_bytes(tmp_path / "two"), tree_bytes(tmp_path / "three")
    assert all(three_files[name] == data for name, data in two_files.items())


@pytest.mark.parametrize("style", STYLES)
def test_mask_is_the_exact_raster_of_the_polygons_and_the_image_shows_it(style):
    sample = generate_sample(11, 128, style)
    mask, outside = rasterize_polygons(sample.polygons, 128, 128)
    assert outside == 0
    np.testing.assert_array_equal(sample.mask, mask)
    assert sample.image.shape == (128, 128, 3) and sample.image.dtype == np.uint8
    assert all(len(p) >= 6 and len(p) % 2 == 0 for p in sample.polygons) and sample.text == "blood vessel"
    # Image and mask agree: vessels are darker than the background right next to them.
    green = sample.image[:, :, 1].astype(float)
    vessel = sample.mask.astype(bool)
    beside = ndimage.binary_dilation(vessel, iterations=2) & ~vessel & sample.roi
    assert green[vessel].mean() < green[beside].mean() - 3


def test_widths_taper_from_thick_trunks_to_one_pixel():
    mask = generate_sample(4, 512, "fundus").mask.astype(bool)
    skeleton = skeletonize(mask)
    depth = ndimage.distance_transform_edt(mask)[skeleton]
    assert depth.max() >= 3.0  # trunks ~6-8 px wide at 512 px
    # Thin branches are exactly one pixel thick across the row or the column.
    padded = np.pad(mask, 1)
    one_wide_row = padded[1:-1, 1:-1] & ~padded[1:-1, :-2] & ~padded[1:-1, 2:]
    one_wide_col = padded[1:-1, 1:-1] & ~padded[:-2, 1:-1] & ~padded[2:, 1:-1]
    assert (one_wide_row | one_wide_col)[skeleton].mean() > 0.2


def test_a_global_otsu_threshold_misses_thin_vessels():
    hits = vessels = 0
    for style in STYLES:
        for seed in range(4):
            sample = generate_sample(seed, 128, style)
            green, roi, vessel = sample.image[:, :, 1], sample.roi, sample.mask.astype(bool)
            assert 0.03 <= vessel.mean() <= 0.2
            predicted = (green < threshold_otsu(green[roi])) & roi
            hits += int((predicted & vessel).sum())
            vessels += int(vessel.sum())
    assert hits / vessels < RECALL_BOUND


def test_preview_sheet_is_written(tmp_path):
    sheet = tmp_path / "sheet.png"
    make_dataset(tmp_path / "data", count=5, size=64, style="angiogram", seed=0, preview=sheet)
    with Image.open(sheet) as picture:
        assert picture.width > 4 * 2 * 64 and picture.height > 2 * 64


def test_bad_requests_are_refused(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not an empty directory"):
        make_dataset(tmp_path / "full", count=1, size=64)
    with pytest.raises(ConfigError, match="style"):
        generate_sample(0, 64, "retina")
