"""Every format the writers produce reads back, through distill.data, to the generator's own raster."""

from __future__ import annotations

import json

import numpy as np
import pytest

from distill.data import open_dataset
from distill.data.writers import WRITERS, rle_counts, write_dataset
from distill.synth import generate_sample

READER = {"coco_rle": "coco"}  # the coco reader reads both polygons and RLE


@pytest.fixture(scope="module")
def samples():
    made = []
    for index, (size, style) in enumerate([(96, "fundus"), (112, "angiogram"), (128, "fundus")]):
        sample = generate_sample(100 + index, size, style)
        sample.id = f"item_{index}"
        made.append(sample)
    return made


@pytest.mark.parametrize("format", list(WRITERS))
def test_written_dataset_reads_back_exactly(tmp_path, samples, format):
    root = write_dataset(tmp_path / format, samples, format)
    dataset = open_dataset(READER.get(format, format), root)
    assert sorted(dataset.ids) == [s.id for s in samples]
    for sample in samples:
        record = dataset.get(sample.id)
        written, read = sample.mask.astype(bool), record.mask.astype(bool)
        assert (written & read).sum() / (written | read).sum() >= 0.99
        assert record.image.shape == sample.image.shape
        difference = np.abs(record.image.astype(int) - sample.image.astype(int))
        if format == "mask_folder":
            assert difference.max() == 0  # PNG is lossless
            np.testing.assert_array_equal(record.roi, sample.roi)
        else:
            assert difference.mean() < 4.0  # JPEG quality 95
    assert not list(root.rglob("*.tmp"))


def test_merged_layout_is_sa2va_format(tmp_path, samples):
    root = write_dataset(tmp_path, samples[:1], "merged")
    (entry,) = json.loads((root / "annotations.json").read_text())
    assert entry["image"] == "item_0.jpg" and (root / "images" / "item_0.jpg").is_file()
    assert entry["text"] == ["blood vessel"] and len(entry["mask"]) == 1
    assert entry["mask"][0] == samples[0].polygons


def test_rle_counts_are_column_major_and_start_with_zeros():
    mask = np.array([[1, 0], [1, 1]], dtype=np.uint8)  # column-major: 1 1 0 1
    assert rle_counts(mask) == [0, 2, 1, 1]
    assert rle_counts(np.zeros((2, 3), np.uint8)) == [6]
