"""Each dataset format read from tiny hand-written fixtures; masks checked pixel for pixel."""

import base64
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data import DatasetWarning, list_formats, open_dataset
from distill.data.formats.coco import rle_decode
from distill.data.images import DecodeWarning, read_binary_mask, read_image
from distill.data.rasterize import rasterize_polygons
from distill.errors import ConfigError, DatasetError

H, W = 24, 32


def write_image(path: Path, array: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Write a PNG (random RGB unless `array` is given) and return its pixels."""
    if array is None:
        array = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def write_merged(root: Path, annotations: list, images: dict[str, int] | None = None) -> Path:
    """annotations.json + images/<name> (random pixels, seeded) for each name in `images` (default: all named)."""
    for name in images or [a["image"] for a in annotations]:
        write_image(root / "images" / name, seed=len(name))
    return write_json(root / "annotations.json", annotations)


def near_polyline(points: list[tuple[float, float]], radius: float) -> np.ndarray:
    """Reference: pixels whose centre is within `radius` of the polyline, one pixel at a time."""
    out = np.zeros((H, W), np.uint8)
    for i in range(H):
        for j in range(W):
            px, py = j + 0.5, i + 0.5
            best = math.inf
            pairs = list(zip(points, points[1:], strict=False)) or [(points[0], points[0])]
            for (ax, ay), (bx, by) in pairs:
                dx, dy = bx - ax, by - ay
                t = (
                    0.0
                    if dx == dy == 0
                    else max(0.0, min(1.0, ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy)))
                )
                best = min(best, math.hypot(px - ax - t * dx, py - ay - t * dy))
            out[i, j] = best <= radius
    return out


def test_registry_lists_every_format_and_refuses_unknown_ones(tmp_path):
    assert list_formats() == ["coco", "labelme", "mask_folder", "merged"]
    with pytest.raises(ConfigError, match="unknown dataset format 'voc'"):
        open_dataset("voc", tmp_path)
    with pytest.raises(ConfigError, match="line_width"):
        open_dataset("merged", tmp_path, line_width=3)


def test_merged_reads_both_mask_forms_and_both_text_forms(tmp_path):
    nested = [[[2, 2, 20, 3, 10, 18]], [[25, 1, 31, 1, 31, 9, 25, 9], [0, 20, 5, 20, 5, 24]]]
    flat = [[1.5, 1.5, 12.2, 4.7, 3.3, 15.1]]
    write_merged(
        tmp_path,
        [
            {"image": "a.png", "mask": nested, "text": ["blood vessel", "vessels"]},
            {"image": "sub/b.png", "mask": flat, "text": "the vessels"},
        ],
    )
    ds = open_dataset("merged", tmp_path)
    assert ds.ids == ["a", "sub/b"] and len(ds) == 2 and ds.format == "merged"
    a, b = ds.get("a"), ds.get("sub/b")
    np.testing.assert_array_equal(a.mask, rasterize_polygons([p for m in nested for p in m], H, W)[0])
    np.testing.assert_array_equal(b.mask, rasterize_polygons(flat, H, W)[0])
    np.testing.assert_array_equal(a.image, read_image(tmp_path / "images" / "a.png"))
    assert a.image.dtype == np.uint8 and a.image.shape == (H, W, 3) and a.mask.dtype == np.uint8
    assert (a.text, b.text) == ("blood vessel", "the vessels")
    assert a.source == tmp_path / "images" / "a.png" and a.roi is None
    assert a.mask.sum() > 0 and b.mask.sum() > 0


def test_vertices_outside_the_image_are_clipped_and_counted_in_one_warning(tmp_path):
    polygon = [-5, -5, 10, -5, 10, 10]
    write_merged(
        tmp_path, [{"image": "a.png", "mask": [polygon]}, {"image": "b.png", "mask": [[0, 0, 40, 0, 0, 9]]}]
    )
    with pytest.warns(
        DatasetWarning, match=r"3 annotation vertices lie outside their image in 2 files"
    ) as caught:
        ds = open_dataset("merged", tmp_path)
    assert len([w for w in caught if "outside" in str(w.message)]) == 1
    assert "a.png" in str(caught[0].message) and "b.png" in str(caught[0].message)
    np.testing.assert_array_equal(ds.get("a").mask, rasterize_polygons([polygon], H, W)[0])


def test_labelme_shapes_line_width_label_filter_and_points(tmp_path):
    image = write_image(tmp_path / "pics" / "a.png")
    shapes = [
        {"label": "vessel", "shape_type": "polygon", "points": [[2, 2], [12, 3], [6, 11]]},
        {"label": "vessel", "shape_type": "rectangle", "points": [[20, 14], [24.4, 20.6]]},
        {"label": "vessel", "shape_type": "circle", "points": [[26, 5], [26, 8.2]]},
        {"label": "vessel", "shape_type": "linestrip", "points": [[1, 22], [10, 15.3], [18, 21]]},
        {"label": "other", "shape_type": "line", "points": [[30, 10], [30, 23]]},
        {"label": "vessel", "shape_type": "point", "points": [[5, 5]]},
    ]
    write_json(
        tmp_path / "ann" / "a.json",
        {"shapes": shapes, "imagePath": "../pics/a.png", "imageHeight": H, "imageWidth": W},
    )

    with pytest.warns(DatasetWarning, match="ignored 1 point shapes"):
        ds = open_dataset("labelme", tmp_path, line_width=3)
    record = ds.get("ann/a")
    polygons = rasterize_polygons([[2, 2, 12, 3, 6, 11], [20, 14, 24.4, 14, 24.4, 20.6, 20, 20.6]], H, W)[0]
    circle = near_polyline([(26, 5)], 3.2)
    expected = (
        polygons
        | circle
        | near_polyline([(1, 22), (10, 15.3), (18, 21)], 1.5)
        | near_polyline([(30, 10), (30, 23)], 1.5)
    )
    np.testing.assert_array_equal(record.mask, expected)
    np.testing.assert_array_equal(record.image, image)

    wide = open_dataset("labelme", tmp_path, line_width=5, label_filter=["other"]).get("ann/a")
    np.testing.assert_array_equal(wide.mask, near_polyline([(30, 10), (30, 23)], 2.5))
    assert wide.mask[10:23, 28:33].all() and wide.mask[:, :27].sum() == 0
    with pytest.raises(ConfigError, match=r"label_filter \['artery'\] matches no shape.*'other', 'vessel'"):
        open_dataset("labelme", tmp_path, label_filter="artery")


def test_labelme_uses_embedded_image_data(tmp_path):
    image = write_image(tmp_path / "tmp.png", seed=3)
    data = base64.b64encode((tmp_path / "tmp.png").read_bytes()).decode()
    (tmp_path / "tmp.png").unlink()
    shapes = [{"label": "v", "points": [[1, 1], [30, 2], [15, 20]], "shape_type": "polygon"}]
    write_json(tmp_path / "x" / "b.json", {"shapes": shapes, "imagePath": "gone.png", "imageData": data})
    record = open_dataset("labelme", tmp_path).get("x/b")
    np.testing.assert_array_equal(record.image, image)
    np.testing.assert_array_equal(record.mask, rasterize_polygons([[1, 1, 30, 2, 15, 20]], H, W)[0])


def labelme_mask_shape(mask: np.ndarray, label: str = "vessel") -> dict:
    """A shape as LabelMe >= 5.5's AI-mask tool saves it: `points` = the inclusive box of `mask`, `mask` =
    the box's pixels as a base64 PNG of uint8 0/1 (labelme.utils.img_arr_to_b64)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y1, y2, x1, x2 = rows[0], rows[-1], cols[0], cols[-1]
    png = io.BytesIO()
    Image.fromarray(mask[y1 : y2 + 1, x1 : x2 + 1].astype(np.uint8)).save(png, format="PNG")
    return {
        "label": label,
        "points": [[float(x1), float(y1)], [float(x2), float(y2)]],
        "group_id": None,
        "description": "",
        "shape_type": "mask",
        "flags": {},
        "mask": base64.b64encode(png.getvalue()).decode(),
    }


def test_labelme_ai_mask_shapes_are_pasted_at_their_box_and_united(tmp_path):
    write_image(tmp_path / "a.png")
    vessel = np.zeros((H, W), bool)
    for step in range(14):  # a diagonal vessel reaching the right and bottom edges
        vessel[10 + step, 18 + step : 21 + step] = True
    polygon = [[2, 2], [12, 3], [6, 11]]
    tilted = [[14, 1], [17, 4], [15, 6], [12, 3]]
    shapes = [
        labelme_mask_shape(vessel),
        {"label": "vessel", "shape_type": "polygon", "points": polygon},
        {"label": "vessel", "shape_type": "oriented_rectangle", "points": tilted},
    ]
    document = {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": "a.png", "imageData": None}
    write_json(tmp_path / "a.json", {**document, "imageHeight": H, "imageWidth": W})
    record = open_dataset("labelme", tmp_path).get("a")
    drawn = rasterize_polygons([np.ravel(polygon), np.ravel(tilted)], H, W)[0]
    np.testing.assert_array_equal(record.mask, drawn | vessel)


def test_labelme_mask_shape_without_its_png_is_a_bad_item(tmp_path):
    write_image(tmp_path / "a.png")
    shape = {**labelme_mask_shape(np.eye(H, W, dtype=bool)), "mask": None}
    write_json(tmp_path / "a.json", {"shapes": [shape], "imagePath": "a.png"})
    with pytest.raises(DatasetError, match=r"a.json: shape 0 \(vessel\): a mask shape needs 'mask'"):
        open_dataset("labelme", tmp_path)


def write_roboflow_coco(root: Path) -> dict[str, np.ndarray]:
    """A Roboflow COCO export: train/ valid/ test/, each with its images and `_annotations.coco.json`
    (Roboflow's categories: id 0 the project as supercategory "none", then the classes); returns
    {id: expected mask}."""
    expected = {}
    for split, stems in {"train": ["a", "b"], "valid": ["a"], "test": ["c"]}.items():
        images, annotations = [], []
        for number, stem in enumerate(stems, start=1):
            name = f"{stem}_png.rf.0123456789abcdef{number}.jpg"
            write_image(root / split / name, seed=number)
            images.append({"id": number - 1, "license": 1, "file_name": name, "height": H, "width": W})
            top = 2 + 3 * number
            box = [3, top, 20, top, 20, top + 4, 3, top + 4]
            annotations.append(
                {"id": number - 1, "image_id": number - 1, "category_id": 1, "bbox": [3, top, 17, 4],
                 "area": 68, "segmentation": [box], "iscrowd": 0}
            )  # fmt: skip
            expected[f"{split}/{Path(name).stem}"] = rasterize_polygons([box], H, W)[0]
        categories = [
            {"id": 0, "name": "vessels-xyz", "supercategory": "none"},
            {"id": 1, "name": "vessel", "supercategory": "vessels-xyz"},
        ]
        write_json(
            root / split / "_annotations.coco.json",
            {"info": {"year": "2025"}, "licenses": [], "categories": categories, "images": images,
             "annotations": annotations},
        )  # fmt: skip
    (root / "README.roboflow.txt").write_text("exported via roboflow.com\n")
    return expected


def test_roboflow_coco_export_reads_as_one_dataset_split_by_its_folders(tmp_path):
    expected = write_roboflow_coco(tmp_path)
    ds = open_dataset("coco", tmp_path, categories=["vessel"])
    assert ds.ids == sorted(expected)
    assert {i: ds.split_of(i) for i in ds.ids} == {
        i: {"train": "train", "valid": "val", "test": "test"}[i.split("/")[0]] for i in expected
    }
    for item, mask in expected.items():
        np.testing.assert_array_equal(ds.get(item).mask, mask)
    assert not any((tmp_path / split / "splits.json").exists() for split in ("train", "valid", "test"))


def test_one_folder_of_a_roboflow_export_points_to_the_export_root(tmp_path):
    write_roboflow_coco(tmp_path)
    with pytest.raises(
        DatasetError, match=rf"{tmp_path / 'train'}: is the train/ folder of an export.*use {tmp_path} as"
    ):
        open_dataset("coco", tmp_path / "train")
    assert not (tmp_path / "train" / "splits.json").exists()
    alone = open_dataset("coco", tmp_path / "train", annotation_file="_annotations.coco.json")
    assert len(alone) == 2


def rle_encode(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a run of zeros (COCO's uncompressed RLE)."""
    flat = mask.T.ravel()
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return [0, *runs] if flat[0] else runs


def rle_string(runs: list[int]) -> str:
    """COCO's compressed counts string (pycocotools rleToString), written independently of the reader."""
    out = []
    for i, run in enumerate(runs):
        x = run - runs[i - 2] if i > 2 else run
        more = True
        while more:
            chunk = x & 0x1F
            x >>= 5
            more = x != -1 if chunk & 0x10 else x != 0
            out.append(chr((chunk | 0x20 if more else chunk) + 48))
    return "".join(out)


def test_rle_decode_is_column_major():
    mask = rle_decode({"size": [2, 3], "counts": [2, 1, 3]})
    np.testing.assert_array_equal(mask, [[0, 1, 0], [0, 0, 0]])


def test_coco_polygons_and_both_rle_forms_united_by_chosen_categories(tmp_path):
    write_image(tmp_path / "imgs" / "a.png", seed=1)
    write_image(tmp_path / "imgs" / "b.png", seed=2)
    blob = np.zeros((H, W), np.uint8)
    blob[3:17, 5:9] = 1
    blob[20:, 25:] = 1
    ring = near_polyline([(4, 4), (28, 20)], 2.2)
    polygon = [2, 2, 20, 3, 10, 18]
    coco = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "b.png", "height": H, "width": W},
        ],
        "categories": [
            {"id": 1, "name": "artery"},
            {"id": 2, "name": "vein"},
            {"id": 3, "name": "optic disc"},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [polygon]},
            {
                "id": 2,
                "image_id": 1,
                "category_id": 2,
                "segmentation": {"size": [H, W], "counts": rle_encode(blob)},
            },
            {
                "id": 3,
                "image_id": 2,
                "category_id": 2,
                "segmentation": {"size": [H, W], "counts": rle_string(rle_encode(ring))},
            },
            {"id": 4, "image_id": 2, "category_id": 3, "segmentation": [[0, 0, 32, 0, 32, 24, 0, 24]]},
        ],
    }
    write_json(tmp_path / "instances.json", coco)
    ds = open_dataset("coco", tmp_path, image_dir="imgs", categories=["artery", 2])
    np.testing.assert_array_equal(ds.get("a").mask, rasterize_polygons([polygon], H, W)[0] | blob)
    np.testing.assert_array_equal(ds.get("b").mask, ring)
    everything = open_dataset("coco", tmp_path, image_dir="imgs")
    assert everything.get("b").mask.all()
    with pytest.raises(ConfigError, match=r"categories \['capillary'\] are not in .*instances.json"):
        open_dataset("coco", tmp_path, image_dir="imgs", categories=["capillary"])


