"""Image, mask, roi and teacher map stay aligned under every spatial transform; colour stays off the map.

The probe: pixel (row y, column x) gets image colour (2x, 2y, 0) and a float map (x, y); the mask is a
checkerboard and the roi vertical stripes. After any spatial transform the coordinates read
back from the image and from the map must agree, and the mask/roi must be the pattern evaluated at
the map's coordinates (away from pattern edges, where nearest and bilinear may legitimately differ).
"""

import copy
import warnings

import albumentations as A
import cv2
import numpy as np
import pytest

import distill.data.augment as augment_module
from distill.data.augment import (
    D4,
    PRESETS,
    AffineSpec,
    Augment,
    ColourSpec,
    Preset,
    build_augment,
    converted,
    cut,
    list_presets,
    mean_map,
    reflect,
    widened,
)
from distill.errors import ConfigError
from distill.views import VIEWS, apply_view

H, W = 64, 96  # not square, so a transpose that forgot an axis would fail
MASK_CELL, ROI_STRIPE = 6, 5  # checkerboard cell and stripe width, pixels


def probe() -> dict[str, np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    image = np.stack([2 * xx, 2 * yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)
    mask = ((xx // MASK_CELL + yy // MASK_CELL) % 2).astype(np.uint8)
    roi = ((xx // ROI_STRIPE) % 2).astype(np.uint8)
    return {"image": image, "mask": mask, "roi": roi, "teacher": np.stack([xx, yy], axis=-1)}


def check_aligned(out: dict, margin: float = 0.6, min_checked: float = 0.2) -> None:
    """`margin`: pixels near a pattern edge (in source coordinates) that are not checked."""
    map_x, map_y = out["teacher"][..., 0].astype(np.float32), out["teacher"][..., 1].astype(np.float32)
    image_x, image_y = out["image"][..., 0] / 2.0, out["image"][..., 1] / 2.0
    assert np.abs(image_x - map_x).max() < 0.75
    assert np.abs(image_y - map_y).max() < 0.75

    # Nearest neighbour picks the pixel whose centre is closest: index round(coordinate).
    def pattern_checked(period: int, coordinate: np.ndarray) -> np.ndarray:
        edge_distance = np.abs((coordinate + 0.5) / period - np.round((coordinate + 0.5) / period)) * period
        return edge_distance > margin

    cell_x, cell_y = np.floor((map_x + 0.5) / MASK_CELL), np.floor((map_y + 0.5) / MASK_CELL)
    safe = pattern_checked(MASK_CELL, map_x) & pattern_checked(MASK_CELL, map_y)
    assert safe.mean() > min_checked
    np.testing.assert_array_equal(out["mask"][safe], ((cell_x + cell_y) % 2)[safe])
    safe_roi = pattern_checked(ROI_STRIPE, map_x)
    assert safe_roi.mean() > min_checked
    stripe = np.floor((map_x + 0.5) / ROI_STRIPE) % 2
    np.testing.assert_array_equal(out["roi"][safe_roi], stripe[safe_roi])


def only(transform, views=("identity",), crop_size=None) -> Augment:
    transform = copy.deepcopy(transform)
    transform.p = 1.0
    return Augment(Preset(views=views, spatial=(transform,)), crop_size=crop_size)


def spatial_transforms(preset: str) -> list:
    return list(build_augment(preset).spatial.transforms)


@pytest.mark.parametrize("view", list(VIEWS))
def test_each_d4_view_keeps_alignment(view):
    augment = build_augment("none")
    augment.views = tuple(VIEWS)
    out = augment(**probe(), view=view, rng=0)
    assert out["view"] == view
    expected_shape = (W, H) if view in ("rot90", "rot270", "transpose", "antitranspose") else (H, W)
    assert out["mask"].shape == expected_shape
    check_aligned(out)


@pytest.mark.parametrize("transform", spatial_transforms("strong"), ids=lambda t: type(t).__name__)
def test_each_spatial_transform_alone_keeps_alignment(transform):
    for seed in range(3):
        out = only(transform)(**probe(), rng=seed)
        check_aligned(out)
        # Bilinear, not nearest: a resampled coordinate map takes values between the integer grid.
        fractional = np.abs(out["teacher"] - np.round(out["teacher"])) > 0.05
        assert fractional.mean() > 0.3


def test_crop_alone_keeps_alignment_and_pads_small_images():
    augment = Augment(Preset(views=("identity",)), crop_size=48)
    out = augment(**probe(), rng=1)
    assert out["image"].shape == (48, 48, 3)
    check_aligned(out)
    big = Augment(Preset(views=("identity",)), crop_size=80)
    out = big(**probe(), rng=1)  # H=64 < 80: reflect-padded, still aligned
    assert out["mask"].shape == (80, 80)
    check_aligned(out)


# Each resampling rounds the mask to the nearest pixel (up to half a pixel off the bilinear map), so
# a chain of two (strong: affine then elastic) needs twice the margin of one (default: affine).
@pytest.mark.parametrize(("preset", "margin"), [("default", 0.6), ("strong", 1.2)])
def test_full_pipeline_keeps_alignment_over_seeds(preset, margin):
    augment = build_augment(preset, crop_size=48)
    views_seen = set()
    for seed in range(8):
        sample = probe()
        sample["image"] = sample["image"].copy()
        # Photometric transforms would scramble the coordinates read from the image, so the
        # alignment check needs the colours untouched: compare against a colour-free twin.
        twin = copy.deepcopy(augment)
        twin.photometric.transforms = []
        out = twin(**sample, rng=seed)
        check_aligned(out, margin=margin)
        views_seen.add(out["view"])
        # The real pipeline (with colour) draws the same geometry: identical mask, roi and map.
        real = augment(**sample, rng=seed)
        assert real["view"] == out["view"]
        for key in ("mask", "roi", "teacher"):
            np.testing.assert_array_equal(real[key], out[key])
    assert len(views_seen) > 1


def test_photometric_transforms_touch_the_image_only():
    transforms = copy.deepcopy(build_augment("default").photometric.transforms)
    for transform in transforms:
        transform.p = 1.0
    augment = Augment(Preset(views=("identity",), photometric=tuple(transforms)))
    rng = np.random.default_rng(0)
    sample = {
        "image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
        "mask": (rng.random((H, W)) > 0.5).astype(np.uint8),
        "roi": np.ones((H, W), np.uint8),
        "teacher": rng.normal(0, 5, (H, W)).astype(np.float16),
    }
    out = augment(**{key: value.copy() for key, value in sample.items()}, rng=3)
    assert not np.array_equal(out["image"], sample["image"])
    for key in ("mask", "roi", "teacher"):
        np.testing.assert_array_equal(out[key], sample[key])


def test_float16_map_comes_back_float16_with_logit_range_intact():
    affine = spatial_transforms("default")[0]
    augment = only(affine)
    sample = probe()
    logits = (sample["teacher"][..., 0] * 0.5 - 24.0).astype(np.float16)  # -24 .. +23.5, no clipping
    out = augment(sample["image"], sample["mask"], sample["roi"], teacher=logits, rng=0)
    assert out["teacher"].dtype == np.float16 and out["teacher"].shape == (H, W)
    assert out["teacher"].min() < -20 and out["teacher"].max() > 20


def test_presets_and_bad_settings():
    assert list_presets() == ["default", "light", "none", "strong"]
    assert build_augment("none").views == ("identity",)
    rng = np.random.default_rng(0)
    assert build_augment("default").sample_view(rng, among=["identity", "hflip"]) in ("identity", "hflip")
    with pytest.raises(ConfigError, match="data.augment"):
        build_augment("heavy")
    with pytest.raises(ConfigError, match="data.crop_size"):
        build_augment("default", crop_size=0)
    with pytest.raises(ConfigError, match="identity"):
        build_augment("none").sample_view(rng, among=["hflip"])


def test_the_same_generator_gives_the_same_sample_and_another_a_different_one():
    augment = build_augment("strong", crop_size=48)
    first, again, other = (augment(**probe(), rng=seed) for seed in (5, 5, 6))
    for key in ("image", "mask", "roi", "teacher"):
        np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first["teacher"], other["teacher"])


def float_edge_cases(dtype) -> np.ndarray:
    """Random logits plus what rounding to float16 gets wrong most easily: ties, subnormals, overflow, specials."""
    rng = np.random.default_rng(0)
    tiny = np.finfo(np.float16).smallest_subnormal
    special = [
        0.0,
        -0.0,
        tiny,
        tiny / 2,
        tiny * 1.5,
        65504.0,
        65520.0,
        70000.0,
        -1e6,
        1 + 2**-11,
        1 + 3 * 2**-11,
    ]
    values = np.concatenate([rng.normal(0, 8, 5000), special, [np.inf, -np.inf, np.nan]])
    return values.astype(dtype)


@pytest.mark.parametrize("source, target", [(np.float16, np.float32), (np.float32, np.float16)])
def test_torch_converts_floats_exactly_as_numpy_does(source, target, tmp_path):
    values = float_edge_cases(source).reshape(-1, 1)
    read_only = np.lib.format.open_memmap(tmp_path / "map.npy", "w+", source, values.shape)
    read_only[:] = values
    read_only = np.load(tmp_path / "map.npy", mmap_mode="r")  # as the cache hands out maps
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not writable" warning leaks to the user
        flipped = converted(read_only[::-1], target)  # a flipped view too
    assert flipped.dtype == target and flipped.flags.c_contiguous
    got, want = flipped[::-1], values.astype(target)
    np.testing.assert_array_equal(got.view(np.uint16 if target == np.float16 else np.uint32)[:-1],
                                  want.view(np.uint16 if target == np.float16 else np.uint32)[:-1])  # fmt: skip
    assert np.isnan(got[-1]).all()  # (NaN payloads may differ)


def test_the_mean_of_cached_views_is_numpys_bit_for_bit():
    maps = [float_edge_cases(np.float16)[:5000].reshape(50, 100) * (i + 1) for i in range(8)]
    total = np.zeros(maps[0].shape, np.float32)
    for logits in maps:
        total += logits
    np.testing.assert_array_equal(
        mean_map(maps).view(np.uint16), (total / 8).astype(np.float16).view(np.uint16)
    )
    assert mean_map(maps[:1]) is maps[0]


def test_cached_views_are_averaged_on_the_window_not_on_the_whole_map(monkeypatch):
    shapes = []
    original = augment_module.mean_map
    monkeypatch.setattr(
        augment_module, "mean_map", lambda maps: shapes.append(maps[0].shape) or original(maps)
    )
    augment = build_augment("default", crop_size=32)
    sample = probe()
    views = [sample["teacher"][..., 0] + k for k in range(8)]  # eight cached views, H x W each
    out = augment(sample["image"], sample["mask"], sample["roi"], teacher=views, view="identity", rng=0)
    (shape,) = shapes  # the window, or the part of the image it covers when an affine reads through it
    assert max(shape) <= augment.window < W
    # The same as averaging first (the window is cut the same way from every view).
    mean = (sample["teacher"][..., 0] + 3.5).astype(np.float32)
    expected = augment(sample["image"], sample["mask"], sample["roi"], teacher=mean, view="identity", rng=0)
    np.testing.assert_allclose(out["teacher"], expected["teacher"], atol=1e-4)


def test_the_window_holds_every_pixel_the_most_extreme_affine_reads():
    """Cut a window, warp it, keep its centre: the centre never shows the window's (reflected) border."""
    spec = AffineSpec(scale=0.15, degrees=20, shift=0.05, p=1.0)
    augment = Augment(Preset(views=("identity",), geometry=(spec,)), crop_size=48)
    side, compose = augment.windows[(True,)]  # when the affine runs
    (shipped,) = compose.transforms  # the transform training uses, pinned to its extreme
    shift = round(spec.shift * 48)
    extreme = spec.albumentations(48, side=shipped.side)
    extreme.scale, extreme.rotate = {"x": (0.85, 0.85), "y": (0.85, 0.85)}, (20, 20)
    extreme.translate_px = {"x": (shift, shift), "y": (shift, shift)}
    augment.windows[(True,)] = (
        side,
        A.Compose([extreme], additional_targets={"roi": "mask", "teacher": "image"}),
    )
    size = 400
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    sample = {
        "image": np.zeros((size, size, 3), np.uint8),
        "mask": np.zeros((size, size), np.uint8),
        "roi": np.ones((size, size), np.uint8),
        "teacher": np.stack([xx, yy], axis=-1),
    }

    def fold(seed: int) -> float:
        """How far the source coordinates of the output stray from one affine map (0: no reflected pixel)."""
        out = augment(**sample, view="identity", rng=seed)["teacher"].reshape(-1, 2)
        rows, cols = np.mgrid[0:48, 0:48].reshape(2, -1)
        design = np.stack([rows, cols, np.ones_like(rows)], axis=1).astype(np.float64)
        fit = np.linalg.lstsq(design, out, rcond=None)[0]
        return float(np.abs(design @ fit - out).max())

    interior = [
        seed
        for seed in range(20)
        if min(augment.sample_window((size, size), np.random.default_rng(seed))[:2]) > 0
        and max(augment.sample_window((size, size), np.random.default_rng(seed))[:2]) + augment.window < size
    ]
    assert len(interior) > 10
    assert max(fold(seed) for seed in interior) < 0.05
    augment.windows[(True,)] = (
        side - 20,
        augment.windows[(True,)][1],
    )  # too small: its reflected border shows
    assert max(fold(seed) for seed in interior) > 1


def test_extra_albumentations_spatial_transforms_see_the_whole_image_before_a_random_crop():
    transform = A.Perspective(scale=(0.05, 0.1), p=1.0, border_mode=cv2.BORDER_REFLECT_101)
    augment = Augment(Preset(views=("identity",), spatial=(transform,)), crop_size=40)
    assert augment.window is None and Preset(views=D4, spatial=(transform,)).window_side(40) is None
    for seed in range(3):
        out = augment(**probe(), rng=seed)
        assert out["mask"].shape == (40, 40)
        check_aligned(out, margin=1.0)


def test_colour_specs_build_both_paths_from_the_same_numbers():
    colour = ColourSpec(strength=1.0, p=0.5)
    assert (
        len(colour.albumentations()) == 6 and len(colour.kornia()) == 7
    )  # brightness/contrast split in kornia
    assert build_augment("default", crop_size=64).window == Preset(
        views=D4, geometry=(AffineSpec(scale=0.15, degrees=20, shift=0.05, p=0.5),)
    ).window_side(64)


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((40, 50, 3), np.uint8),
        ((40, 50), np.uint8),
        ((40, 50, 1), np.uint8),
        ((40, 50), np.float16),
        ((40, 50), np.dtype(">f2")),  # not OpenCV's: numpy pads these
        ((40, 50), np.int64),
        ((40, 50, 2, 2), np.uint8),
    ],
)
def test_a_window_past_the_borders_is_the_image_reflected_without_repeating_its_edge(shape, dtype):
    """cut's fast border (OpenCV) against reflected indices (BORDER_REFLECT_101), on read-only input."""
    array = (np.random.default_rng(0).random(shape) * 250).astype(dtype)
    dtype = np.dtype(dtype)
    array.setflags(write=False)  # as the cache's memory maps are
    rng = np.random.default_rng(1)
    for _ in range(30):
        side = int(rng.integers(20, 60))
        top, left = int(rng.integers(-side // 2, 40)), int(rng.integers(-side // 2, 50))
        rows = reflect(np.arange(top, top + side), shape[0])[:, None]
        cols = reflect(np.arange(left, left + side), shape[1])
        window = cut(array, (top, left, side))
        assert window.shape == (side, side, *shape[2:]) and window.dtype == dtype
        np.testing.assert_array_equal(window, array[rows, cols])


def test_the_centre_cropped_affine_is_affine_then_its_centre_up_to_opencvs_fixed_point():
    """Same parameters, same source points: only OpenCV's 1/32-pixel rounding of the shifted matrix differs."""
    yy, xx = np.mgrid[0:300, 0:300].astype(np.float32)
    smooth = 127 + 100 * np.sin(xx / 13) * np.cos(yy / 17)  # a smooth image, as photographs are
    image = np.repeat(smooth[..., None], 3, axis=2).astype(np.uint8)
    mask = (smooth > 150).astype(np.uint8)
    teacher = (smooth / 50 - 2.5).astype(np.float32)
    spec = AffineSpec(scale=0.15, degrees=20, shift=0.05, p=1.0)
    margin = (300 - 160) // 2
    centre = (slice(margin, margin + 160), slice(margin, margin + 160))
    for seed in range(5):
        whole, cropped = (
            A.Compose([t], additional_targets={"teacher": "image"})
            for t in (spec.albumentations(160), spec.albumentations(160, side=160))
        )
        whole.set_random_seed(seed)
        cropped.set_random_seed(seed)
        a, b = (c(image=image, mask=mask, teacher=teacher) for c in (whole, cropped))
        assert b["image"].shape == (160, 160, 3) and b["mask"].shape == (160, 160)
        assert np.abs(a["image"][centre].astype(int) - b["image"]).max() <= 2
        assert np.abs(a["teacher"][centre] - b["teacher"]).max() < 0.01
        assert (a["mask"][centre] != b["mask"]).mean() < 0.001


def test_a_sample_whose_geometry_does_not_run_cuts_only_its_crop():
    spec = AffineSpec(scale=0.15, degrees=20, shift=0.05, p=0.0)
    augment = Augment(Preset(views=("identity",), geometry=(spec,)), crop_size=32)
    assert augment.windows[(False,)][0] == 32 and augment.window > 32
    image = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    mask = np.zeros((50, 60), np.uint8)
    for seed in range(5):
        out = augment(image, mask, np.ones_like(mask), rng=seed)
        rng = np.random.default_rng(seed)
        augment.sample_view(rng)
        top, left, side = augment.sample_window(mask.shape, rng, 32)  # the crop, drawn as the path does
        np.testing.assert_array_equal(out["image"], cut(image, (top, left, side)))


def test_each_window_transform_reads_and_writes_only_the_centre_the_next_one_needs():
    preset = PRESETS["strong"]()
    window, elastic_reads, crop = preset.sides(256)
    assert crop == 256 and window == preset.window_side(256) > elastic_reads > crop
    affine, cut_to, elastic = build_augment("strong", 256).windows[(True, True)][1].transforms
    assert affine.side == elastic_reads and (cut_to.height, cut_to.width) == (elastic_reads, elastic_reads)
    assert isinstance(elastic, A.ElasticTransform)


TWO_AFFINES = (AffineSpec(0.15, 20, 0.05, 1.0), AffineSpec(0.1, 10, 0.05, 1.0))


@pytest.mark.parametrize("geometry", [TWO_AFFINES[:1], TWO_AFFINES], ids=["affine", "two affines"])
@pytest.mark.parametrize("view", list(VIEWS))
def test_the_first_affine_reads_the_image_as_if_the_window_were_cut_and_turned_first(view, geometry):
    """Its matrix holds the window's offset and D4 view (`CentreCroppedAffine`): the sample equals cutting
    the window, reflecting it past the border, turning it and warping it, up to OpenCV's 1/32-pixel
    rounding of the matrix. Only the first transform reads through the window."""
    yy, xx = np.mgrid[0:70, 0:90].astype(np.float32)
    smooth = 127 + 100 * np.sin(xx / 7) * np.cos(yy / 9)
    sample = {
        "image": np.repeat(smooth[..., None], 3, axis=2).astype(np.uint8),
        "mask": (smooth > 150).astype(np.uint8),
        "roi": (xx < 60).astype(np.uint8),
        "teacher": (smooth / 50 - 2.5).astype(np.float16),
    }
    augment = Augment(Preset(views=D4, geometry=geometry), 32)
    past_border = 0
    for seed in range(8):
        out = augment(**sample, view=view, rng=seed)
        rng = np.random.default_rng(seed)  # the draws of __call__ with the view given: crop, geometry
        window = widened(augment.sample_window((70, 90), rng, 32), augment.geometry_for(rng)[0])
        side, spatial = augment.geometry_for(np.random.default_rng(0))  # the affines' Compose, p = 1
        assert [getattr(t, "reads_window", False) for t in spatial.transforms][:1] == [True]
        assert not any(getattr(t, "reads_window", False) for t in spatial.transforms[1:])
        data = {key: apply_view(cut(value, window), view) for key, value in sample.items()}
        data["teacher"] = data["teacher"].astype(np.float32)
        augment_module._seed(spatial, rng)
        expected = spatial(**data)
        past_border += min(window[:2]) < 0 or window[0] + side > 70 or window[1] + side > 90
        assert np.abs(out["image"].astype(int) - expected["image"]).max() <= 2
        assert np.abs(out["teacher"].astype(np.float32) - expected["teacher"]).max() < 0.02
        assert (out["mask"] != expected["mask"]).mean() < 0.01
        assert (out["roi"] != expected["roi"]).mean() < 0.01
    assert past_border >= 2


def test_an_affine_that_moves_nothing_still_keeps_exactly_the_crop():
    """The folded matrix can be the identity, where albumentations would hand back its input unwarped."""
    augment = Augment(Preset(views=("identity",), geometry=(AffineSpec(0.0, 0.0, 0.0, 1.0),)), 32)
    image = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    mask = np.zeros((32, 40), np.uint8)
    for seed in range(40):
        out = augment(image, mask, np.ones_like(mask), view="identity", rng=seed)
        rng = np.random.default_rng(seed)
        top, left, side = augment.sample_window(mask.shape, rng, 32)  # the crop, drawn as the path does
        np.testing.assert_array_equal(out["image"], image[top : top + side, left : left + side])


PADDED = Preset(
    views=("identity",),
    spatial=(A.PadIfNeeded(96, 128, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0),),
)


@pytest.mark.parametrize(
    "preset, crop_size",
    [("default", 32), ("strong", 32), ("default", None), ("light", 40), (PADDED, None), (PADDED, 40)],
)
def test_a_sample_without_an_roi_is_the_sample_with_an_roi_of_ones(preset, crop_size):
    """Its roi is all ones, except where the preset's extra transforms fill pixels (padding here)."""
    sample = probe()
    augment = build_augment(preset, crop_size) if isinstance(preset, str) else Augment(preset, crop_size)
    for seed in range(6):
        without = augment(sample["image"], sample["mask"], None, teacher=sample["teacher"][..., 0], rng=seed)
        ones = np.ones_like(sample["roi"])
        expected = augment(sample["image"], sample["mask"], ones, teacher=sample["teacher"][..., 0], rng=seed)
        assert without.keys() == expected.keys()
        for key in ("image", "mask", "teacher", "roi"):
            np.testing.assert_array_equal(without[key], expected[key], err_msg=key)
            assert without[key].dtype == expected[key].dtype
    if preset is PADDED and crop_size is None:
        assert (
            without["roi"].shape == (96, 128) and without["roi"].sum() == H * W
        )  # the padding does not count
