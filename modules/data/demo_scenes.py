"""Procedural demo scenes in the kinds of domain where SAM struggles, generated from a seed.

The project ships no data. Its default configuration runs on a demo data set that this module
renders deterministically, and the tiny demo SAM backbone is trained on scenes from the same
generator family with seeds that never overlap the demo data set (see ``scene_seed``).

Scene groups (``GROUPS``, fixed order):

- ``plain``: one solid or smoothly shaded object with clear contrast on a smooth or lightly
  textured background.
- ``camouflage``: the object is filled with the same texture family as the background, with a
  slight colour and phase shift.
- ``shadow``: a cast shadow with soft penumbra on textured ground. The mask is the shadow region
  (where the penumbra is at least half dark), minus the occluding object where it is visible.
- ``transparent``: a glass-like object: the background is seen through it (slightly magnified)
  with a low-alpha tint, a faint rim and a specular highlight.
- ``medical_gray``: a grayscale "slice": noisy tissue-like background and a low-contrast,
  blurred organ blob, with Gaussian and speckle noise. Returned as three equal channels.
- ``thin``: thin curvilinear structures (vessels, cracks or wires, 1-4 px wide) on a cluttered
  background.

Conventions: images are ``H x W x 3`` uint8 RGB, masks ``H x W`` bool (True = foreground); pixel
coordinates are (row, column) with the origin at the top-left pixel centre. Rendering uses only
numpy, scipy and PIL and takes a few milliseconds per scene.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from modules.core.fileio import atomic_write_bytes, atomic_write_json

GENERATOR_VERSION = "1"
GROUPS: tuple[str, ...] = ("plain", "camouflage", "shadow", "transparent", "medical_gray", "thin")
PURPOSES: tuple[str, ...] = ("demo", "backbone_train", "backbone_eval")

#: Inclusive range of image heights and widths drawn when ``render_scene`` gets ``size=None``.
SIZE_RANGE: tuple[int, int] = (192, 320)
#: Completion marker written last into ``images_root`` by ``write_demo_dataset``.
MARKER_NAME = ".demo_complete.json"
#: Written first into ``images_root`` so that an interrupted run is recognised as ours.
IN_PROGRESS_NAME = ".demo_in_progress.json"

# First entropy word of every seed sequence: keeps this generator's streams apart from any other
# SeedSequence built from small integers elsewhere in the project.
_SEED_DOMAIN_TAG = 0x0DE30DA7A
# Object area as a fraction of the image area (log-uniform in between).
_OBJECT_AREA_RANGE = (0.03, 0.40)
# A drawn scene is kept only if its foreground fraction lies in this range, else it is redrawn.
_MASK_FRACTION_LIMITS = {"thin": (0.002, 0.5)}
_DEFAULT_MASK_FRACTION_LIMITS = (0.01, 0.7)
_MAX_DRAW_ATTEMPTS = 32


class DemoDatasetError(RuntimeError):
    """Raised when the demo data set cannot be written where it was asked to go."""


# ----------------------------------------------------------------------------------------------
# Seeds
# ----------------------------------------------------------------------------------------------


def scene_seed(purpose: str, base_seed: int, group: str, index: int) -> np.random.SeedSequence:
    """The seed sequence of one scene.

    The entropy is (domain tag, purpose code, ``base_seed``, group position in ``GROUPS``,
    ``index``), so scenes for different purposes (``"demo"``, ``"backbone_train"``,
    ``"backbone_eval"``) never share a seed sequence whatever their base seeds and indices.
    """
    if purpose not in PURPOSES:
        raise ValueError(f"unknown scene purpose {purpose!r}; expected one of {PURPOSES}")
    group_position = _group_position(group)
    for name, value in (("base_seed", base_seed), ("index", index)):
        if not _is_non_negative_int(value):
            raise ValueError(f"scene_seed {name} must be a non-negative integer, got {value!r}")
    entropy = (_SEED_DOMAIN_TAG, PURPOSES.index(purpose), int(base_seed), group_position, int(index))
    return np.random.SeedSequence(entropy)


def _is_non_negative_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def _group_position(group: str) -> int:
    if group not in GROUPS:
        raise ValueError(f"unknown demo scene group {group!r}; expected one of {GROUPS}")
    return GROUPS.index(group)


# ----------------------------------------------------------------------------------------------
# Canvas, noise and colour helpers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Canvas:
    """Pixel grid of one scene: ``rows`` is ``H x 1``, ``cols`` is ``1 x W`` (float32 pixels)."""

    height: int
    width: int
    rows: np.ndarray
    cols: np.ndarray

    @classmethod
    def of_size(cls, height: int, width: int) -> "_Canvas":
        rows = np.arange(height, dtype=np.float32)[:, None]
        cols = np.arange(width, dtype=np.float32)[None, :]
        return cls(height, width, rows, cols)

    @property
    def area(self) -> int:
        return self.height * self.width


def _smooth_noise(rng: np.random.Generator, canvas: _Canvas, cell: float) -> np.ndarray:
    """``H x W`` float32 value noise with features about ``cell`` pixels wide, zero mean, unit std."""
    cell = max(float(cell), 1.5)
    grid_h = int(canvas.height / cell) + 3
    grid_w = int(canvas.width / cell) + 3
    grid = rng.standard_normal((grid_h, grid_w), dtype=np.float32)
    # The crop box drops the outermost grid cells, whose bicubic interpolation is one-sided.
    upsampled = Image.fromarray(grid).resize(
        (canvas.width, canvas.height), Image.Resampling.BICUBIC, box=(1, 1, grid_w - 1, grid_h - 1)
    )
    return _standardise(np.asarray(upsampled, dtype=np.float32))


def _fractal_noise(
    rng: np.random.Generator, canvas: _Canvas, base_cell: float, octaves: int = 4, persistence: float = 0.5
) -> np.ndarray:
    """``H x W`` float32 sum of ``octaves`` value-noise layers (cell halves, amplitude x persistence)."""
    total = np.zeros((canvas.height, canvas.width), dtype=np.float32)
    amplitude, cell = 1.0, float(base_cell)
    for _ in range(octaves):
        total += amplitude * _smooth_noise(rng, canvas, cell)
        amplitude *= persistence
        cell /= 2.0
        if cell < 1.5:
            break
    return _standardise(total)


def _standardise(field: np.ndarray) -> np.ndarray:
    return (field - field.mean()) / (field.std() + 1e-6)


def _to_unit_range(field: np.ndarray, gain: float = 0.6) -> np.ndarray:
    """Squash a zero-mean unit-std field smoothly into [0, 1]."""
    return 0.5 + 0.5 * np.tanh(gain * field)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _random_colour(rng: np.random.Generator, low: float = 20.0, high: float = 235.0) -> np.ndarray:
    """One RGB colour, float32 in [low, high] per channel."""
    return rng.uniform(low, high, size=3).astype(np.float32)


def _muted_colour(rng: np.random.Generator, low: float, high: float, saturation: float) -> np.ndarray:
    """An RGB colour of brightness in [low, high] pulled towards gray by ``1 - saturation``."""
    colour = _random_colour(rng, low, high)
    return colour.mean() + saturation * (colour - colour.mean())


def _contrasting_colour(rng: np.random.Generator, reference: np.ndarray, min_distance: float) -> np.ndarray:
    """A random colour at least ``min_distance`` (RGB Euclidean, 0-255 scale) from ``reference``."""
    colour = _random_colour(rng)
    for _ in range(64):
        if np.linalg.norm(colour - reference) >= min_distance:
            return colour
        colour = _random_colour(rng)
    # Deterministic fallback: the RGB cube corner opposite the reference is always far enough.
    return np.where(reference > 127.5, 15.0, 240.0).astype(np.float32)


def _paint(field: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Map an ``H x W`` field in [0, 1] to ``H x W x 3`` colours between ``dark`` and ``light``."""
    return dark + field[..., None] * (light - dark)


