"""Reading every supported image and mask file into plain numpy arrays.

Images come back as ``H x W x 3`` uint8 RGB, masks as ``H x W`` bool, both in the displayed
(EXIF-oriented) frame. Every bad input raises ``ImageReadError`` or ``MaskReadError`` with a
one-line message that starts with the file path.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps
from modules.core.errors import error_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MASK_EXTENSIONS = IMAGE_EXTENSIONS + (".npy",)

# Full-scale value of an 8-bit channel and the factor that maps it onto a
# 16-bit one (65535 = 255 * 257), used both to scale 16-bit images down and to
# scale the 8-bit mask threshold up.
_UINT8_MAX = 255
_UINT16_MAX = 65535
_UINT16_PER_UINT8 = _UINT16_MAX // _UINT8_MAX

# EXIF orientations 5-8 include a 90 degree rotation, so height and width swap.
_EXIF_ORIENTATION_TAG = 0x0112
_EXIF_ORIENTATIONS_SWAPPING_AXES = (5, 6, 7, 8)

# Exceptions PIL (and the codecs under it) raise for corrupt or truncated data.
# They vary by format and failure point, so the whole set is caught at this
# boundary and turned into one clear error.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)


class ImageReadError(ValueError):
    """An image file could not be read; the message is ``"<path>: <reason>"``."""


class MaskReadError(ValueError):
    """A mask file could not be read; the message is ``"<path>: <reason>"``."""


class MaskNotTwoDError(MaskReadError):
    """A ``.npy`` mask decoded fine but its array is not 2-D."""


@dataclass(frozen=True)
class ImageHeader:
    """What the file header says about an image, in the displayed frame.

    Attributes:
        height: rows after EXIF orientation, pixels.
        width: columns after EXIF orientation, pixels.
        mode: PIL mode of the stored pixels (e.g. ``"RGB"``, ``"L"``, ``"I;16"``).
    """

    height: int
    width: int
    mode: str


def has_extension(path: str | Path, extensions: tuple[str, ...]) -> bool:
    """True when ``path`` ends with one of ``extensions`` (case-insensitive)."""
    return Path(path).suffix.lower() in extensions


# ---------------------------------------------------------------------------
# Header-only access
# ---------------------------------------------------------------------------


def _header_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag if the already-parsed header holds it.

    PNG may put its eXIf chunk after the pixel data, and PIL's ``getexif``
    then decodes the whole file to reach it; such late chunks (rare: PIL and
    most tools write eXIf first) are not looked for here, only by the full
    decode in ``read_image_rgb`` / ``read_mask``.
    """
    if image.format == "PNG" and "exif" not in image.info:
        return None
    return image.getexif().get(_EXIF_ORIENTATION_TAG)


def probe_image(path: str | Path) -> ImageHeader:
    """Read size and pixel mode from the header only (no pixel decoding).

    Raises:
        ImageReadError: the file is missing or not a recognised image.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            mode = image.mode
            orientation = _header_orientation(image)
    except _DECODE_ERRORS as error:
        raise ImageReadError(f"{path}: cannot read image header ({error_line(error)})") from None
    if orientation in _EXIF_ORIENTATIONS_SWAPPING_AXES:
        height, width = width, height
    return ImageHeader(height=height, width=width, mode=mode)


def read_image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image after EXIF orientation, from the header only."""
    header = probe_image(path)
    return header.height, header.width


# ---------------------------------------------------------------------------
# Full decoding
# ---------------------------------------------------------------------------


