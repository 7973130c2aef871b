"""Files as real tools write them decode as their authors saw them: EXIF orientation, palette and 1-bit
masks, JPEG masks, and 16-bit grayscale holding 12-bit data. Each fixture is made the way the tool
writes it (Pillow's own writers, tifffile)."""

import io
import json
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from distill.data import open_dataset
from distill.data.images import DecodeWarning, decode_facts, read_binary_mask, read_image
from distill.errors import ConfigError, DatasetError

# Pillow's transpose that undoes each EXIF orientation (the inverse of what a viewer applies).
UNDO = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_picture(height: int = 40, width: int = 64) -> np.ndarray:
    """A picture no flip or rotation maps onto itself: a white block top-left, a grey one bottom-right."""
    picture = np.zeros((height, width, 3), np.uint8)
    picture[:16, :24] = 255
    picture[-8:, -16:] = 120
    return picture


def save_as_camera(path, upright: np.ndarray, orientation: int, **save) -> None:
    """Store `upright` the way a camera does: sensor pixels plus the EXIF Orientation that makes them upright."""
    image = Image.fromarray(upright)
    if UNDO[orientation] is not None:
        image = image.transpose(UNDO[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, **save)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(tmp_path, orientation):
    upright = upright_picture()
    save_as_camera(tmp_path / "photo.jpg", upright, orientation, quality=95)
    with Image.open(tmp_path / "photo.jpg") as stored:
        assert stored.getexif()[0x0112] == orientation  # the fixture is what the camera wrote
    pixels = read_image(tmp_path / "photo.jpg")
    assert pixels.shape == upright.shape
    assert np.abs(pixels.astype(int) - upright).mean() < 3  # JPEG noise only, not another orientation


@pytest.mark.parametrize("orientation", [3, 6])
def test_labelme_annotation_of_an_exif_photo_lands_on_what_was_drawn(tmp_path, orientation):
    """LabelMe shows (and sizes) the EXIF-applied view; its polygon around the white block stays on it."""
    upright = upright_picture()
    save_as_camera(tmp_path / "photo.jpg", upright, orientation, quality=95)
    block = [[0, 0], [24, 0], [24, 16], [0, 16]]
    document = {
        "version": "5.5.0",
        "shapes": [{"label": "vessel", "points": block, "shape_type": "polygon", "flags": {}}],
        "imagePath": "photo.jpg",
        "imageData": None,
        "imageHeight": upright.shape[0],
        "imageWidth": upright.shape[1],
    }
    (tmp_path / "photo.json").write_text(json.dumps(document))
    record = open_dataset("labelme", tmp_path).get("photo")
    assert record.mask.sum() == 16 * 24
    assert record.image[record.mask.astype(bool)].mean() > 240


def test_mask_folder_pairs_an_exif_photo_with_a_mask_drawn_upright(tmp_path):
    upright = upright_picture()
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    save_as_camera(tmp_path / "images" / "a.jpg", upright, 6, quality=95)
    mask = np.zeros(upright.shape[:2], np.uint8)
    mask[:16, :24] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    # A mask that kept the photo's EXIF (copied by an editor) is turned the same way.
    save_as_camera(tmp_path / "masks" / "b.png", mask, 6)
    save_as_camera(tmp_path / "images" / "b.jpg", upright, 6, quality=95)
    ds = open_dataset("mask_folder", tmp_path)
    for item in ("a", "b"):
        record = ds.get(item)
        np.testing.assert_array_equal(record.mask, mask > 0)
        assert record.image[record.mask.astype(bool)].mean() > 240


def test_only_files_the_new_decoding_changes_get_a_new_input_hash(tmp_path):
    """An EXIF-turned photo or 16-bit grayscale was decoded otherwise before, so a teacher cache made then
    must not match; a plain file's hash (and every cache made from plain files) stays as it was."""
    Image.fromarray(upright_picture()).save(tmp_path / "plain.png")
    save_as_camera(tmp_path / "turned.jpg", upright_picture(), 6, quality=95)
    tifffile.imwrite(tmp_path / "wide.tif", twelve_bit_angiogram())
    assert decode_facts(tmp_path / "plain.png") == {}
    assert decode_facts(tmp_path / "turned.jpg") == {"orientation": 6}
    assert decode_facts(tmp_path / "wide.tif") == {"wide": "detected"}
    assert decode_facts(tmp_path / "wide.tif", bit_depth=12) == {"wide": 12}


def thin_vessels() -> np.ndarray:
    """0/255 mask of two 2-px vessels, 66 px of 600 as in the issue's example."""
    mask = np.zeros((20, 30), np.uint8)
    mask[5:7, 3:24] = 255  # 42 px
    mask[8:20, 26:28] = 255  # 24 px
    return mask


def test_a_mask_drawn_on_a_transparent_layer_is_read_as_a_viewer_shows_it(tmp_path):
    """Image editors export a vessel layer as RGBA: red vessels on transparent pixels that store white.
    Dropping alpha read every transparent pixel as vessel (a full mask, no warning)."""
    vessels = thin_vessels() > 0
    rgba = np.zeros((*vessels.shape, 4), np.uint8)
    rgba[..., :3] = 255  # transparent white
    rgba[vessels] = (220, 0, 0, 255)  # opaque red vessels
    Image.fromarray(rgba, "RGBA").save(tmp_path / "layer.png")
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "layer.png"), vessels)
    la = np.zeros((*vessels.shape, 2), np.uint8)
    la[..., 0], la[vessels] = 255, (255, 255)
    Image.fromarray(la, "LA").save(tmp_path / "gray_layer.png")
    np.testing.assert_array_equal(read_binary_mask(tmp_path / "gray_layer.png"), vessels)