def _blend(base: np.ndarray, overlay: np.ndarray | float, alpha: np.ndarray) -> np.ndarray:
    """``base * (1 - alpha) + overlay * alpha`` with an ``H x W`` alpha and ``H x W x 3`` images."""
    alpha3 = alpha[..., None]
    return base + alpha3 * (overlay - base)


def _soft_alpha(mask: np.ndarray, sigma: float) -> np.ndarray:
    """``H x W`` float32 alpha: the bool mask blurred by a Gaussian of ``sigma`` pixels."""
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma)


def _linear_ramp(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    """``H x W`` float32 in [0, 1] increasing along a random direction across the image."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    projection = np.cos(angle) * canvas.cols + np.sin(angle) * canvas.rows
    projection = projection - projection.min()
    return (projection / max(float(projection.max()), 1.0)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Textures
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TextureStyle:
    """Parameters of one texture family; two draws of a style share the look but not the noise."""

    family: str
    cell: float  # feature size in pixels
    angle: float  # stripe orientation in radians
    period: float  # stripe period in pixels
    warp: float  # stripe phase warp in radians per unit noise
    threshold: float  # spot threshold in noise std units


def _draw_texture_style(rng: np.random.Generator, families: tuple[str, ...] | None = None) -> _TextureStyle:
    families = families or tuple(_TEXTURE_FAMILIES)
    return _TextureStyle(
        family=families[int(rng.integers(len(families)))],
        cell=float(rng.uniform(6.0, 28.0)),
        angle=float(rng.uniform(0.0, np.pi)),
        period=float(rng.uniform(7.0, 18.0)),
        warp=float(rng.uniform(0.8, 2.5)),
        threshold=float(rng.uniform(-0.2, 0.6)),
    )


def _texture_cloud(rng: np.random.Generator, canvas: _Canvas, style: _TextureStyle, phase: float) -> np.ndarray:
    return _to_unit_range(_fractal_noise(rng, canvas, style.cell * 1.5))


def _texture_stripes(rng: np.random.Generator, canvas: _Canvas, style: _TextureStyle, phase: float) -> np.ndarray:
    along = np.cos(style.angle) * canvas.cols + np.sin(style.angle) * canvas.rows
    warp = style.warp * _smooth_noise(rng, canvas, style.cell * 2.0)
    stripes = 0.5 + 0.5 * np.sin(2.0 * np.pi * along / style.period + warp + phase)
    fine = _smooth_noise(rng, canvas, 2.5)
    return np.clip(0.85 * stripes + 0.06 * fine + 0.07, 0.0, 1.0)


def _texture_spots(rng: np.random.Generator, canvas: _Canvas, style: _TextureStyle, phase: float) -> np.ndarray:
    spots_field = _smooth_noise(rng, canvas, style.cell * 0.7)
    spots = 1.0 / (1.0 + np.exp(-4.0 * (spots_field - style.threshold)))
    shading = _to_unit_range(_fractal_noise(rng, canvas, style.cell * 2.0, octaves=3))
    return np.clip(0.7 * spots + 0.3 * shading, 0.0, 1.0)


def _texture_grain(rng: np.random.Generator, canvas: _Canvas, style: _TextureStyle, phase: float) -> np.ndarray:
    coarse = _fractal_noise(rng, canvas, style.cell, octaves=2)
    fine = _smooth_noise(rng, canvas, 2.0)
    return _to_unit_range(0.6 * coarse + 0.8 * fine, gain=0.8)


_TextureFn = Callable[[np.random.Generator, _Canvas, _TextureStyle, float], np.ndarray]
#: Texture families: each returns an ``H x W`` float32 field in [0, 1].
_TEXTURE_FAMILIES: dict[str, _TextureFn] = {
    "cloud": _texture_cloud,
    "stripes": _texture_stripes,
    "spots": _texture_spots,
    "grain": _texture_grain,
}


def _render_texture(
    rng: np.random.Generator, canvas: _Canvas, style: _TextureStyle, phase: float | None = None
) -> np.ndarray:
    """``H x W`` float32 in [0, 1]: a fresh draw of ``style`` (random stripe phase unless given)."""
    phase = float(rng.uniform(0.0, 2.0 * np.pi)) if phase is None else phase
    return _TEXTURE_FAMILIES[style.family](rng, canvas, style, phase).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """A rasterised shape: ``mask`` is ``H x W`` bool; centre in pixels (row, col); radius ~ extent."""

    mask: np.ndarray
    center_row: float
    center_col: float
    radius: float


def _place_center(
    rng: np.random.Generator, canvas: _Canvas, extent: float, center: tuple[float, float] | None
) -> tuple[float, float]:
    """A centre that keeps a shape of radius ``extent`` mostly inside the image, unless given."""
    if center is not None:
        return float(center[0]), float(center[1])
    margin = 0.8 * extent
    row_low, row_high = min(margin, canvas.height / 2), max(canvas.height - margin, canvas.height / 2)
    col_low, col_high = min(margin, canvas.width / 2), max(canvas.width - margin, canvas.width / 2)
    return float(rng.uniform(row_low, row_high)), float(rng.uniform(col_low, col_high))


def _rotated_offsets(canvas: _Canvas, center_row: float, center_col: float, angle: float):
    """Pixel offsets from the centre in a frame rotated by ``angle``: (along, across), broadcast H x W."""
    d_rows = canvas.rows - center_row
    d_cols = canvas.cols - center_col
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return d_cols * cos + d_rows * sin, d_rows * cos - d_cols * sin


def _shape_ellipse(rng, canvas: _Canvas, area: float, center=None) -> _Shape:
    aspect = rng.uniform(0.4, 1.0)
    semi_major = np.sqrt(area / (np.pi * aspect))
    semi_minor = aspect * semi_major
    angle = rng.uniform(0.0, np.pi)
    row, col = _place_center(rng, canvas, semi_major, center)
    along, across = _rotated_offsets(canvas, row, col, angle)
    mask = (along / semi_major) ** 2 + (across / semi_minor) ** 2 <= 1.0
    return _Shape(mask, row, col, float(semi_major))


def _shape_polygon(rng, canvas: _Canvas, area: float, center=None) -> _Shape:
    vertex_count = int(rng.integers(5, 11))
    # Jittered even angular spacing keeps the polygon simple (no self-intersections).
    angles = (np.arange(vertex_count) + rng.uniform(-0.35, 0.35, vertex_count)) * (2 * np.pi / vertex_count)
    angles += rng.uniform(0.0, 2 * np.pi)
    radii = rng.uniform(0.45, 1.0, vertex_count)
    xs, ys = radii * np.cos(angles), radii * np.sin(angles)
    unit_area = 0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1)))
    scale = np.sqrt(area / unit_area)
    row, col = _place_center(rng, canvas, scale * radii.max(), center)
    vertices = [(col + scale * x, row + scale * y) for x, y in zip(xs, ys)]
    layer = Image.new("L", (canvas.width, canvas.height), 0)
    ImageDraw.Draw(layer).polygon(vertices, fill=1)
    return _Shape(np.asarray(layer, dtype=bool), row, col, float(scale * radii.max()))


def _shape_blob(rng, canvas: _Canvas, area: float, center=None) -> _Shape:
    """A blobby shape: a noisy anisotropic bump thresholded to the target area, largest piece kept."""
    radius = np.sqrt(area / np.pi)
    aspect = rng.uniform(0.5, 1.0)
    angle = rng.uniform(0.0, np.pi)
    row, col = _place_center(rng, canvas, radius * 1.2, center)
    along, across = _rotated_offsets(canvas, row, col, angle)
    squared_distance = (along * np.sqrt(aspect) / radius) ** 2 + (across / (np.sqrt(aspect) * radius)) ** 2
    wobble = _smooth_noise(rng, canvas, max(6.0, radius / 1.5)) * rng.uniform(0.25, 0.5)
    field = wobble - squared_distance
    pixel_count = int(np.clip(round(area), 1, canvas.area - 1))
    threshold = np.partition(field.ravel(), canvas.area - pixel_count)[canvas.area - pixel_count]
    mask = field >= threshold
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    mask = labels == largest
    box = ndimage.find_objects(labels, max_label=largest)[largest - 1]
    mask[box] = ndimage.binary_fill_holes(mask[box])
    return _Shape(mask, row, col, float(radius / np.sqrt(aspect)))


def _shape_rounded_rect(rng, canvas: _Canvas, area: float, center=None) -> _Shape:
    aspect = rng.uniform(0.35, 1.0)
    half_long = np.sqrt(area / (4.0 * aspect))
    half_short = aspect * half_long
    corner = rng.uniform(0.15, 0.7) * half_short
    angle = rng.uniform(0.0, np.pi)
    row, col = _place_center(rng, canvas, np.hypot(half_long, half_short), center)
    along, across = _rotated_offsets(canvas, row, col, angle)
    # Signed distance of a rounded rectangle; inside where <= 0.
    q_along = np.abs(along) - (half_long - corner)
    q_across = np.abs(across) - (half_short - corner)
    outside = np.hypot(np.maximum(q_along, 0.0), np.maximum(q_across, 0.0))
    inside = np.minimum(np.maximum(q_along, q_across), 0.0)
    mask = outside + inside - corner <= 0.0
    return _Shape(mask, row, col, float(np.hypot(half_long, half_short)))


_ShapeFn = Callable[..., _Shape]
#: Shape kinds: ``fn(rng, canvas, area_in_pixels, center=None) -> _Shape``.
_SHAPES: dict[str, _ShapeFn] = {
    "ellipse": _shape_ellipse,
    "polygon": _shape_polygon,
    "blob": _shape_blob,
    "rounded_rect": _shape_rounded_rect,
}


def _random_shape(
    rng: np.random.Generator,
    canvas: _Canvas,
    area_fraction: float,
    kinds: tuple[str, ...] = tuple(_SHAPES),
    center: tuple[float, float] | None = None,
) -> _Shape:
    kind = kinds[int(rng.integers(len(kinds)))]
    return _SHAPES[kind](rng, canvas, area_fraction * canvas.area, center)


def _object_area_fraction(rng: np.random.Generator, low: float | None = None, high: float | None = None) -> float:
    return _log_uniform(rng, low or _OBJECT_AREA_RANGE[0], high or _OBJECT_AREA_RANGE[1])


def _shaded_object(rng: np.random.Generator, canvas: _Canvas, shape: _Shape, colour: np.ndarray) -> np.ndarray:
    """``H x W x 3`` float32 fill for ``shape``: solid, a linear gradient, or sphere-like shading."""
    style = ("solid", "linear", "sphere")[int(rng.integers(3))]
    if style == "solid":
        return np.broadcast_to(colour, (canvas.height, canvas.width, 3))
    if style == "linear":
        factor = 0.75 + 0.5 * _linear_ramp(rng, canvas)
    else:
        light_angle = rng.uniform(0.0, 2 * np.pi)
        light_row = shape.center_row + 0.4 * shape.radius * np.sin(light_angle)
        light_col = shape.center_col + 0.4 * shape.radius * np.cos(light_angle)
        distance = np.hypot(canvas.rows - light_row, canvas.cols - light_col) / (1.4 * shape.radius)
        factor = 1.2 - 0.55 * np.clip(distance, 0.0, 1.0)
    return np.clip(colour * factor[..., None], 0.0, 255.0)


def _grain(rng: np.random.Generator, canvas: _Canvas, sigma: float) -> np.ndarray:
    """``H x W x 1`` float32 Gaussian pixel noise shared by the three channels."""
    return rng.standard_normal((canvas.height, canvas.width, 1), dtype=np.float32) * np.float32(sigma)


def _clutter_ellipse(rng, draw: ImageDraw.ImageDraw, row: float, col: float, radius: float, colour) -> None:
    radius_rows, radius_cols = radius * rng.uniform(0.5, 1.0, size=2)
    draw.ellipse((col - radius_cols, row - radius_rows, col + radius_cols, row + radius_rows), fill=colour)


def _clutter_polygon(rng, draw: ImageDraw.ImageDraw, row: float, col: float, radius: float, colour) -> None:
    vertex_count = int(rng.integers(3, 7))
    angles = np.sort(rng.uniform(0.0, 2 * np.pi, vertex_count))
    radii = radius * rng.uniform(0.5, 1.0, vertex_count)
    draw.polygon([(col + r * np.cos(a), row + r * np.sin(a)) for r, a in zip(radii, angles)], fill=colour)


def _clutter_stroke(rng, draw: ImageDraw.ImageDraw, row: float, col: float, radius: float, colour) -> None:
    angle = rng.uniform(0.0, 2 * np.pi)
    end = (col + 3 * radius * np.cos(angle), row + 3 * radius * np.sin(angle))
    draw.line([(col, row), end], fill=colour, width=int(rng.integers(5, 12)))


#: Clutter kinds drawn with PIL: ``fn(rng, draw, row, col, radius_px, rgb_tuple)``.
_CLUTTER: dict[str, Callable] = {
    "ellipse": _clutter_ellipse,
    "polygon": _clutter_polygon,
    "stroke": _clutter_stroke,
}


def _draw_clutter(
    rng: np.random.Generator,
    canvas: _Canvas,
    image: np.ndarray,
    count: int,
    kinds: tuple[str, ...],
    radius_range: tuple[float, float],
) -> np.ndarray:
    """``image`` (``H x W x 3`` float32) with ``count`` random opaque items drawn over it, edges softened."""
    layer = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(layer)
    for _ in range(count):
        kind = kinds[int(rng.integers(len(kinds)))]
        row, col = rng.uniform(0, canvas.height), rng.uniform(0, canvas.width)
        colour = tuple(int(v) for v in _random_colour(rng))
        _CLUTTER[kind](rng, draw, row, col, rng.uniform(*radius_range), colour)
    return ndimage.gaussian_filter(np.asarray(layer, dtype=np.float32), (0.8, 0.8, 0.0))


# ----------------------------------------------------------------------------------------------
# Group renderers: each returns (image H x W x 3 float32 in ~[0, 255], mask H x W bool)
# ----------------------------------------------------------------------------------------------


def _render_plain(rng: np.random.Generator, canvas: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    start, end = _random_colour(rng, 30, 225), _random_colour(rng, 30, 225)
    background = _paint(_linear_ramp(rng, canvas), start, end)
    if rng.random() < 0.6:
        style = _draw_texture_style(rng, ("cloud", "grain", "stripes"))
        texture = _render_texture(rng, canvas, style) - 0.5
        background = background + texture[..., None] * rng.uniform(8.0, 24.0)
    shape = _random_shape(rng, canvas, _object_area_fraction(rng))
    colour = _contrasting_colour(rng, background[shape.mask].mean(axis=0), min_distance=110.0)
    image = _blend(background, _shaded_object(rng, canvas, shape, colour), _soft_alpha(shape.mask, 0.6))
    return image + _grain(rng, canvas, 2.0), shape.mask


def _render_camouflage(rng: np.random.Generator, canvas: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    style = _draw_texture_style(rng)
    dark = _muted_colour(rng, 30, 130, rng.uniform(0.3, 1.0))
    light = np.clip(dark + _muted_colour(rng, 50, 130, rng.uniform(0.3, 1.0)), 0, 255)
    background = _paint(_render_texture(rng, canvas, style), dark, light)
    # The object is a fresh draw of the same family with slightly changed scale, angle and colour.
    object_style = _TextureStyle(
        family=style.family,
        cell=style.cell * rng.uniform(0.85, 1.15),
        angle=style.angle + rng.uniform(-0.35, 0.35),
        period=style.period * rng.uniform(0.85, 1.15),
        warp=style.warp,
        threshold=style.threshold + rng.uniform(-0.15, 0.15),
    )
    # Mostly a brightness shift plus a faint hue shift: a strong hue change would give it away.
    hue_shift = rng.standard_normal(3).astype(np.float32)
    hue_shift *= rng.uniform(2.0, 7.0) / np.linalg.norm(hue_shift)
    colour_shift = hue_shift + rng.choice([-1.0, 1.0]) * rng.uniform(9.0, 18.0)
    shape = _random_shape(rng, canvas, _object_area_fraction(rng, 0.05), ("blob", "ellipse", "polygon"))
    fill = _paint(_render_texture(rng, canvas, object_style), dark + colour_shift, light + colour_shift)
    image = _blend(background, fill, _soft_alpha(shape.mask, 0.8))
    # Scene-wide illumination so that the object does not stand out by its brightness alone.
    illumination = 0.85 + 0.3 * _to_unit_range(_smooth_noise(rng, canvas, 0.6 * max(canvas.height, canvas.width)))
    return image * illumination[..., None] + _grain(rng, canvas, 4.0), shape.mask


def _render_shadow(rng: np.random.Generator, canvas: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    style = _draw_texture_style(rng, ("cloud", "grain", "spots", "stripes"))
    base = _muted_colour(rng, 90, 200, rng.uniform(0.1, 0.6))
    spread = rng.uniform(35.0, 80.0)
    ground = _paint(_render_texture(rng, canvas, style), base - spread / 2, base + spread / 2)
    patches = _to_unit_range(_fractal_noise(rng, canvas, 0.4 * max(canvas.height, canvas.width), octaves=2))
    ground = ground * (0.85 + 0.3 * patches)[..., None]

    caster = _random_shape(rng, canvas, _object_area_fraction(rng, 0.05, 0.35))
    penumbra_sigma = rng.uniform(1.5, 5.0)
    darkness = _soft_alpha(caster.mask, penumbra_sigma)
    shadow_mask = darkness >= 0.5
    strength = rng.uniform(0.3, 0.6)
    # Skylight keeps shadows slightly blue: the blue channel is darkened less.
    channel_weights = np.array([1.0, 0.96, 0.82], dtype=np.float32)
    image = ground * (1.0 - strength * darkness[..., None] * channel_weights)

    if rng.random() < 0.7:
        # The occluder stands at the far end of the shadow, opposite the light, partly covering it.
        direction = rng.uniform(0.0, 2 * np.pi)
        occluder_area = rng.uniform(0.15, 0.4) * shadow_mask.sum() / canvas.area
        occluder_radius = np.sqrt(occluder_area * canvas.area / np.pi)
        shadow_rows, shadow_cols = np.nonzero(shadow_mask)
        foot = int(np.argmax(shadow_rows * np.sin(direction) + shadow_cols * np.cos(direction)))
        occluder_center = (
            shadow_rows[foot] + 0.6 * occluder_radius * np.sin(direction),
            shadow_cols[foot] + 0.6 * occluder_radius * np.cos(direction),
        )
        occluder = _random_shape(rng, canvas, occluder_area, ("ellipse", "rounded_rect", "polygon"), occluder_center)
        colour = _contrasting_colour(rng, base, min_distance=60.0)
        image = _blend(image, _shaded_object(rng, canvas, occluder, colour), _soft_alpha(occluder.mask, 0.6))
        shadow_mask = shadow_mask & ~occluder.mask
    return image + _grain(rng, canvas, 3.0), shadow_mask


def _render_transparent(rng: np.random.Generator, canvas: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    style = _draw_texture_style(rng)
    dark, light = _random_colour(rng, 20, 140), _random_colour(rng, 110, 240)
    background = _paint(_render_texture(rng, canvas, style), dark, light)
    background = _draw_clutter(rng, canvas, background, int(rng.integers(3, 8)), ("ellipse", "polygon"), (8.0, 32.0))

    glass = _random_shape(rng, canvas, _object_area_fraction(rng, 0.05), ("ellipse", "rounded_rect", "polygon", "blob"))
    # Refraction: the background inside is slightly magnified about the centre and wobbles.
    magnification = rng.uniform(0.86, 0.97)
    wobble = rng.uniform(0.5, 2.0)
    source_rows = glass.center_row + (canvas.rows - glass.center_row) * magnification
    source_cols = glass.center_col + (canvas.cols - glass.center_col) * magnification
    source_rows = source_rows + wobble * _smooth_noise(rng, canvas, 20.0)
    source_cols = source_cols + wobble * _smooth_noise(rng, canvas, 20.0)
    row_index = np.clip(np.rint(source_rows), 0, canvas.height - 1).astype(np.intp)
    col_index = np.clip(np.rint(source_cols), 0, canvas.width - 1).astype(np.intp)
    refracted = background[row_index, col_index]
    tint = _random_colour(rng, 170, 255)
    inside = _blend(refracted, tint, np.full(refracted.shape[:2], rng.uniform(0.05, 0.16), np.float32))
    inside = inside * rng.uniform(1.0, 1.08)
    image = _blend(background, inside, _soft_alpha(glass.mask, 0.6))

    # Rim: brightest on the side facing the light, peaks at the boundary of the glass.
    edge = _soft_alpha(glass.mask, rng.uniform(0.8, 1.6))
    rim = 4.0 * edge * (1.0 - edge)
    grad_rows, grad_cols = np.gradient(edge)
    light_angle = rng.uniform(0.0, 2 * np.pi)
    facing = -(grad_rows * np.sin(light_angle) + grad_cols * np.cos(light_angle))
    facing = facing / (np.abs(facing).max() + 1e-6)
    image = image + (rim * rng.uniform(12.0, 30.0) * (0.6 + 0.4 * facing))[..., None]

    # Specular highlight: a soft elongated spot inside, towards the light.
    spot_row = glass.center_row - 0.45 * glass.radius * np.sin(light_angle)
    spot_col = glass.center_col - 0.45 * glass.radius * np.cos(light_angle)
    along, across = _rotated_offsets(canvas, spot_row, spot_col, light_angle + np.pi / 2)
    spot_length = max(3.0, 0.3 * glass.radius)
    highlight = np.exp(-((along / spot_length) ** 2 + (across / (0.3 * spot_length)) ** 2)) * glass.mask
    image = image + (highlight * rng.uniform(25.0, 60.0))[..., None]
    return image + _grain(rng, canvas, 2.0), glass.mask


def _render_medical_gray(rng: np.random.Generator, canvas: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    # Body cross-section: a large soft ellipse of tissue surrounded by dark air.
    body_center = (canvas.height * rng.uniform(0.45, 0.55), canvas.width * rng.uniform(0.45, 0.55))
    body_semi_rows = canvas.height * rng.uniform(0.40, 0.50)
    body_semi_cols = canvas.width * rng.uniform(0.40, 0.50)
    body_distance = np.sqrt(
        ((canvas.rows - body_center[0]) / body_semi_rows) ** 2 + ((canvas.cols - body_center[1]) / body_semi_cols) ** 2
    )
    body = body_distance <= 1.0
    body_alpha = _soft_alpha(body, 1.5)

    tissue_level = rng.uniform(85.0, 135.0)
    tissue = tissue_level + rng.uniform(6.0, 12.0) * _fractal_noise(rng, canvas, rng.uniform(10.0, 30.0))
    fat = _smooth_noise(rng, canvas, rng.uniform(6.0, 12.0)) > rng.uniform(1.0, 1.6)
    tissue = tissue + rng.uniform(12.0, 25.0) * _soft_alpha(fat, 1.2)
    air_level = rng.uniform(8.0, 25.0)
    gray = air_level + body_alpha * (tissue - air_level)

    # Organ centred well inside the body so that the mask and the body agree.
    angle = rng.uniform(0.0, 2 * np.pi)
    offset = rng.uniform(0.0, 0.45)
    organ_center = (
        body_center[0] + offset * body_semi_rows * np.sin(angle),
        body_center[1] + offset * body_semi_cols * np.cos(angle),
    )
    organ = _random_shape(rng, canvas, _object_area_fraction(rng, 0.03, 0.25), ("blob", "ellipse"), organ_center)
    organ_mask = organ.mask & body
    contrast = rng.choice([-1.0, 1.0]) * rng.uniform(18.0, 32.0)
    organ_texture = rng.uniform(3.0, 7.0) * _smooth_noise(rng, canvas, rng.uniform(4.0, 10.0))
    organ_alpha = _soft_alpha(organ_mask, rng.uniform(1.2, 3.0))
    # The organ replaces the tissue (no fat inside it): a homogeneous region with its own texture.
    organ_intensity = tissue_level + contrast + organ_texture
    gray = gray + organ_alpha * (organ_intensity - gray)

    # Speckle (multiplicative, slightly correlated) then additive Gaussian noise.
    speckle = _standardise(ndimage.gaussian_filter(rng.standard_normal(gray.shape, dtype=np.float32), 0.8))
    gray = gray * (1.0 + rng.uniform(0.05, 0.12) * speckle)
    gray = gray + rng.uniform(3.0, 7.0) * rng.standard_normal(gray.shape, dtype=np.float32)
    return np.repeat(gray[..., None], 3, axis=2), organ_mask


def _walk_path(
    rng: np.random.Generator,
    canvas: _Canvas,
    start: tuple[float, float],
    heading: float,
    steps: int,
    step_length: float,
    turn_sigma: float,
) -> list[tuple[float, float]]:
    """A smooth random walk as PIL (x, y) points; it stops at the image border."""
    points = [(start[1], start[0])]
    row, col = start
    turn_rate = 0.0
    for _ in range(steps):
        turn_rate = 0.7 * turn_rate + rng.normal(0.0, turn_sigma)
        heading += turn_rate
        row += step_length * np.sin(heading)
        col += step_length * np.cos(heading)
        points.append((col, row))
        if not (-2 <= row <= canvas.height + 1 and -2 <= col <= canvas.width + 1):
            break
    return points


def _border_start(rng: np.random.Generator, canvas: _Canvas) -> tuple[tuple[float, float], float]:
    """A point on a random image border and a heading pointing roughly into the image."""
    side = int(rng.integers(4))
    along = rng.uniform(0.15, 0.85)
    if side == 0:
        return (0.0, along * canvas.width), np.pi / 2 + rng.uniform(-0.6, 0.6)
    if side == 1:
        return (canvas.height - 1.0, along * canvas.width), -np.pi / 2 + rng.uniform(-0.6, 0.6)
    if side == 2:
        return (along * canvas.height, 0.0), rng.uniform(-0.6, 0.6)
    return (along * canvas.height, canvas.width - 1.0), np.pi + rng.uniform(-0.6, 0.6)


def _draw_vessels(rng: np.random.Generator, canvas: _Canvas, draw: ImageDraw.ImageDraw) -> None:
    """Branching trees entering from the border; widths taper from 3-4 px to 1 px."""
    pending = []
    for _ in range(int(rng.integers(1, 3))):
        start, heading = _border_start(rng, canvas)
        pending.append((start, heading, int(rng.integers(3, 5)), int(rng.integers(50, 90))))
    segments = 0
    while pending and segments < 24:
        start, heading, width, steps = pending.pop()
        points = _walk_path(rng, canvas, start, heading, steps, 3.0, 0.05)
        draw.line(points, fill=1, width=width, joint="curve")
        segments += 1
        if width > 1:
            for _ in range(int(rng.integers(1, 3))):
                branch_at = points[int(rng.integers(len(points) // 3, len(points)))]
                branch_heading = heading + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1)
                pending.append(((branch_at[1], branch_at[0]), branch_heading, width - 1, int(steps * 0.7)))


def _draw_cracks(rng: np.random.Generator, canvas: _Canvas, draw: ImageDraw.ImageDraw) -> None:
    """Jagged, branching cracks 1-2 px wide starting inside the image."""
    for _ in range(int(rng.integers(1, 3))):
        start = (rng.uniform(0.2, 0.8) * canvas.height, rng.uniform(0.2, 0.8) * canvas.width)
        heading = rng.uniform(0.0, 2 * np.pi)
        for direction in (0.0, np.pi):
            pending = [(start, heading + direction, int(rng.integers(60, 110)))]
            branches = 0
            while pending:
                origin, branch_heading, steps = pending.pop()
                points = _walk_path(rng, canvas, origin, branch_heading, steps, 2.5, 0.22)
                draw.line(points, fill=1, width=int(rng.integers(1, 3)), joint="curve")
                if branches < 3 and len(points) > 8:
                    branches += 1
                    fork = points[int(rng.integers(len(points) // 4, len(points) - 2))]
                    pending.append(((fork[1], fork[0]), branch_heading + rng.uniform(-1.2, 1.2), steps // 2))


def _draw_wires(rng: np.random.Generator, canvas: _Canvas, draw: ImageDraw.ImageDraw) -> None:
    """Two to four smooth cubic Bezier curves crossing the image, 1-3 px wide."""
    t = np.linspace(0.0, 1.0, 64)[:, None]
    for _ in range(int(rng.integers(2, 5))):
        start, _ = _border_start(rng, canvas)
        end, _ = _border_start(rng, canvas)
        controls = rng.uniform([0, 0], [canvas.height, canvas.width], size=(2, 2))
        nodes = np.array([start, controls[0], controls[1], end])
        curve = (
            (1 - t) ** 3 * nodes[0] + 3 * (1 - t) ** 2 * t * nodes[1] + 3 * (1 - t) * t**2 * nodes[2] + t**3 * nodes[3]
        )
        draw.line([(c, r) for r, c in curve], fill=1, width=int(rng.integers(1, 4)), joint="curve")


#: Thin-structure kinds: each draws with ``fill=1`` onto an ``L`` layer of the canvas size.
_THIN_STRUCTURES: dict[str, Callable[[np.random.Generator, _Canvas, ImageDraw.ImageDraw], None]] = {
    "vessels": _draw_vessels,
    "cracks": _draw_cracks,
    "wires": _draw_wires,
}


def _render_thin(rng: np.random.Generator, canvas: _Canvas) -> tuple[np.ndarray, np.ndarray]:
    style = _draw_texture_style(rng)
    dark, light = _random_colour(rng, 40, 150), _random_colour(rng, 110, 230)
    background = np.clip(_paint(_render_texture(rng, canvas, style), dark, light), 0, 255)
    # Strokes are at least 5 px wide, so the clutter can never pass for a thin structure.
    background = _draw_clutter(rng, canvas, background, int(rng.integers(8, 20)), ("ellipse", "stroke"), (4.0, 18.0))
    background = background + _to_unit_range(_smooth_noise(rng, canvas, 3.0))[..., None] * 20.0 - 10.0

    structure_layer = Image.new("L", (canvas.width, canvas.height), 0)
    kind = tuple(_THIN_STRUCTURES)[int(rng.integers(len(_THIN_STRUCTURES)))]
    _THIN_STRUCTURES[kind](rng, canvas, ImageDraw.Draw(structure_layer))
    mask = np.asarray(structure_layer, dtype=bool)

    reference = background[mask].mean(axis=0) if mask.any() else background.mean(axis=(0, 1))
    brightness = 0.35 if rng.random() < 0.75 else 1.6
    colour = np.clip(reference * brightness + rng.uniform(-15, 15, 3), 0, 255)
    alpha = np.clip(_soft_alpha(mask, 0.5) * 1.4, 0.0, 1.0)
    image = _blend(background, colour.astype(np.float32), alpha)
    return image + _grain(rng, canvas, 3.0), mask


_Renderer = Callable[[np.random.Generator, _Canvas], tuple[np.ndarray, np.ndarray]]
_RENDERERS: dict[str, _Renderer] = {
    "plain": _render_plain,
    "camouflage": _render_camouflage,
    "shadow": _render_shadow,
    "transparent": _render_transparent,
    "medical_gray": _render_medical_gray,
    "thin": _render_thin,
}
assert tuple(_RENDERERS) == GROUPS


def render_scene(
    group: str, seed: np.random.SeedSequence | int, size: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene of ``group`` deterministically from ``seed``.

    Args:
        group: one of ``GROUPS``.
        seed: a ``SeedSequence`` (normally from ``scene_seed``) or a non-negative int.
        size: ``(H, W)`` in pixels; when None, H and W are drawn from the seed in ``SIZE_RANGE``
            (inclusive) with H != W.

    Returns:
        ``image``: ``H x W x 3`` uint8 RGB (``medical_gray`` has three equal channels) and
        ``mask``: ``H x W`` bool foreground, never empty and never all foreground.
    """
    renderer = _RENDERERS.get(group)
    if renderer is None:
        raise ValueError(f"unknown demo scene group {group!r}; expected one of {GROUPS}")
    rng = np.random.default_rng(seed)
    if size is None:
        height = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
        width = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1]))
        width += int(width >= height)  # skips width == height, keeps the range
    else:
        height, width = (int(v) for v in size)
        if height < 16 or width < 16:
            raise ValueError(f"render_scene size must be at least 16 x 16 pixels, got {size!r}")
    canvas = _Canvas.of_size(height, width)
    low, high = _MASK_FRACTION_LIMITS.get(group, _DEFAULT_MASK_FRACTION_LIMITS)
    # Redraws continue the same generator stream, so the accepted draw is still deterministic.
    for _ in range(_MAX_DRAW_ATTEMPTS):
        image, mask = renderer(rng, canvas)
        foreground = int(mask.sum())
        if low * canvas.area <= foreground <= high * canvas.area and 0 < foreground < canvas.area:
            return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask
    raise RuntimeError(f"demo group {group!r}: no valid mask in {_MAX_DRAW_ATTEMPTS} draws (generator bug)")


