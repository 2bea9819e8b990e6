"""The demo data set on disk: scenes written in mixed file formats, with markers that make reruns safe.

``write_demo_dataset`` renders ``demo_scenes`` into ``images_root/<group>/`` and
``masks_root/<group>/``; a marker written first and one written last let a rerun skip a finished
data set, finish an interrupted one, and refuse to touch folders this generator did not write.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from modules.core.errors import PipelineError
from modules.core.fileio import atomic_write_bytes, atomic_write_json
from modules.data import demo_scenes
from modules.data.demo_scenes import GENERATOR_VERSION, GROUPS, is_non_negative_int, scene_seed

#: Completion marker written last into ``images_root`` by ``write_demo_dataset``.
MARKER_NAME = ".demo_complete.json"
#: Written first into ``images_root`` so that an interrupted run is recognised as ours.
IN_PROGRESS_NAME = ".demo_in_progress.json"


class DemoDatasetError(PipelineError, ValueError):
    """The demo data set cannot be written where the config asks (one line naming the key)."""


_GENERATOR_ID = "modules.demo_data"
_STEM_PATTERN = re.compile(r"^scene_\d{4,}$")


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _encode_jpeg(array: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass(frozen=True)
class _FileFormat:
    """How one image or mask is stored: the file extension and ``encode(array) -> bytes``."""

    extension: str
    encode: Callable[[np.ndarray], bytes]


#: Image formats; ``encode`` takes the ``H x W x 3`` uint8 image.
_IMAGE_FORMATS: dict[str, _FileFormat] = {
    "png_rgb": _FileFormat(".png", _encode_png),
    "jpeg_rgb": _FileFormat(".jpg", lambda image: _encode_jpeg(image, quality=92)),
    "png_rgba": _FileFormat(".png", lambda image: _encode_png(np.dstack([image, np.full_like(image[..., 0], 255)]))),
    "png_gray8": _FileFormat(".png", lambda image: _encode_png(np.ascontiguousarray(image[..., 0]))),
    # 16-bit grayscale (PIL mode I;16), 0-255 stretched to 0-65535 by x257.
    "png_gray16": _FileFormat(".png", lambda image: _encode_png(image[..., 0].astype(np.uint16) * np.uint16(257))),
}
#: Mask formats; ``encode`` takes the ``H x W`` bool mask.
_MASK_FORMATS: dict[str, _FileFormat] = {
    "png_0_255": _FileFormat(".png", lambda mask: _encode_png(mask.astype(np.uint8) * np.uint8(255))),
    # Lossy on purpose: readers must threshold (the 0/255 levels survive well above/below 127).
    "jpeg_0_255": _FileFormat(".jpg", lambda mask: _encode_jpeg(mask.astype(np.uint8) * np.uint8(255), quality=75)),
    "npy_bool": _FileFormat(".npy", lambda mask: _encode_npy(mask.astype(bool))),
    "png_0_1": _FileFormat(".png", lambda mask: _encode_png(mask.astype(np.uint8))),
    "npy_uint8": _FileFormat(".npy", lambda mask: _encode_npy(mask.astype(np.uint8))),
}
_COLOUR_IMAGE_CYCLE = ("png_rgb", "jpeg_rgb", "png_rgba")
_GRAY_IMAGE_CYCLE = ("png_gray8", "png_gray16")
_MASK_CYCLE = ("png_0_255", "jpeg_0_255", "npy_bool", "png_0_1", "npy_uint8")
# JPEG noise would blur the 1-4 px structures beyond recognition.
_THIN_MASK_CYCLE = ("png_0_255", "npy_bool", "png_0_1", "npy_uint8")


@dataclass(frozen=True)
class _PlannedScene:
    group: str
    index: int
    image_path: Path
    mask_path: Path
    image_format: str
    mask_format: str


def _plan_dataset(images_root: Path, masks_root: Path, scenes_per_group: int) -> list[_PlannedScene]:
    """Every scene of the data set with its file paths and formats (a fixed mix per index)."""
    plan = []
    for group_position, group in enumerate(GROUPS):
        image_cycle = _GRAY_IMAGE_CYCLE if group == "medical_gray" else _COLOUR_IMAGE_CYCLE
        mask_cycle = _THIN_MASK_CYCLE if group == "thin" else _MASK_CYCLE
        for index in range(scenes_per_group):
            # Offsetting by the group position varies which formats each group gets.
            image_format = image_cycle[(index + group_position) % len(image_cycle)]
            mask_format = mask_cycle[(index + group_position) % len(mask_cycle)]
            stem = f"scene_{index:04d}"
            plan.append(
                _PlannedScene(
                    group=group,
                    index=index,
                    image_path=images_root / group / (stem + _IMAGE_FORMATS[image_format].extension),
                    mask_path=masks_root / group / (stem + _MASK_FORMATS[mask_format].extension),
                    image_format=image_format,
                    mask_format=mask_format,
                )
            )
    return plan


def _read_own_marker(path: Path) -> dict | None:
    """The marker at ``path`` if it exists and was written by this generator, else None."""
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("generator") != _GENERATOR_ID:
        return None
    return marker


def _files_under(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if path.is_file()] if root.is_dir() else []


def _remove_listed_files(marker: dict, images_root: Path, masks_root: Path) -> None:
    """Delete the scene files an earlier run recorded in ``marker`` (only scene files inside the roots)."""
    for entry in marker.get("files", []):
        if not (isinstance(entry, list) and len(entry) == 2):
            continue
        for root, relative in zip((images_root, masks_root), entry):
            relative_path = Path(str(relative))
            if relative_path.is_absolute() or ".." in relative_path.parts or len(relative_path.parts) != 2:
                continue
            if relative_path.parts[0] in GROUPS and _STEM_PATTERN.match(relative_path.stem):
                (root / relative_path).unlink(missing_ok=True)


def write_demo_dataset(
    images_root: Path, masks_root: Path, scenes_per_group: int, seed: int
) -> list[tuple[Path, Path]]:
    """Write the demo data set and return its (image path, mask path) pairs in ``GROUPS`` order.

    Layout: ``images_root/<group>/scene_NNNN.<ext>`` and ``masks_root/<group>/scene_NNNN.<ext>``,
    scene ``i`` of group ``g`` rendered from ``scene_seed("demo", seed, g, i)`` at its seeded size.
    The storage formats are a fixed mix by index: images are RGB PNG, RGB JPEG (quality 92) or
    RGBA PNG (alpha 255), and for ``medical_gray`` 8-bit or 16-bit (x257) grayscale PNG; masks are
    PNG 0/255, PNG 0/1, ``.npy`` bool or uint8, or (not for ``thin``) lossy JPEG 0/255.

    Resumable and idempotent: every file is written atomically; ``images_root/.demo_complete.json``
    is written last. When it matches (``scenes_per_group``, ``seed``, ``GENERATOR_VERSION``) and
    every file exists, nothing is written; missing files are re-rendered byte-identically. A run
    with other parameters first deletes the files its predecessor recorded.

    Raises:
        DemoDatasetError: a root holds files but ``images_root`` has no marker of this generator
            (the folders are not ours to overwrite), or the two roots are the same folder.
        ValueError: bad ``scenes_per_group`` or ``seed``.
    """
    if not is_non_negative_int(scenes_per_group) or scenes_per_group < 1:
        raise ValueError(f"scenes_per_group must be a positive integer, got {scenes_per_group!r}")
    if not is_non_negative_int(seed):
        raise ValueError(f"demo data seed must be a non-negative integer, got {seed!r}")
    images_root, masks_root = Path(images_root), Path(masks_root)
    if images_root.resolve() == masks_root.resolve():
        raise DemoDatasetError(f"data.masks_root: {masks_root} is also data.images_root; the demo data set "
                               "needs two different folders")

    plan = _plan_dataset(images_root, masks_root, int(scenes_per_group))
    pairs = [(scene.image_path, scene.mask_path) for scene in plan]
    parameters = {
        "generator": _GENERATOR_ID,
        "generator_version": GENERATOR_VERSION,
        "scenes_per_group": int(scenes_per_group),
        "seed": int(seed),
    }
    complete_path = images_root / MARKER_NAME
    in_progress_path = images_root / IN_PROGRESS_NAME

    def same_parameters(marker: dict | None) -> bool:
        return marker is not None and all(marker.get(key) == value for key, value in parameters.items())

    complete = _read_own_marker(complete_path)
    if same_parameters(complete) and all(image.is_file() and mask.is_file() for image, mask in pairs):
        return pairs

    previous = _read_own_marker(in_progress_path) or complete
    if previous is None:
        foreign = _files_under(images_root) + _files_under(masks_root)
        if foreign:
            raise DemoDatasetError(
                f"demo.enabled: true: refusing to write the demo data set over {foreign[0]}, which it did not write "
                f"(no {MARKER_NAME} in {images_root}); set demo.enabled: false to use your own data, or "
                "point data.images_root and data.masks_root at new folders for the demo"
            )
    elif not same_parameters(previous):
        # Files of a run with other parameters would be mistaken for ours: remove them first.
        complete_path.unlink(missing_ok=True)
        for marker in (previous, complete):
            if marker is not None:
                _remove_listed_files(marker, images_root, masks_root)

    listing = [
        [str(image.relative_to(images_root)), str(mask.relative_to(masks_root))] for image, mask in pairs
    ]
    atomic_write_json(in_progress_path, {**parameters, "files": listing})
    complete_path.unlink(missing_ok=True)
    for scene in plan:
        missing_image, missing_mask = not scene.image_path.is_file(), not scene.mask_path.is_file()
        if not (missing_image or missing_mask):
            continue
        image, mask = demo_scenes.render_scene(scene.group, scene_seed("demo", int(seed), scene.group, scene.index))
        if missing_image:
            atomic_write_bytes(scene.image_path, _IMAGE_FORMATS[scene.image_format].encode(image))
        if missing_mask:
            atomic_write_bytes(scene.mask_path, _MASK_FORMATS[scene.mask_format].encode(mask))
    atomic_write_json(complete_path, {**parameters, "groups": list(GROUPS), "files": listing})
    in_progress_path.unlink(missing_ok=True)
    return pairs
