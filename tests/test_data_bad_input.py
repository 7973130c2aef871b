"""Every kind of bad input gives a DatasetError that names the file and the problem (never a silent zero)."""

import json

import numpy as np
import pytest
from PIL import Image
from test_data_formats import H, W, write_image, write_json, write_merged

from distill.data import DatasetWarning, open_dataset
from distill.errors import DatasetError

TRIANGLE = [[2, 2, 20, 3, 10, 18]]


def test_unreadable_image_fails_at_load_naming_it(tmp_path):
    write_merged(tmp_path, [{"image": "a.png", "mask": TRIANGLE}])
    (tmp_path / "images" / "a.png").write_bytes(b"this is not a png")
    ds = open_dataset("merged", tmp_path)
    with pytest.raises(DatasetError, match=r"images/a\.png: not a readable image"):
        ds[0]


@pytest.mark.parametrize("name", ["a.png", "a.jpg"])
def test_truncated_image_fails_at_load_naming_it(tmp_path, name):
    write_merged(tmp_path, [{"image": name, "mask": TRIANGLE}])
    path = tmp_path / "images" / name
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetError, match=rf"images/{name}: image cannot be decoded .*truncated"):
        open_dataset("merged", tmp_path)[0]


def test_json_that_does_not_parse(tmp_path):
    write_merged(tmp_path, [{"image": "a.png", "mask": TRIANGLE}])
    (tmp_path / "annotations.json").write_text('[{"image": "a.png", ')
    with pytest.raises(DatasetError, match=r"annotations\.json: JSON does not parse"):
        open_dataset("merged", tmp_path)
    (tmp_path / "shapes.json").write_text("{oops")
    with pytest.raises(DatasetError, match=r"shapes\.json: JSON does not parse"):
        open_dataset("labelme", tmp_path)


def test_annotation_whose_image_is_missing(tmp_path):
    write_merged(
        tmp_path,
        [{"image": "a.png", "mask": TRIANGLE}, {"image": "gone.png", "mask": TRIANGLE}],
        images=["a.png"],
    )
    with pytest.raises(
        DatasetError, match=r"annotations\.json: annotation 1 \(gone\.png\): image .*gone\.png is missing"
    ):
        open_dataset("merged", tmp_path)
    write_json(tmp_path / "lm" / "x.json", {"shapes": [], "imagePath": "x.png"})
    with pytest.raises(DatasetError, match=r"x\.json: image .*x\.png \(imagePath\) is missing"):
        open_dataset("labelme", tmp_path / "lm")


@pytest.mark.filterwarnings("ignore:.*without LabelMe 'shapes'")
@pytest.mark.parametrize(
    "path", ["../../outside.png", "sub/../../../outside.png", "/etc/passwd", "C:\\data\\a.png"]
)
def test_image_path_escaping_the_root(tmp_path, path):
    root = tmp_path / "root"
    write_image(tmp_path / "outside.png")
    write_merged(root, [{"image": "a.png", "mask": TRIANGLE}])
    write_json(root / "annotations.json", [{"image": path, "mask": TRIANGLE}])
    with pytest.raises(DatasetError, match=r"annotations\.json: .*(escapes the dataset root|is absolute)"):
        open_dataset("merged", root)
    write_json(root / "x.json", {"shapes": [], "imagePath": path})
    with pytest.raises(DatasetError, match=r"x\.json: image path .*(escapes the dataset root|is absolute)"):
        open_dataset("labelme", root)


@pytest.mark.parametrize(
    "polygon, problem",
    [
        ([0, 0, 5, 5], "polygon has 2 points, needs at least 3"),
        ([0, 0, 5, float("nan"), 9, 1], "polygon has non-finite"),
    ],
)
def test_degenerate_polygons(tmp_path, polygon, problem):
    write_merged(tmp_path, [{"image": "a.png", "mask": [polygon]}])
    with pytest.raises(
        DatasetError, match=rf"annotations\.json: annotation 0 \(a\.png\), mask 0, polygon 0: {problem}"
    ):
        open_dataset("merged", tmp_path)
    write_image(tmp_path / "c" / "a.png")
    coco = {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"image_id": 1, "segmentation": [polygon]}],
    }
    write_json(tmp_path / "c" / "annotations.json", coco)
    with pytest.raises(
        DatasetError, match=rf"annotations\.json: annotations\[0\] \(image a\.png\), polygon 0: {problem}"
    ):
        open_dataset("coco", tmp_path / "c")