# ----------------------------------------------------------------------------------------------
# The demo data set on disk
# ----------------------------------------------------------------------------------------------

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
            (the folders are not ours to overwrite).
        ValueError: bad ``scenes_per_group`` or ``seed``, or the two roots are the same folder.
    """
    if not _is_non_negative_int(scenes_per_group) or scenes_per_group < 1:
        raise ValueError(f"scenes_per_group must be a positive integer, got {scenes_per_group!r}")
    if not _is_non_negative_int(seed):
        raise ValueError(f"demo data seed must be a non-negative integer, got {seed!r}")
    images_root, masks_root = Path(images_root), Path(masks_root)
    if images_root.resolve() == masks_root.resolve():
        raise ValueError(f"{images_root}: images_root and masks_root must be different folders")

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
                f"{foreign[0]}: refusing to write the demo data set over files it did not write "
                f"(no {MARKER_NAME} from {_GENERATOR_ID} in {images_root})"
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
        image, mask = render_scene(scene.group, scene_seed("demo", int(seed), scene.group, scene.index))
        if missing_image:
            atomic_write_bytes(scene.image_path, _IMAGE_FORMATS[scene.image_format].encode(image))
        if missing_mask:
            atomic_write_bytes(scene.mask_path, _MASK_FORMATS[scene.mask_format].encode(mask))
    atomic_write_json(complete_path, {**parameters, "groups": list(GROUPS), "files": listing})
    in_progress_path.unlink(missing_ok=True)
    return pairs
