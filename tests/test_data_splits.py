"""Splits are seeded by id, persisted, stable as a dataset grows, and explicit splits win; hashes track content."""

import json
import logging
import os
import pickle

import pytest
from test_data_formats import write_image, write_json, write_merged

from distill.data import open_dataset
from distill.data.splits import SPLITS, resolve_splits, write_split_file

TRIANGLE = [[2, 2, 20, 3, 10, 18]]


def merged_of(root, names):
    return write_merged(root, [{"image": f"{n}.png", "mask": TRIANGLE} for n in names])


def splits_json(root):
    return json.loads((root / "splits.json").read_text())


def test_splits_are_seeded_persisted_and_roughly_proportional(tmp_path):
    names = [f"img{i:03d}" for i in range(200)]
    merged_of(tmp_path, names)
    ds = open_dataset("merged", tmp_path, split_seed=7)
    sizes = {s: len(ds.split_ids(s)) for s in SPLITS}
    assert (
        sum(sizes.values()) == 200
        and 115 <= sizes["train"] <= 165
        and sizes["val"] >= 15
        and sizes["test"] >= 15
    )
    saved = splits_json(tmp_path)
    assert saved["seed"] == 7 and saved["fractions"] == [0.7, 0.15, 0.15]
    assert saved["splits"] == {i: ds.split_of(i) for i in ds.ids}
    (tmp_path / "splits.json").unlink()
    assert open_dataset("merged", tmp_path, split_seed=7).splits == ds.splits
    (tmp_path / "splits.json").unlink()
    assert open_dataset("merged", tmp_path, split_seed=8).splits != ds.splits


def test_adding_images_never_moves_existing_ids(tmp_path, caplog):
    merged_of(tmp_path, [f"a{i}" for i in range(30)])
    before = open_dataset("merged", tmp_path).splits
    merged_of(tmp_path, [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(25)])
    with caplog.at_level(logging.INFO, logger="distill.data.splits"):
        after = open_dataset("merged", tmp_path).splits
    assert {i: after[i] for i in before} == before and len(after) == 55
    assert "25 ids newly assigned" in caplog.text and "splits.json" in caplog.text
    assert len(splits_json(tmp_path)["splits"]) == 55


def test_existing_split_file_is_honoured_even_with_another_seed(tmp_path, caplog):
    merged_of(tmp_path, [f"a{i}" for i in range(10)])
    open_dataset("merged", tmp_path)
    saved = splits_json(tmp_path)
    saved["splits"]["a3"] = "test"
    write_json(tmp_path / "splits.json", saved)
    with caplog.at_level(logging.WARNING, logger="distill.data.splits"):
        assert open_dataset("merged", tmp_path, split_seed=99).split_of("a3") == "test"
    assert "made with seed 0" in caplog.text


@pytest.mark.parametrize(
    "given", [{"a0": "test", "a1": "val"}, {"train": ["a2"], "val": ["a1"], "test": ["a0"]}]
)
def test_a_given_split_file_is_honoured(tmp_path, given):
    merged_of(tmp_path, ["a0", "a1", "a2", "a3"])
    write_json(tmp_path / "mine.json", given)
    ds = open_dataset("merged", tmp_path, split_file=tmp_path / "mine.json")
    assert (ds.split_of("a0"), ds.split_of("a1")) == ("test", "val")


def test_every_split_is_non_empty_from_three_items(tmp_path):
    for seed in range(25):
        for n in (3, 4, 7):
            root = tmp_path / f"{seed}_{n}"
            root.mkdir()
            splits = resolve_splits(
                root, [f"x{i}" for i in range(n)], seed=seed, fractions=(0.7, 0.15, 0.15), explicit={}
            )
            assert set(splits.values()) == set(SPLITS), (seed, n, splits)


def test_split_file_is_written_atomically(tmp_path, monkeypatch):
    write_split_file(tmp_path / "splits.json", 0, (0.7, 0.15, 0.15), {"a": "train"})
    original = (tmp_path / "splits.json").read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_split_file(tmp_path / "splits.json", 0, (0.7, 0.15, 0.15), {"a": "test"})
    assert (tmp_path / "splits.json").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["splits.json"]


def test_input_hashes_follow_what_a_teacher_sees_not_the_annotation(tmp_path):
    """The fingerprint a teacher cache compares: a changed image (or text) changes its id's hash; a fixed
    annotation does not (the teacher never saw it, so its cached rows stay valid)."""
    merged_of(tmp_path, ["a", "b", "c"])
    ds = open_dataset("merged", tmp_path)
    fingerprint = ds.fingerprint()
    assert fingerprint["format"] == "merged" and fingerprint["n_items"] == 3
    assert set(fingerprint["items"]) == {"a", "b", "c"} and len(fingerprint["digest"]) == 64
    assert open_dataset("merged", tmp_path).fingerprint() == fingerprint

    write_image(tmp_path / "images" / "b.png", seed=42)
    changed = open_dataset("merged", tmp_path).fingerprint()
    assert (
        changed["items"]["b"] != fingerprint["items"]["b"]
        and changed["items"]["a"] == fingerprint["items"]["a"]
    )
    assert changed["digest"] != fingerprint["digest"]

    entries = [
        {"image": n, "mask": TRIANGLE if n != "c.png" else [[0, 0, 9, 0, 0, 9]]}
        for n in ["a.png", "b.png", "c.png"]
    ]
    write_merged(tmp_path, entries)
    relabelled = open_dataset("merged", tmp_path).fingerprint()
    # (write_merged rewrote b.png as it first was)
    assert relabelled["items"]["c"] == changed["items"]["c"], "a fixed annotation keeps the teacher's rows"
    assert (
        relabelled["items"]["b"] == fingerprint["items"]["b"]
        and relabelled["items"]["a"] == changed["items"]["a"]
    )
    write_merged(tmp_path, [{**e, "text": "the arteries"} if e["image"] == "a.png" else e for e in entries])
    retexted = open_dataset("merged", tmp_path).fingerprint()
    assert retexted["items"]["a"] != changed["items"]["a"] and retexted["items"]["c"] == changed["items"]["c"]


def test_dataset_pickles_small_and_loads_in_a_copy(tmp_path):
    merged_of(tmp_path, [f"a{i}" for i in range(20)])
    ds = open_dataset("merged", tmp_path)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000
    copy = pickle.loads(blob)
    assert copy.ids == ds.ids and (copy[3].mask == ds[3].mask).all()