def test_mask_folder_with_roi_and_nested_names(tmp_path):
    image = write_image(tmp_path / "images" / "eye" / "a.png")
    mask = np.zeros((H, W), np.uint8)
    mask[4:9, 2:30] = 255
    mask[10, 10] = 1  # a third grey level: below mid-range, so not vessel (and a warning says so)
    roi = np.zeros((H, W), np.uint8)
    roi[2:22, 1:31] = 200
    write_image(tmp_path / "masks" / "eye" / "a.png", mask)
    write_image(tmp_path / "roi" / "eye" / "a.tif", roi)
    with pytest.warns(DecodeWarning, match="more than two grey levels"):
        record = open_dataset("mask_folder", tmp_path).get("eye/a")
    np.testing.assert_array_equal(record.image, image)
    np.testing.assert_array_equal(record.mask, (mask > 127).astype(np.uint8))
    assert record.roi.dtype == bool
    np.testing.assert_array_equal(record.roi, roi != 0)


def test_mask_folder_split_folders_give_ids_and_splits(tmp_path):
    for split, stems in {"train": ["a", "b"], "val": ["c"], "test": ["a"]}.items():
        for stem in stems:
            write_image(tmp_path / split / "images" / f"{stem}.png")
            write_image(tmp_path / split / "masks" / f"{stem}.png", np.ones((H, W), np.uint8))
    ds = open_dataset("mask_folder", tmp_path)
    assert ds.ids == ["test/a", "train/a", "train/b", "val/c"]
    assert ds.split_ids("train") == ["train/a", "train/b"] and ds.split_of("test/a") == "test"


