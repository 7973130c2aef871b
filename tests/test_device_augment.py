"""The device path (kornia, a whole batch at a time) on CPU tensors: views, windows, alignment, seeds, refusals.

The probe is that of test_augment: pixel (row y, column x) has image colour (2x, 2y, 0) and teacher
logit x; the mask is a checkerboard and the roi vertical stripes. After the batch's views and
warps, the coordinates read from the image and the teacher must agree and the mask/roi must be the
pattern at those coordinates (away from pattern edges).
"""

import numpy as np
import pytest
import torch

from distill.data.augment import D4, AffineSpec, Augment, ColourSpec, ElasticSpec, Preset, build_augment, cut
from distill.data.datamodule import VesselDataModule
from distill.data.device_augment import D4_FLAGS, DeviceAugment, ResidentSplit, apply_views
from distill.data.record import Record
from distill.data.sampling import Draw
from distill.errors import ConfigError
from distill.views import apply_view

H, W = 64, 96
MASK_CELL, ROI_STRIPE = 6, 5


def probe_record(item_id: str = "probe") -> tuple[Record, np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    image = np.stack([2 * xx, 2 * yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)
    mask = ((xx // MASK_CELL + yy // MASK_CELL) % 2).astype(np.uint8)
    roi = ((xx // ROI_STRIPE) % 2).astype(np.uint8)
    return Record(id=item_id, image=image, mask=mask, roi=roi, source="probe"), xx.astype(np.float16)


def test_each_d4_view_is_the_numpy_view():
    x = np.random.default_rng(0).normal(size=(5, 5, 2)).astype(np.float32)
    for view in D4:
        out = apply_views(torch.from_numpy(x).permute(2, 0, 1)[None], torch.tensor([D4_FLAGS[view]]).bool())
        np.testing.assert_array_equal(out[0].permute(1, 2, 0).numpy(), apply_view(x, view), err_msg=view)


def test_windows_are_the_worker_paths_windows_inside_outside_and_across_sizes():
    rng = np.random.default_rng(0)
    records, maps = [], []
    for i, (h, w) in enumerate([(20, 30), (25, 17), (9, 40)]):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask, roi = (rng.random((h, w)) > 0.5).astype(np.uint8), (rng.random((h, w)) > 0.5).astype(np.uint8)
        records.append(Record(id=f"r{i}", image=image, mask=mask, roi=roi, source="test"))
        maps.append(rng.normal(size=(h, w)).astype(np.float16))
    store = ResidentSplit(records, maps)
    for top, left in [(0, 0), (-7, 3), (5, -20), (15, 12), (-30, -30)]:
        for index, record in enumerate(records):
            windows = store.cut(torch.tensor([index]), torch.tensor([top]), torch.tensor([left]), side=24)
            expected = {
                "image": cut(record.image, (top, left, 24)),
                "planes": np.stack([cut(record.mask, (top, left, 24)), cut(record.roi, (top, left, 24))], -1),
                "teacher": cut(maps[index], (top, left, 24))[..., None],
            }
            for key, value in expected.items():
                np.testing.assert_array_equal(windows[key][0].numpy(), value, err_msg=f"{key} {top},{left}")


def check_aligned(batch: dict, margin: float = 1.0) -> None:
    map_x = batch["teacher"][:, 0].float().numpy()
    image_x = batch["image"][:, 0].float().numpy() / 2
    image_y = batch["image"][:, 1].float().numpy() / 2
    assert np.abs(image_x - map_x).max() < 0.75

    def away_from_edges(period: int, coordinate: np.ndarray) -> np.ndarray:
        edge_distance = np.abs((coordinate + 0.5) / period - np.round((coordinate + 0.5) / period)) * period
        return edge_distance > margin

    cells = (np.floor((map_x + 0.5) / MASK_CELL) + np.floor((image_y + 0.5) / MASK_CELL)) % 2
    safe = away_from_edges(MASK_CELL, map_x) & away_from_edges(MASK_CELL, image_y)
    assert safe.mean() > 0.2
    np.testing.assert_array_equal(batch["mask"][:, 0].numpy()[safe], cells[safe])
    stripes = np.floor((map_x + 0.5) / ROI_STRIPE) % 2
    safe = away_from_edges(ROI_STRIPE, map_x)
    np.testing.assert_array_equal(batch["roi"][:, 0].numpy()[safe], stripes[safe])


@pytest.mark.parametrize("preset", ["light", "default", "strong"])
def test_the_batch_keeps_image_mask_roi_and_teacher_aligned(preset):
    record, teacher = probe_record()
    store = ResidentSplit([record], [teacher])
    real = build_augment(preset, crop_size=40)
    colourless = Augment(Preset(views=real.views, geometry=real.preset.geometry), crop_size=40)
    draws = [Draw(0, n) for n in range(12)]
    out = DeviceAugment(colourless, "cpu")(store, draws, seed=3)
    assert out["image"].shape == (12, 3, 40, 40) and out["teacher"].dtype == torch.float16
    check_aligned(out)
    # Warped, not only moved: bilinear teacher logits fall between the integer grid.
    if real.preset.geometry:
        fractional = (out["teacher"].float() - out["teacher"].float().round()).abs() > 0.05
        assert fractional.float().mean() > 0.1
    # Colour changes the image alone: the same seed draws the same geometry.
    coloured = DeviceAugment(real, "cpu")(store, draws, seed=3)
    for key in ("mask", "roi", "teacher"):
        assert torch.equal(coloured[key], out[key]), key
    if real.preset.colour is not None:
        assert not torch.equal(coloured["image"], out["image"])


def test_a_batch_is_repeatable_from_its_seed_and_draw_numbers():
    record, teacher = probe_record()
    store = ResidentSplit([record], [teacher])
    device = DeviceAugment(build_augment("strong", crop_size=40), "cpu")
    draws = [Draw(0, n) for n in (4, 9, 17)]
    first, again = device(store, draws, seed=1), device(store, draws, seed=1)
    other = device(store, [Draw(0, n) for n in (5, 9, 17)], seed=1)
    for key in ("image", "mask", "roi", "teacher"):
        assert torch.equal(first[key], again[key]), key
    assert not torch.equal(first["teacher"], other["teacher"])


def test_match_mode_picks_each_samples_view_from_the_stored_views():
    record, _ = probe_record()
    views = ("identity", "hflip", "rot90")
    levels = np.stack([np.full((H, W), 10 * k, np.float16) for k in range(len(views))], axis=-1)
    store = ResidentSplit([record], [levels], teacher_views=views)
    augment = Augment(Preset(views=D4), crop_size=32)
    out = DeviceAugment(augment, "cpu")(store, [Draw(0, n) for n in range(20)], seed=0)
    seen = {views[int(level) // 10] for level in out["teacher"][:, 0, 0, 0].tolist()}
    assert seen == set(views)  # views outside the cache are never sampled
    for i in range(20):
        rng = np.random.default_rng([0, i])
        assert views[int(out["teacher"][i, 0, 0, 0]) // 10] == augment.sample_view(rng, views)


def test_the_device_path_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match="data.crop_size"):
        DeviceAugment(build_augment("default"), "cpu")
    with pytest.raises(ConfigError, match="workers"):
        VesselDataModule(augment_on="device", crop_size=48, skeletons=True)
    with pytest.raises(ConfigError, match="data.augment_on"):
        VesselDataModule(augment_on="gpu")


def test_specs_build_kornia_twins_with_the_windows_reach():
    preset = Preset(
        views=D4,
        geometry=(
            AffineSpec(scale=0.25, degrees=45, shift=0.1, p=0.7),
            ElasticSpec(alpha=30, sigma=6, p=0.3),
        ),
        colour=ColourSpec(strength=1.0, p=0.5),
    )
    window = preset.window_side(64)
    assert window > 2 * 64 and (window - 64) % 2 == 0
    affine, elastic = (spec.kornia(64, window) for spec in preset.geometry)
    assert (type(affine).__name__, affine.p, type(elastic).__name__) == (
        "RandomAffine",
        0.7,
        "RandomElasticTransform",
    )
