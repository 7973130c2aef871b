import cv2
import numpy as np
import pytest
import torch
from skimage.draw import polygon as sk_polygon

from distill.data.rasterize import as_vertices, rasterize_polygons
from distill.views import (
    TENSOR_VIEWS,
    VIEWS,
    apply_view,
    check_views,
    expand_views,
    invert_view,
    mean_over_views,
    view_matrix,
)


def reference_fill(points: np.ndarray, h: int, w: int) -> np.ndarray:
    # scikit-image tests pixel centres at integer coordinates; ours sit at +0.5.
    rr, cc = sk_polygon(points[:, 1] - 0.5, points[:, 0] - 0.5, (h, w))
    out = np.zeros((h, w), np.uint8)
    out[rr, cc] = 1
    return out


def test_random_polygons_match_reference_pixel_for_pixel():
    rng = np.random.default_rng(0)
    for _ in range(100):
        points = rng.uniform(-8, 40, size=(rng.integers(3, 10), 2))
        mask, _ = rasterize_polygons([points], 32, 32)
        np.testing.assert_array_equal(mask, reference_fill(points, 32, 32))


def test_unit_square_covers_exactly_one_pixel_and_counts_outside():
    mask, outside = rasterize_polygons([[2, 3, 3, 3, 3, 4, 2, 4]], 8, 8)
    assert mask.sum() == 1 and mask[3, 2] == 1 and outside == 0
    mask, outside = rasterize_polygons([[-5, -5, 20, -5, 20, 20, -5, 20]], 8, 8)
    assert mask.all() and outside == 4


def test_one_pixel_ribbon_is_one_pixel_wide():
    xs = np.linspace(4, 60, 80)
    ys = 32 + 6 * np.sin(xs / 7)
    ribbon = np.concatenate([np.stack([xs, ys - 0.5], 1), np.stack([xs[::-1], ys[::-1] + 0.5], 1)])
    mask, _ = rasterize_polygons([ribbon], 64, 64)
    assert (mask[:, 5:59].sum(axis=0) == 1).all()


def test_flat_polygon_with_odd_length_is_refused():
    with pytest.raises(ValueError, match="even number"):
        as_vertices([1, 2, 3])


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_every_view_is_undone_by_its_inverse(name):
    image = np.arange(5 * 7 * 3).reshape(5, 7, 3)
    np.testing.assert_array_equal(invert_view(apply_view(image, name), name), image)


def view_inputs(tmp_path) -> dict[str, np.ndarray]:
    """Arrays of every kind a view meets: OpenCV's dtypes and layouts, and those it cannot hold."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    stored = np.lib.format.open_memmap(tmp_path / "map.npy", mode="w+", dtype=np.float16, shape=(6, 9))
    stored[:] = rng.normal(size=(6, 9))
    return {
        "uint8 HxWx3": image,
        "uint8 HxW": image[..., 0].copy(),
        "float32 HxWx1": rng.normal(size=(6, 9, 1)).astype(np.float32),
        "float16 memmap": stored,
        "float16 HxWx8 (numpy path)": rng.normal(size=(6, 9, 8)).astype(np.float16),
        "bool (numpy path)": image[..., 0] > 128,
        "int64 (numpy path)": image[..., 0].astype(np.int64),
        "strided": image[:, ::2],
        "column slice": image[..., 1],
        "empty": image[:0],
    }


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_views_equal_their_numpy_definition_for_every_dtype_and_layout(name, tmp_path):
    for kind, array in view_inputs(tmp_path).items():
        expected = np.ascontiguousarray(VIEWS[name](np.asarray(array)))
        out = apply_view(array, name)
        assert out.dtype == expected.dtype and out.shape == expected.shape, kind
        assert out.flags.c_contiguous, kind
        np.testing.assert_array_equal(out, expected, err_msg=kind)


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_a_warp_by_the_view_matrix_moves_every_pixel_as_the_view_does(name):
    square = np.random.default_rng(0).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    moved = cv2.warpAffine(square, view_matrix(name, 9)[:2], (9, 9), flags=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(moved, apply_view(square, name))


def test_check_views_rejects_unknown_and_repeated():
    with pytest.raises(ValueError, match="unknown"):
        check_views(["identity", "spin"])
    with pytest.raises(ValueError, match="repeat"):
        check_views(["hflip", "hflip"])


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_tensor_views_match_the_numpy_views_on_the_last_two_axes(view):
    array = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    expected = np.stack([np.stack([VIEWS[view](plane) for plane in image]) for image in array])
    np.testing.assert_array_equal(TENSOR_VIEWS[view](torch.from_numpy(array)).numpy(), expected)


def test_mean_over_views_maps_each_output_back_before_the_mean():
    images = torch.rand(2, 3, 4, 6)

    def forward(x):  # not equivariant: depends on position along the last axis
        return x.cumsum(-1)[:, :1] * torch.arange(x.shape[-1])

    views = ["identity", "rot90", "antitranspose"]
    expected = np.mean(
        [
            np.stack(
                [
                    invert_view(
                        forward(torch.from_numpy(apply_view(im, v)).permute(2, 0, 1)[None])[0, 0].numpy(), v
                    )
                    for im in images.permute(0, 2, 3, 1).numpy()
                ]
            )
            for v in views
        ],
        axis=0,
    )
    got = mean_over_views(forward, images, views)
    assert got.shape == (2, 1, 4, 6)
    np.testing.assert_allclose(got[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_expand_views_reads_d4_commas_and_lists_and_refuses_unknown_names():
    assert expand_views("d4") == list(VIEWS)
    assert expand_views("identity, hflip") == ["identity", "hflip"] == expand_views(["identity", "hflip"])
    with pytest.raises(ValueError, match="unknown"):
        expand_views("d4,spin")
    with pytest.raises(ValueError, match="repeat"):
        expand_views("d4,hflip")