def test_mask_folder_reads_roboflows_valid_folder_as_val(tmp_path):
    for split in ("train", "valid"):
        write_image(tmp_path / split / "images" / "a.png")
        write_image(tmp_path / split / "masks" / "a.png", np.ones((H, W), np.uint8))
    ds = open_dataset("mask_folder", tmp_path)
    assert ds.ids == ["train/a", "valid/a"] and ds.split_ids("val") == ["valid/a"]


@pytest.mark.parametrize(
    "mode, pixels, expected",
    [
        ("L", np.full((4, 5), 77, np.uint8), 77),
        ("I;16", np.full((4, 5), 257 * 200, np.uint16), 200),
        ("RGBA", np.full((4, 5, 4), (10, 20, 30, 0), np.uint8), (10, 20, 30)),
        ("LA", np.full((4, 5, 2), (90, 3), np.uint8), 90),
    ],
)
def test_images_of_any_mode_become_rgb_uint8(tmp_path, mode, pixels, expected):
    path = tmp_path / "x.png"
    image = Image.fromarray(pixels)
    assert image.mode == mode
    image.save(path)
    rgb = read_image(path)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, np.broadcast_to(np.asarray(expected, np.uint8), (4, 5, 3)))


def test_palette_images_expand_and_palette_masks_use_the_index(tmp_path):
    index = np.array([[0, 1], [2, 0]], np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png")[:, :, 0], [[0, 255], [0, 0]])
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "p.png"), index != 0)


def test_sixteen_bit_scaling_matches_eight_bit(tmp_path):
    values = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    Image.fromarray((values * 257).astype(np.uint16)).save(tmp_path / "wide.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_image(tmp_path / "wide.png")[:, :, 1], values.astype(np.uint8))


def test_coco_finds_images_under_root_or_images_folder(tmp_path):
    write_image(tmp_path / "images" / "a.png")
    write_image(tmp_path / "b.png")
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}], "annotations": []}
    write_json(tmp_path / "coco.json", coco)
    ds = open_dataset("coco", tmp_path)
    assert ds.ids == ["a", "b"] and ds.get("a").source == tmp_path / "images" / "a.png"
    assert ds.get("b").mask.sum() == 0
