"""Drawing primitives of the demo scenes: canvas, noise, colours, textures, shapes and clutter.

Every function draws from the ``numpy`` generator it is given, in a fixed order: the scenes of
``demo_scenes`` are bit-identical only as long as these call orders stay exactly as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

# Object area as a fraction of the image area (log-uniform in between).
_OBJECT_AREA_RANGE = (0.03, 0.40)

# ----------------------------------------------------------------------------------------------
# Canvas, noise and colour helpers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Canvas:
    """Pixel grid of one scene: ``rows`` is ``H x 1``, ``cols`` is ``1 x W`` (float32 pixels)."""

    height: int
    width: int
    rows: np.ndarray
    cols: np.ndarray

    @classmethod
    def of_size(cls, height: int, width: int) -> "Canvas":
        rows = np.arange(height, dtype=np.float32)[:, None]
        cols = np.arange(width, dtype=np.float32)[None, :]
        return cls(height, width, rows, cols)

    @property
    def area(self) -> int:
        return self.height * self.width


def smooth_noise(rng: np.random.Generator, canvas: Canvas, cell: float) -> np.ndarray:
    """``H x W`` float32 value noise with features about ``cell`` pixels wide, zero mean, unit std."""
    cell = max(float(cell), 1.5)
    grid_h = int(canvas.height / cell) + 3
    grid_w = int(canvas.width / cell) + 3
    grid = rng.standard_normal((grid_h, grid_w), dtype=np.float32)
    # The crop box drops the outermost grid cells, whose bicubic interpolation is one-sided.
    upsampled = Image.fromarray(grid).resize(
        (canvas.width, canvas.height), Image.Resampling.BICUBIC, box=(1, 1, grid_w - 1, grid_h - 1)
    )
    return standardise(np.asarray(upsampled, dtype=np.float32))


def fractal_noise(
    rng: np.random.Generator, canvas: Canvas, base_cell: float, octaves: int = 4, persistence: float = 0.5
) -> np.ndarray:
    """``H x W`` float32 sum of ``octaves`` value-noise layers (cell halves, amplitude x persistence)."""
    total = np.zeros((canvas.height, canvas.width), dtype=np.float32)
    amplitude, cell = 1.0, float(base_cell)
    for _ in range(octaves):
        total += amplitude * smooth_noise(rng, canvas, cell)
        amplitude *= persistence
        cell /= 2.0
        if cell < 1.5:
            break
    return standardise(total)


def standardise(field: np.ndarray) -> np.ndarray:
    return (field - field.mean()) / (field.std() + 1e-6)


def to_unit_range(field: np.ndarray, gain: float = 0.6) -> np.ndarray:
    """Squash a zero-mean unit-std field smoothly into [0, 1]."""
    return 0.5 + 0.5 * np.tanh(gain * field)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def random_colour(rng: np.random.Generator, low: float = 20.0, high: float = 235.0) -> np.ndarray:
    """One RGB colour, float32 in [low, high] per channel."""
    return rng.uniform(low, high, size=3).astype(np.float32)


def muted_colour(rng: np.random.Generator, low: float, high: float, saturation: float) -> np.ndarray:
    """An RGB colour of brightness in [low, high] pulled towards gray by ``1 - saturation``."""
    colour = random_colour(rng, low, high)
    return colour.mean() + saturation * (colour - colour.mean())


def contrasting_colour(rng: np.random.Generator, reference: np.ndarray, min_distance: float) -> np.ndarray:
    """A random colour at least ``min_distance`` (RGB Euclidean, 0-255 scale) from ``reference``."""
    colour = random_colour(rng)
    for _ in range(64):
        if np.linalg.norm(colour - reference) >= min_distance:
            return colour
        colour = random_colour(rng)
    # Deterministic fallback: the RGB cube corner opposite the reference is always far enough.
    return np.where(reference > 127.5, 15.0, 240.0).astype(np.float32)


def paint(field: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Map an ``H x W`` field in [0, 1] to ``H x W x 3`` colours between ``dark`` and ``light``."""
    return dark + field[..., None] * (light - dark)


def blend(base: np.ndarray, overlay: np.ndarray | float, alpha: np.ndarray) -> np.ndarray:
    """``base * (1 - alpha) + overlay * alpha`` with an ``H x W`` alpha and ``H x W x 3`` images."""
    alpha3 = alpha[..., None]
    return base + alpha3 * (overlay - base)