def _decode_oriented(path: str | Path, error_type: type[ValueError]) -> Image.Image:
    """Open, fully decode and EXIF-orient an image file.

    ``load()`` forces every byte of pixel data to be decoded here, so truncated
    files fail now rather than later in some array conversion.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as error:
        raise error_type(f"{path}: truncated, corrupt or not an image ({error_line(error)})") from None


def _sixteen_bit_levels(image: Image.Image, path: str | Path, error_type: type[ValueError]) -> np.ndarray:
    """``H x W`` int array of a single-channel integer image in ``[0, 65535]``.

    Mode ``"I"`` is PIL's 32-bit signed integer mode; older Pillow versions
    decode 16-bit PNGs into it, so it is accepted only when every value lies
    in the 16-bit range (anything else has no known bit depth to scale by).
    """
    levels = np.asarray(image).astype(np.int64)
    if levels.size and (levels.min() < 0 or levels.max() > _UINT16_MAX):
        raise error_type(
            f"{path}: {image.mode} image values span [{levels.min()}, {levels.max()}], "
            "outside the 16-bit range"
        )
    return levels


# --- images ----------------------------------------------------------------


def _rgb_via_pil(image: Image.Image, path: str | Path) -> np.ndarray:
    # PIL's RGBA/LA/PA -> RGB conversion drops alpha and keeps the stored
    # colour values (no compositing); fully transparent pixels therefore show
    # whatever colour the file stored for them.
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _rgb_from_sixteen_bit(image: Image.Image, path: str | Path) -> np.ndarray:
    levels = _sixteen_bit_levels(image, path, ImageReadError)
    grey = np.round(levels / _UINT16_PER_UINT8).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


# PIL mode -> converter to ``H x W x 3`` uint8. Modes not listed are refused.
_RGB_CONVERTERS: dict[str, Callable[[Image.Image, str | Path], np.ndarray]] = {
    "RGB": _rgb_via_pil,
    "RGBA": _rgb_via_pil,  # alpha dropped
    "RGBX": _rgb_via_pil,
    "L": _rgb_via_pil,  # grey copied to all three channels
    "LA": _rgb_via_pil,  # alpha dropped
    "1": _rgb_via_pil,  # bilevel -> 0 / 255
    "P": _rgb_via_pil,  # palette looked up, transparency ignored
    "PA": _rgb_via_pil,
    "CMYK": _rgb_via_pil,
    "YCbCr": _rgb_via_pil,
    "I;16": _rgb_from_sixteen_bit,  # value / 257, rounded
    "I;16L": _rgb_from_sixteen_bit,
    "I;16B": _rgb_from_sixteen_bit,
    "I;16N": _rgb_from_sixteen_bit,
    "I": _rgb_from_sixteen_bit,
}


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file into ``H x W x 3`` uint8 RGB in the displayed frame.

    Conversions: grey (``L``, ``1``) is copied to all channels; alpha (``LA``,
    ``RGBA``, ``PA``) is dropped without compositing; palette and CMYK go
    through PIL's colour conversion; 16-bit grey (``I;16*``, and ``I`` holding
    16-bit values) is scaled by its bit depth, ``round(value / 257)``.

    Raises:
        ImageReadError: missing, non-image, truncated or corrupt file, or an
            unsupported pixel mode (e.g. 32-bit float ``F``).
    """
    image = _decode_oriented(path, ImageReadError)
    converter = _RGB_CONVERTERS.get(image.mode)
    if converter is None:
        raise ImageReadError(f"{path}: unsupported image mode {image.mode}")
    return converter(image, path)


# --- masks -----------------------------------------------------------------


def _grey_from_channel_max(image: Image.Image, path: str | Path) -> tuple[np.ndarray, int]:
    # The brightest channel, not luminance: a pure red or blue foreground
    # (luminance 76 / 29) must still count, and JPEG's chroma noise on black
    # or white stays far from the threshold either way.
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return rgb.max(axis=2), _UINT8_MAX


def _grey_from_luma(image: Image.Image, path: str | Path) -> tuple[np.ndarray, int]:
    return np.asarray(image.convert("L"), dtype=np.uint8), _UINT8_MAX


def _grey_from_sixteen_bit(image: Image.Image, path: str | Path) -> tuple[np.ndarray, int]:
    return _sixteen_bit_levels(image, path, MaskReadError), _UINT16_MAX


# PIL mode -> ``(H x W grey levels, full-scale value)``. Modes not listed are
# refused (save such masks as .npy instead).
_MASK_GREY_READERS: dict[str, Callable[[Image.Image, str | Path], tuple[np.ndarray, int]]] = {
    "L": _grey_from_luma,
    "1": _grey_from_luma,  # bilevel -> 0 / 255
    "LA": _grey_from_luma,  # alpha ignored
    "RGB": _grey_from_channel_max,
    "RGBA": _grey_from_channel_max,  # alpha ignored
    "RGBX": _grey_from_channel_max,
    "P": _grey_from_channel_max,  # palette colour, not palette index
    "PA": _grey_from_channel_max,
    "I;16": _grey_from_sixteen_bit,
    "I;16L": _grey_from_sixteen_bit,
    "I;16B": _grey_from_sixteen_bit,
    "I;16N": _grey_from_sixteen_bit,
    "I": _grey_from_sixteen_bit,
}