def test_labelme_shape_with_too_few_points(tmp_path):
    write_image(tmp_path / "a.png")
    write_json(
        tmp_path / "a.json", {"shapes": [{"label": "v", "points": [[1, 1], [4, 4]]}], "imagePath": "a.png"}
    )
    with pytest.raises(DatasetError, match=r"a\.json: shape 0 \(v\): polygon has 2 points"):
        open_dataset("labelme", tmp_path)


def test_duplicate_ids(tmp_path):
    write_merged(tmp_path, [{"image": "a.png", "mask": TRIANGLE}, {"image": "a.jpg", "mask": TRIANGLE}])
    with pytest.raises(DatasetError, match=r"duplicate id 'a' from images/a\.jpg, images/a\.png"):
        open_dataset("merged", tmp_path)


def test_image_mask_size_mismatch(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_image(tmp_path / "masks" / "a.png", np.ones((H - 2, W), np.uint8))
    ds = open_dataset("mask_folder", tmp_path)
    with pytest.raises(DatasetError, match=rf"masks/a\.png: is {H - 2}x{W} but its image a\.png is {H}x{W}"):
        ds.get("a")
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 10, "width": W}], "annotations": []}
    write_json(tmp_path / "images" / "annotations.json", coco)
    with pytest.raises(
        DatasetError, match=rf"annotations\.json: image a\.png is {H}x{W} but the annotation says 10x{W}"
    ):
        open_dataset("coco", tmp_path / "images").get("a")


def test_missing_mask_names_the_image(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_image(tmp_path / "images" / "b.png")
    write_image(tmp_path / "masks" / "a.png", np.ones((H, W), np.uint8))
    with pytest.raises(DatasetError, match=r"images/b\.png: has no file of the same name in masks/"):
        open_dataset("mask_folder", tmp_path)


@pytest.mark.filterwarnings("ignore:.*without LabelMe 'shapes'")
@pytest.mark.parametrize("fmt", ["merged", "labelme", "coco", "mask_folder"])
def test_empty_dataset(tmp_path, fmt):
    write_json(tmp_path / "annotations.json", {"images": [], "annotations": []} if fmt == "coco" else [])
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match=rf"{tmp_path}: empty dataset"):
        open_dataset(fmt, tmp_path)


def test_several_index_problems_are_listed_together(tmp_path):
    annotations = [
        {"image": "a.png", "mask": TRIANGLE},
        {"image": "gone.png", "mask": TRIANGLE},
        {"image": "b.png", "mask": [[1, 1, 2, 2]]},
        {"image": "../../up.png", "mask": TRIANGLE},
    ]
    write_merged(tmp_path, annotations, images=["a.png", "b.png"])
    with pytest.raises(DatasetError) as caught:
        open_dataset("merged", tmp_path)
    lines = str(caught.value).splitlines()
    assert "3 problems" in lines[0] and "--skip-bad" in lines[0] and "skip_bad=True" not in lines[0]
    assert all("annotations.json" in line for line in lines[1:]) and len(lines) == 4
    assert "gone.png is missing" in lines[1] and "needs at least 3" in lines[2] and "escapes" in lines[3]


def test_skip_bad_leaves_bad_items_out_and_says_so(tmp_path):
    write_merged(
        tmp_path,
        [
            {"image": "a.png", "mask": TRIANGLE},
            {"image": "b.png", "mask": TRIANGLE},
            {"image": "c.png", "mask": [[1, 1]]},
        ],
    )
    (tmp_path / "images" / "b.png").write_bytes(b"broken")
    with pytest.warns(DatasetWarning, match="left out 1 bad items") as caught:
        ds = open_dataset("merged", tmp_path, skip_bad=True)
    assert len([w for w in caught if "left out" in str(w.message)]) == 2
    assert ds.ids == ["a"] and ds.get("a").mask.sum() > 0
    assert [p.path.name for p in ds.problems] == ["annotations.json", "b.png"]
    assert json.loads((tmp_path / "splits.json").read_text())["splits"] == {"a": ds.split_of("a")}