def test_quantized_palette_mask_is_read_by_colour_not_index(tmp_path):
    mask = thin_vessels()
    quantized = Image.fromarray(mask).convert("RGB").quantize(2)
    assert quantized.getpalette()[:6] == [255, 255, 255, 0, 0, 0]  # [white, black]: vessels are index 0
    quantized.save(tmp_path / "m.png")
    read = read_binary_mask(tmp_path / "m.png")
    assert read.sum() == 66
    np.testing.assert_array_equal(read, mask > 0)


@pytest.mark.parametrize("writer", ["1-bit png", "1-bit bmp, white-black palette"])
def test_one_bit_masks_are_read_by_colour(tmp_path, writer):
    mask = thin_vessels()
    if writer == "1-bit png":
        Image.fromarray(mask).convert("1").save(tmp_path / "m.png")
        path = tmp_path / "m.png"
    else:
        indexed = Image.fromarray((mask == 0).astype(np.uint8)).convert("P")
        indexed.putpalette([255, 255, 255, 0, 0, 0])
        indexed.save(tmp_path / "m.bmp", bits=1)
        path = tmp_path / "m.bmp"
    np.testing.assert_array_equal(read_binary_mask(path), mask > 0)


def test_palette_roi_is_read_by_colour(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "roi").mkdir()
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(thin_vessels()).save(tmp_path / "masks" / "a.png")
    field_of_view = np.zeros((20, 30), np.uint8)
    field_of_view[2:18, 2:28] = 255
    Image.fromarray(field_of_view).convert("RGB").quantize(2).save(tmp_path / "roi" / "a.png")
    record = open_dataset("mask_folder", tmp_path).get("a")
    np.testing.assert_array_equal(record.roi, field_of_view > 0)


def test_jpeg_mask_is_cut_at_mid_range_and_named(tmp_path):
    mask = thin_vessels()
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=75)
    with Image.open(tmp_path / "m.jpg") as lossy:
        assert (np.asarray(lossy) > 0).sum() > 2 * 66  # nonzero-as-vessel would widen every vessel
    with pytest.warns(DecodeWarning, match="JPEG masks") as caught:
        read = read_binary_mask(tmp_path / "m.jpg")
    assert caught[0].message.source == tmp_path / "m.jpg"
    assert (read & (mask > 0)).sum() / (read | (mask > 0)).sum() > 0.9