def _read_npy_mask(path: str | Path) -> np.ndarray:
    try:
        values = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise MaskReadError(f"{path}: truncated, corrupt or not a .npy array ({error_line(error)})") from None
    if not isinstance(values, np.ndarray):  # an .npz archive behind a .npy name
        values.close()
        raise MaskReadError(f"{path}: holds an .npz archive, not a single array")
    if values.dtype.kind not in "biuf":
        raise MaskReadError(f"{path}: unsupported dtype {values.dtype} (need bool, integer or float)")
    if values.ndim != 2:
        raise MaskNotTwoDError(f"{path}: not 2-D, shape {tuple(values.shape)}")
    # NaN compares False, so it counts as background.
    return values > 0


def _read_image_mask(path: str | Path, threshold: int) -> np.ndarray:
    image = _decode_oriented(path, MaskReadError)
    grey_reader = _MASK_GREY_READERS.get(image.mode)
    if grey_reader is None:
        raise MaskReadError(f"{path}: unsupported mask image mode {image.mode} (save it as .npy)")
    grey, full_scale = grey_reader(image, path)
    if grey.size and grey.max() == 1:
        # A 0/1 label image (common for PNG masks) would be all background
        # under a 0-255 threshold.
        return grey >= 1
    return grey > threshold * (full_scale // _UINT8_MAX)


def read_mask(path: str | Path, threshold: int = 127) -> np.ndarray:
    """Read a mask file into an ``H x W`` bool array (True = foreground).

    ``.npy``: loaded without pickle; must be exactly 2-D (a singleton
    ``1 x H x W`` or ``H x W x 1`` is refused, not squeezed); any bool,
    integer or float dtype; foreground = value > 0 (NaN = background).

    Image files: EXIF orientation applied, then reduced to one grey level per
    pixel: ``L``/``LA`` use the grey channel, ``RGB``/``RGBA``/``P`` the
    maximum over the R, G, B channels of the pixel's colour (see
    ``_grey_from_channel_max``), alpha ignored. Foreground = grey > threshold
    for 8-bit masks and grey > threshold * 257 for 16-bit ones. Exception: a
    mask whose maximum grey level is exactly 1 is a 0/1 label image and
    foreground = grey >= 1.

    Args:
        path: mask file with one of ``MASK_EXTENSIONS``.
        threshold: 8-bit grey threshold in ``[0, 254]``.

    Raises:
        MaskNotTwoDError: a ``.npy`` array that is not 2-D.
        MaskReadError: missing, truncated or corrupt file, unsupported dtype
            or pixel mode.
        ValueError: ``threshold`` out of range.
    """
    if not 0 <= threshold < _UINT8_MAX:
        raise ValueError(f"mask threshold must be in [0, {_UINT8_MAX - 1}], got {threshold}")
    if has_extension(path, (".npy",)):
        return _read_npy_mask(path)
    return _read_image_mask(path, threshold)


def resize_mask_nearest(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``H_in x W_in`` mask to ``size = (H, W)``.

    Output pixel ``(i, j)`` takes the input pixel whose area contains the
    output pixel's centre, i.e. row ``floor((i + 0.5) * H_in / H)``, so both
    grids share their outer edges (no half-pixel shift).

    Returns:
        ``H x W`` bool array.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
    target_h, target_w = size
    if target_h <= 0 or target_w <= 0:
        raise ValueError(f"target size must be positive, got {size}")
    source_h, source_w = mask.shape
    rows = np.minimum(((np.arange(target_h) + 0.5) * source_h / target_h).astype(np.int64), source_h - 1)
    cols = np.minimum(((np.arange(target_w) + 0.5) * source_w / target_w).astype(np.int64), source_w - 1)
    return mask.astype(bool)[rows[:, None], cols[None, :]]
