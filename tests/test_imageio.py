"""imageio: every image and mask format, written to tmp_path and read back."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from modules.data.imageio import (
    ImageReadError,
    MaskNotTwoDError,
    MaskReadError,
    read_image_rgb,
    read_image_size,
    read_mask,
    resize_mask_nearest,
)

_EXIF_ORIENTATION_TAG = 0x0112


def _random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _disc(height: int, width: int, radius: float) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    return (rows - height / 2 + 0.5) ** 2 + (cols - width / 2 + 0.5) ** 2 <= radius**2


def _iou(first: np.ndarray, second: np.ndarray) -> float:
    return float((first & second).sum() / (first | second).sum())


def _truncate(path, keep_fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def test_rgb_png_round_trips_exactly(tmp_path):
    pixels = _random_rgb(5, 7)
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    decoded = read_image_rgb(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (5, 7, 3)
    np.testing.assert_array_equal(decoded, pixels)


def test_grayscale_is_copied_to_three_channels(tmp_path):
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    path = tmp_path / "grey.png"
    Image.fromarray(grey, mode="L").save(path)
    decoded = read_image_rgb(path)
    assert decoded.shape == (4, 5, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], grey)


def test_rgba_drops_alpha_and_keeps_stored_colour(tmp_path):
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., :3] = _random_rgb(3, 4, seed=1)
    rgba[..., 3] = np.array([0, 64, 128, 255], dtype=np.uint8)[None, :]
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    np.testing.assert_array_equal(read_image_rgb(path), rgba[..., :3])


def test_grey_alpha_drops_alpha(tmp_path):
    grey_alpha = np.stack([np.full((3, 3), 90, np.uint8), np.full((3, 3), 10, np.uint8)], axis=2)
    path = tmp_path / "la.png"
    Image.fromarray(grey_alpha, mode="LA").save(path)
    np.testing.assert_array_equal(read_image_rgb(path), np.full((3, 3, 3), 90, np.uint8))


def test_palette_image_uses_palette_colours(tmp_path):
    indices = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette_colours = [(10, 20, 30), (200, 0, 0), (0, 255, 128)]
    image = Image.fromarray(indices, mode="P")
    image.putpalette([value for colour in palette_colours for value in colour])
    path = tmp_path / "palette.png"
    image.save(path)
    expected = np.array([[palette_colours[index] for index in row] for row in indices], dtype=np.uint8)
    np.testing.assert_array_equal(read_image_rgb(path), expected)


def test_cmyk_tiff_becomes_rgb(tmp_path):
    cmyk = np.zeros((2, 2, 4), dtype=np.uint8)
    cmyk[0, 0] = (0, 0, 0, 0)  # white
    cmyk[0, 1] = (0, 0, 0, 255)  # black
    cmyk[1, 0] = (0, 255, 255, 0)  # red
    cmyk[1, 1] = (255, 0, 255, 0)  # green
    path = tmp_path / "cmyk.tif"
    Image.fromarray(cmyk, mode="CMYK").save(path)
    expected = np.array([[[255, 255, 255], [0, 0, 0]], [[255, 0, 0], [0, 255, 0]]], dtype=np.uint8)
    np.testing.assert_array_equal(read_image_rgb(path), expected)


def test_sixteen_bit_png_is_scaled_by_bit_depth(tmp_path):
    levels = np.array([[0, 257 * 100, 65535], [257 * 7 + 100, 128, 257 * 255 - 1]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)
    assert Image.open(path).mode.startswith("I")
    decoded = read_image_rgb(path)
    expected = np.round(levels / 257).astype(np.uint8)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded[:, :, 0], expected)
    np.testing.assert_array_equal(decoded[:, :, 2], expected)
    # Clipping instead of scaling would turn 257 * 100 into 255.
    assert decoded[0, 1, 0] == 100


def test_exif_orientation_is_applied(tmp_path):
    # Stored 16 x 24 (H x W) with a red left half and a blue right half;
    # orientation 6 means "rotate 90 degrees clockwise to display".
    stored = np.zeros((16, 24, 3), dtype=np.uint8)
    stored[:, :12] = (255, 0, 0)
    stored[:, 12:] = (0, 0, 255)
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION_TAG] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())

    assert read_image_size(path) == (24, 16)
    decoded = read_image_rgb(path)
    assert decoded.shape == (24, 16, 3)
    expected = np.rot90(stored, k=-1)
    # JPEG blurs the colour edge, so compare on average.
    assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 10
    assert decoded[2, 8, 0] > 200 and decoded[2, 8, 2] < 50  # top is red
    assert decoded[21, 8, 2] > 200 and decoded[21, 8, 0] < 50  # bottom is blue


def test_read_image_size_without_exif(tmp_path):
    path = tmp_path / "plain.bmp"
    Image.fromarray(_random_rgb(9, 13)).save(path)
    assert read_image_size(path) == (9, 13)


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated_image_raises_image_read_error(tmp_path, suffix):
    path = tmp_path / f"truncated{suffix}"
    Image.fromarray(_random_rgb(64, 64)).save(path)
    _truncate(path)
    with pytest.raises(ImageReadError) as raised:
        read_image_rgb(path)
    message = str(raised.value)
    assert str(path) in message and "\n" not in message
    # The header alone is intact, so the cheap size query still answers.
    assert read_image_size(path) == (64, 64)


def test_non_image_and_missing_files_raise_image_read_error(tmp_path):
    text_file = tmp_path / "notes.png"
    text_file.write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        read_image_rgb(text_file)
    with pytest.raises(ImageReadError, match="notes.png"):
        read_image_size(text_file)
    with pytest.raises(ImageReadError, match="absent.jpg"):
        read_image_rgb(tmp_path / "absent.jpg")


def test_float_image_is_refused_with_clear_error(tmp_path):
    path = tmp_path / "float.tif"
    Image.fromarray(np.ones((3, 3), dtype=np.float32)).save(path)
    with pytest.raises(ImageReadError, match="unsupported image mode F"):
        read_image_rgb(path)


# ---------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".tif", ".tiff"])
def test_lossless_grey_masks_0_255(tmp_path, suffix):
    truth = _disc(20, 30, 7)
    path = tmp_path / f"mask{suffix}"
    Image.fromarray(truth.astype(np.uint8) * 255, mode="L").save(path)
    mask = read_mask(path)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, truth)


def test_png_mask_with_values_0_1_is_label_image(tmp_path):
    truth = _disc(20, 20, 6)
    path = tmp_path / "labels.png"
    Image.fromarray(truth.astype(np.uint8), mode="L").save(path)
    np.testing.assert_array_equal(read_mask(path), truth)


def test_threshold_applies_to_8_bit_masks(tmp_path):
    levels = np.array([[0, 100, 200, 255]], dtype=np.uint8)
    path = tmp_path / "levels.png"
    Image.fromarray(levels, mode="L").save(path)
    np.testing.assert_array_equal(read_mask(path), [[False, False, True, True]])
    np.testing.assert_array_equal(read_mask(path, threshold=50), [[False, True, True, True]])


def test_sixteen_bit_mask_threshold_is_scaled(tmp_path):
    levels = np.array([[0, 257 * 100, 257 * 200, 65535]], dtype=np.uint16)
    path = tmp_path / "deep_mask.png"
    Image.fromarray(levels).save(path)
    # Unscaled, 257 * 100 would exceed the threshold 127.
    np.testing.assert_array_equal(read_mask(path), [[False, False, True, True]])


@pytest.mark.parametrize("colour", [(255, 255, 255), (255, 0, 0)], ids=["white", "red"])
def test_rgb_jpeg_mask_with_compression_noise(tmp_path, colour):
    truth = _disc(64, 80, 20)
    rgb = np.zeros((64, 80, 3), dtype=np.uint8)
    rgb[truth] = colour
    noise = np.random.default_rng(3).integers(-20, 21, size=rgb.shape)
    rgb = np.clip(rgb.astype(int) + noise, 0, 255).astype(np.uint8)
    path = tmp_path / "mask.jpg"
    Image.fromarray(rgb).save(path, quality=60)
    decoded = np.asarray(Image.open(path))
    assert len(np.unique(decoded)) > 10  # the file really is noisy
    mask = read_mask(path)
    assert mask.shape == truth.shape
    assert _iou(mask, truth) > 0.97


def test_rgba_and_palette_masks(tmp_path):
    truth = _disc(16, 16, 5)
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[truth, :3] = 255
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0
    rgba_path = tmp_path / "mask_rgba.png"
    Image.fromarray(rgba, mode="RGBA").save(rgba_path)
    np.testing.assert_array_equal(read_mask(rgba_path), truth)

    palette = Image.fromarray(truth.astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 128, 0, 0])  # DAVIS-style dark red object
    palette_path = tmp_path / "mask_palette.png"
    palette.save(palette_path)
    np.testing.assert_array_equal(read_mask(palette_path), truth)


@pytest.mark.parametrize(
    "values",
    [
        np.array([[True, False], [False, True]]),
        np.array([[3, 0], [0, 255]], dtype=np.uint8),
        np.array([[0.5, 0.0], [-1.0, 2.0]], dtype=np.float32),
        np.array([[7, 0], [-4, 1]], dtype=np.int64),
    ],
    ids=["bool", "uint8", "float32", "int64"],
)
def test_npy_masks_foreground_is_positive(tmp_path, values):
    path = tmp_path / "mask.npy"
    np.save(path, values)
    np.testing.assert_array_equal(read_mask(path), values > 0)


@pytest.mark.parametrize("shape", [(1, 4, 5), (4, 5, 1), (20,)])
def test_npy_mask_not_2d_is_refused(tmp_path, shape):
    path = tmp_path / "mask.npy"
    np.save(path, np.ones(shape, dtype=np.uint8))
    with pytest.raises(MaskNotTwoDError, match=r"not 2-D, shape \(") as raised:
        read_mask(path)
    assert str(path) in str(raised.value)
    assert isinstance(raised.value, MaskReadError)


def test_corrupt_masks_raise_mask_read_error(tmp_path):
    truncated_npy = tmp_path / "truncated.npy"
    np.save(truncated_npy, np.ones((50, 50), dtype=np.uint8))
    _truncate(truncated_npy)
    truncated_png = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(truncated_png)
    _truncate(truncated_png)
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    not_image = tmp_path / "text.bmp"
    not_image.write_text("hello")
    for path in (truncated_npy, truncated_png, pickled, not_image):
        with pytest.raises(MaskReadError) as raised:
            read_mask(path)
        assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_bad_threshold_is_refused(tmp_path):
    path = tmp_path / "mask.npy"
    np.save(path, np.ones((2, 2)))
    with pytest.raises(ValueError, match="threshold"):
        read_mask(path, threshold=255)


# ---------------------------------------------------------------------------
# Resizing
# ---------------------------------------------------------------------------


def test_resize_mask_nearest_upsamples_by_pixel_replication():
    mask = np.array([[True, False], [False, True]])
    resized = resize_mask_nearest(mask, (4, 6))
    assert resized.dtype == bool and resized.shape == (4, 6)
    np.testing.assert_array_equal(resized, np.kron(mask, np.ones((2, 3), dtype=bool)))


def test_resize_mask_nearest_matches_pil_nearest_on_odd_ratio():
    mask = np.random.default_rng(5).random((13, 17)) > 0.5
    resized = resize_mask_nearest(mask, (7, 29))
    via_pil = np.asarray(
        Image.fromarray(mask.astype(np.uint8) * 255).resize((29, 7), Image.Resampling.NEAREST)
    ) > 0
    np.testing.assert_array_equal(resized, via_pil)
    np.testing.assert_array_equal(resize_mask_nearest(mask, mask.shape), mask)


def test_exif_orientation_in_png_is_applied_by_both_readers(tmp_path):
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION_TAG] = 8  # rotate 90 degrees counter-clockwise to display
    stored = _random_rgb(4, 6, seed=2)
    path = tmp_path / "rotated.png"
    Image.fromarray(stored).save(path, exif=exif.tobytes())
    assert read_image_size(path) == (6, 4)
    np.testing.assert_array_equal(read_image_rgb(path), np.rot90(stored, k=1))