def test_zero_one_and_zero_255_masks_read_the_same_without_a_note(tmp_path):
    mask = thin_vessels()
    Image.fromarray(mask // 255).save(tmp_path / "ones.png")
    Image.fromarray(mask).save(tmp_path / "full.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_binary_mask(tmp_path / "ones.png"), mask > 0)
        np.testing.assert_array_equal(read_binary_mask(tmp_path / "full.png"), mask > 0)


def twelve_bit_angiogram() -> np.ndarray:
    """HxW uint16 X-ray-like data in 12 bits (0..4095), as a DSA scanner stores it in a 16-bit container."""
    ramp = np.linspace(0, 4095, 24 * 32).reshape(24, 32)
    return np.round(ramp).astype(np.uint16)


@pytest.mark.parametrize("writer", ["tifffile", "pillow I;16 png"])
def test_twelve_bit_data_in_sixteen_bits_fills_the_eight_bit_range(tmp_path, writer):
    data = twelve_bit_angiogram()
    path = tmp_path / ("x.tif" if writer == "tifffile" else "x.png")
    if writer == "tifffile":
        tifffile.imwrite(path, data)
    else:
        Image.fromarray(data).save(path)
    with Image.open(path) as stored:
        assert stored.mode == "I;16"
    with pytest.warns(DecodeWarning, match="read as 12-bit data"):
        pixels = read_image(path)
    expected = np.round(data * (255 / 4095)).astype(np.uint8)
    np.testing.assert_array_equal(pixels, np.repeat(expected[:, :, None], 3, axis=2))
    assert pixels.max() == 255  # not 16, the old 1/257 scaling


def test_bit_depth_option_fixes_one_depth_and_refuses_data_beyond_it(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    dark = (twelve_bit_angiogram() // 5).astype(np.uint16)  # 12-bit data that stays below 1024
    tifffile.imwrite(tmp_path / "images" / "dark.tif", dark)
    Image.fromarray(np.zeros(dark.shape, np.uint8)).save(tmp_path / "masks" / "dark.png")
    with pytest.warns(DecodeWarning, match="read as 10-bit data"):
        detected = open_dataset("mask_folder", tmp_path).get("dark").image
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = open_dataset("mask_folder", tmp_path, bit_depth=12)
        image = fixed.get("dark").image
    np.testing.assert_array_equal(image[:, :, 0], np.round(dark * (255 / 4095)).astype(np.uint8))
    assert (
        detected.max() == 204 and image.max() == 51
    )  # guessed from the image: 4x brighter than its siblings
    assert fixed.input_hash("dark") != open_dataset("mask_folder", tmp_path).input_hash("dark")
    with pytest.raises(DatasetError, match=r"dark.tif: has values up to 819, more than bit_depth=8"):
        open_dataset("mask_folder", tmp_path, bit_depth=8).get("dark")
    with pytest.raises(ConfigError, match="bit_depth=20"):
        open_dataset("mask_folder", tmp_path, bit_depth=20)


def test_sixteen_bit_rgb_reads_as_before(tmp_path):
    """16-bit RGB stays what Pillow makes of it (each channel's high byte): no range detection there."""
    data = (np.arange(24 * 32 * 3).reshape(24, 32, 3) * 23).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tif", data, photometric="rgb")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = read_image(tmp_path / "rgb.tif")
    with Image.open(tmp_path / "rgb.tif") as image:
        np.testing.assert_array_equal(pixels, np.asarray(image.convert("RGB")))


def test_embedded_bytes_decode_like_files(tmp_path):
    upright = upright_picture()
    buffer = io.BytesIO()
    save_as_camera(buffer, upright, 8, format="PNG")
    assert np.array_equal(read_image(tmp_path / "x.json", buffer.getvalue()), upright)


def test_read_image_gives_an_array_torch_can_take_as_it_is(tmp_path):
    """Writable: torch.from_numpy of a read-only array warns (every predict run did), and shares it."""
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((6, 8), np.uint16)).save(tmp_path / "b.png")
    for name in ("a.png", "b.png"):
        image = read_image(tmp_path / name)
        assert image.flags.writeable and image.flags.c_contiguous, name