def soft_alpha(mask: np.ndarray, sigma: float) -> np.ndarray:
    """``H x W`` float32 alpha: the bool mask blurred by a Gaussian of ``sigma`` pixels."""
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma)


def linear_ramp(rng: np.random.Generator, canvas: Canvas) -> np.ndarray:
    """``H x W`` float32 in [0, 1] increasing along a random direction across the image."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    projection = np.cos(angle) * canvas.cols + np.sin(angle) * canvas.rows
    projection = projection - projection.min()
    return (projection / max(float(projection.max()), 1.0)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Textures
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextureStyle:
    """Parameters of one texture family; two draws of a style share the look but not the noise."""

    family: str
    cell: float  # feature size in pixels
    angle: float  # stripe orientation in radians
    period: float  # stripe period in pixels
    warp: float  # stripe phase warp in radians per unit noise
    threshold: float  # spot threshold in noise std units


def draw_texture_style(rng: np.random.Generator, families: tuple[str, ...] | None = None) -> TextureStyle:
    families = families or tuple(_TEXTURE_FAMILIES)
    return TextureStyle(
        family=families[int(rng.integers(len(families)))],
        cell=float(rng.uniform(6.0, 28.0)),
        angle=float(rng.uniform(0.0, np.pi)),
        period=float(rng.uniform(7.0, 18.0)),
        warp=float(rng.uniform(0.8, 2.5)),
        threshold=float(rng.uniform(-0.2, 0.6)),
    )


def _texture_cloud(rng: np.random.Generator, canvas: Canvas, style: TextureStyle, phase: float) -> np.ndarray:
    return to_unit_range(fractal_noise(rng, canvas, style.cell * 1.5))


def _texture_stripes(rng: np.random.Generator, canvas: Canvas, style: TextureStyle, phase: float) -> np.ndarray:
    along = np.cos(style.angle) * canvas.cols + np.sin(style.angle) * canvas.rows
    warp = style.warp * smooth_noise(rng, canvas, style.cell * 2.0)
    stripes = 0.5 + 0.5 * np.sin(2.0 * np.pi * along / style.period + warp + phase)
    fine = smooth_noise(rng, canvas, 2.5)
    return np.clip(0.85 * stripes + 0.06 * fine + 0.07, 0.0, 1.0)


def _texture_spots(rng: np.random.Generator, canvas: Canvas, style: TextureStyle, phase: float) -> np.ndarray:
    spots_field = smooth_noise(rng, canvas, style.cell * 0.7)
    spots = 1.0 / (1.0 + np.exp(-4.0 * (spots_field - style.threshold)))
    shading = to_unit_range(fractal_noise(rng, canvas, style.cell * 2.0, octaves=3))
    return np.clip(0.7 * spots + 0.3 * shading, 0.0, 1.0)


def _texture_grain(rng: np.random.Generator, canvas: Canvas, style: TextureStyle, phase: float) -> np.ndarray:
    coarse = fractal_noise(rng, canvas, style.cell, octaves=2)
    fine = smooth_noise(rng, canvas, 2.0)
    return to_unit_range(0.6 * coarse + 0.8 * fine, gain=0.8)


_TextureFn = Callable[[np.random.Generator, Canvas, TextureStyle, float], np.ndarray]
#: Texture families: each returns an ``H x W`` float32 field in [0, 1].
_TEXTURE_FAMILIES: dict[str, _TextureFn] = {
    "cloud": _texture_cloud,
    "stripes": _texture_stripes,
    "spots": _texture_spots,
    "grain": _texture_grain,
}


def render_texture(
    rng: np.random.Generator, canvas: Canvas, style: TextureStyle, phase: float | None = None
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
    rng: np.random.Generator, canvas: Canvas, extent: float, center: tuple[float, float] | None
) -> tuple[float, float]:
    """A centre that keeps a shape of radius ``extent`` mostly inside the image, unless given."""
    if center is not None:
        return float(center[0]), float(center[1])
    margin = 0.8 * extent
    row_low, row_high = min(margin, canvas.height / 2), max(canvas.height - margin, canvas.height / 2)
    col_low, col_high = min(margin, canvas.width / 2), max(canvas.width - margin, canvas.width / 2)
    return float(rng.uniform(row_low, row_high)), float(rng.uniform(col_low, col_high))


def rotated_offsets(canvas: Canvas, center_row: float, center_col: float, angle: float):
    """Pixel offsets from the centre in a frame rotated by ``angle``: (along, across), broadcast H x W."""
    d_rows = canvas.rows - center_row
    d_cols = canvas.cols - center_col
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return d_cols * cos + d_rows * sin, d_rows * cos - d_cols * sin


def _shape_ellipse(rng, canvas: Canvas, area: float, center=None) -> _Shape:
    aspect = rng.uniform(0.4, 1.0)
    semi_major = np.sqrt(area / (np.pi * aspect))
    semi_minor = aspect * semi_major
    angle = rng.uniform(0.0, np.pi)
    row, col = _place_center(rng, canvas, semi_major, center)
    along, across = rotated_offsets(canvas, row, col, angle)
    mask = (along / semi_major) ** 2 + (across / semi_minor) ** 2 <= 1.0
    return _Shape(mask, row, col, float(semi_major))


def _shape_polygon(rng, canvas: Canvas, area: float, center=None) -> _Shape:
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


def _shape_blob(rng, canvas: Canvas, area: float, center=None) -> _Shape:
    """A blobby shape: a noisy anisotropic bump thresholded to the target area, largest piece kept."""
    radius = np.sqrt(area / np.pi)
    aspect = rng.uniform(0.5, 1.0)
    angle = rng.uniform(0.0, np.pi)
    row, col = _place_center(rng, canvas, radius * 1.2, center)
    along, across = rotated_offsets(canvas, row, col, angle)
    squared_distance = (along * np.sqrt(aspect) / radius) ** 2 + (across / (np.sqrt(aspect) * radius)) ** 2
    wobble = smooth_noise(rng, canvas, max(6.0, radius / 1.5)) * rng.uniform(0.25, 0.5)
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


def _shape_rounded_rect(rng, canvas: Canvas, area: float, center=None) -> _Shape:
    aspect = rng.uniform(0.35, 1.0)
    half_long = np.sqrt(area / (4.0 * aspect))
    half_short = aspect * half_long
    corner = rng.uniform(0.15, 0.7) * half_short
    angle = rng.uniform(0.0, np.pi)
    row, col = _place_center(rng, canvas, np.hypot(half_long, half_short), center)
    along, across = rotated_offsets(canvas, row, col, angle)
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


def random_shape(
    rng: np.random.Generator,
    canvas: Canvas,
    area_fraction: float,
    kinds: tuple[str, ...] = tuple(_SHAPES),
    center: tuple[float, float] | None = None,
) -> _Shape:
    kind = kinds[int(rng.integers(len(kinds)))]
    return _SHAPES[kind](rng, canvas, area_fraction * canvas.area, center)


def object_area_fraction(rng: np.random.Generator, low: float | None = None, high: float | None = None) -> float:
    return _log_uniform(rng, low or _OBJECT_AREA_RANGE[0], high or _OBJECT_AREA_RANGE[1])


def shaded_object(rng: np.random.Generator, canvas: Canvas, shape: _Shape, colour: np.ndarray) -> np.ndarray:
    """``H x W x 3`` float32 fill for ``shape``: solid, a linear gradient, or sphere-like shading."""
    style = ("solid", "linear", "sphere")[int(rng.integers(3))]
    if style == "solid":
        return np.broadcast_to(colour, (canvas.height, canvas.width, 3))
    if style == "linear":
        factor = 0.75 + 0.5 * linear_ramp(rng, canvas)
    else:
        light_angle = rng.uniform(0.0, 2 * np.pi)
        light_row = shape.center_row + 0.4 * shape.radius * np.sin(light_angle)
        light_col = shape.center_col + 0.4 * shape.radius * np.cos(light_angle)
        distance = np.hypot(canvas.rows - light_row, canvas.cols - light_col) / (1.4 * shape.radius)
        factor = 1.2 - 0.55 * np.clip(distance, 0.0, 1.0)
    return np.clip(colour * factor[..., None], 0.0, 255.0)


def pixel_grain(rng: np.random.Generator, canvas: Canvas, sigma: float) -> np.ndarray:
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


def draw_clutter(
    rng: np.random.Generator,
    canvas: Canvas,
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
        colour = tuple(int(v) for v in random_colour(rng))
        _CLUTTER[kind](rng, draw, row, col, rng.uniform(*radius_range), colour)
    return ndimage.gaussian_filter(np.asarray(layer, dtype=np.float32), (0.8, 0.8, 0.0))
