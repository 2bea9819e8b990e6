"""Procedural demo scenes in the kinds of domain where SAM struggles, each rendered from a seed.

The demo data set (``demo_dataset``) and the tiny demo backbone's training and evaluation scenes
all come from ``render_scene``, with seeds that never overlap (``scene_seed``). Images are
``H x W x 3`` uint8 RGB, masks ``H x W`` bool; pixel coordinates are (row, column).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from modules.data.demo_primitives import (
    Canvas,
    TextureStyle,
    blend,
    contrasting_colour,
    draw_clutter,
    draw_texture_style,
    fractal_noise,
    linear_ramp,
    muted_colour,
    object_area_fraction,
    paint,
    pixel_grain,
    random_colour,
    random_shape,
    render_texture,
    rotated_offsets,
    shaded_object,
    smooth_noise,
    soft_alpha,
    standardise,
    to_unit_range,
)

GENERATOR_VERSION = "1"
#: Scene groups, in a fixed order: ``plain`` (a clear object on a smooth background),
#: ``camouflage`` (object textured like its background), ``shadow`` (the mask is a soft cast
#: shadow), ``transparent`` (a glass-like object), ``medical_gray`` (a low-contrast blob in a noisy
#: grayscale slice), ``thin`` (1-4 px vessels, cracks or wires on clutter).
GROUPS: tuple[str, ...] = ("plain", "camouflage", "shadow", "transparent", "medical_gray", "thin")
PURPOSES: tuple[str, ...] = ("demo", "backbone_train", "backbone_eval")

#: Inclusive range of image heights and widths drawn when ``render_scene`` gets ``size=None``.
SIZE_RANGE: tuple[int, int] = (192, 320)

# First entropy word of every seed sequence: keeps this generator's streams apart from any other
# SeedSequence built from small integers elsewhere in the project.
_SEED_DOMAIN_TAG = 0x0DE30DA7A
# A drawn scene is kept only if its foreground fraction lies in this range, else it is redrawn.
_MASK_FRACTION_LIMITS = {"thin": (0.002, 0.5)}
_DEFAULT_MASK_FRACTION_LIMITS = (0.01, 0.7)
_MAX_DRAW_ATTEMPTS = 32


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
        if not is_non_negative_int(value):
            raise ValueError(f"scene_seed {name} must be a non-negative integer, got {value!r}")
    entropy = (_SEED_DOMAIN_TAG, PURPOSES.index(purpose), int(base_seed), group_position, int(index))
    return np.random.SeedSequence(entropy)


def is_non_negative_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0


def _group_position(group: str) -> int:
    if group not in GROUPS:
        raise ValueError(f"unknown demo scene group {group!r}; expected one of {GROUPS}")
    return GROUPS.index(group)


# ----------------------------------------------------------------------------------------------
# Group renderers: each returns (image H x W x 3 float32 in ~[0, 255], mask H x W bool)
# ----------------------------------------------------------------------------------------------


def _render_plain(rng: np.random.Generator, canvas: Canvas) -> tuple[np.ndarray, np.ndarray]:
    start, end = random_colour(rng, 30, 225), random_colour(rng, 30, 225)
    background = paint(linear_ramp(rng, canvas), start, end)
    if rng.random() < 0.6:
        style = draw_texture_style(rng, ("cloud", "grain", "stripes"))
        texture = render_texture(rng, canvas, style) - 0.5
        background = background + texture[..., None] * rng.uniform(8.0, 24.0)
    shape = random_shape(rng, canvas, object_area_fraction(rng))
    colour = contrasting_colour(rng, background[shape.mask].mean(axis=0), min_distance=110.0)
    image = blend(background, shaded_object(rng, canvas, shape, colour), soft_alpha(shape.mask, 0.6))
    return image + pixel_grain(rng, canvas, 2.0), shape.mask


def _render_camouflage(rng: np.random.Generator, canvas: Canvas) -> tuple[np.ndarray, np.ndarray]:
    style = draw_texture_style(rng)
    dark = muted_colour(rng, 30, 130, rng.uniform(0.3, 1.0))
    light = np.clip(dark + muted_colour(rng, 50, 130, rng.uniform(0.3, 1.0)), 0, 255)
    background = paint(render_texture(rng, canvas, style), dark, light)
    # The object is a fresh draw of the same family with slightly changed scale, angle and colour.
    object_style = TextureStyle(
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
    shape = random_shape(rng, canvas, object_area_fraction(rng, 0.05), ("blob", "ellipse", "polygon"))
    fill = paint(render_texture(rng, canvas, object_style), dark + colour_shift, light + colour_shift)
    image = blend(background, fill, soft_alpha(shape.mask, 0.8))
    # Scene-wide illumination so that the object does not stand out by its brightness alone.
    illumination = 0.85 + 0.3 * to_unit_range(smooth_noise(rng, canvas, 0.6 * max(canvas.height, canvas.width)))
    return image * illumination[..., None] + pixel_grain(rng, canvas, 4.0), shape.mask


def _render_shadow(rng: np.random.Generator, canvas: Canvas) -> tuple[np.ndarray, np.ndarray]:
    style = draw_texture_style(rng, ("cloud", "grain", "spots", "stripes"))
    base = muted_colour(rng, 90, 200, rng.uniform(0.1, 0.6))
    spread = rng.uniform(35.0, 80.0)
    ground = paint(render_texture(rng, canvas, style), base - spread / 2, base + spread / 2)
    patches = to_unit_range(fractal_noise(rng, canvas, 0.4 * max(canvas.height, canvas.width), octaves=2))
    ground = ground * (0.85 + 0.3 * patches)[..., None]

    caster = random_shape(rng, canvas, object_area_fraction(rng, 0.05, 0.35))
    penumbra_sigma = rng.uniform(1.5, 5.0)
    darkness = soft_alpha(caster.mask, penumbra_sigma)
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
        occluder = random_shape(rng, canvas, occluder_area, ("ellipse", "rounded_rect", "polygon"), occluder_center)
        colour = contrasting_colour(rng, base, min_distance=60.0)
        image = blend(image, shaded_object(rng, canvas, occluder, colour), soft_alpha(occluder.mask, 0.6))
        shadow_mask = shadow_mask & ~occluder.mask
    return image + pixel_grain(rng, canvas, 3.0), shadow_mask


def _render_transparent(rng: np.random.Generator, canvas: Canvas) -> tuple[np.ndarray, np.ndarray]:
    style = draw_texture_style(rng)
    dark, light = random_colour(rng, 20, 140), random_colour(rng, 110, 240)
    background = paint(render_texture(rng, canvas, style), dark, light)
    background = draw_clutter(rng, canvas, background, int(rng.integers(3, 8)), ("ellipse", "polygon"), (8.0, 32.0))

    glass = random_shape(rng, canvas, object_area_fraction(rng, 0.05), ("ellipse", "rounded_rect", "polygon", "blob"))
    # Refraction: the background inside is slightly magnified about the centre and wobbles.
    magnification = rng.uniform(0.86, 0.97)
    wobble = rng.uniform(0.5, 2.0)
    source_rows = glass.center_row + (canvas.rows - glass.center_row) * magnification
    source_cols = glass.center_col + (canvas.cols - glass.center_col) * magnification
    source_rows = source_rows + wobble * smooth_noise(rng, canvas, 20.0)
    source_cols = source_cols + wobble * smooth_noise(rng, canvas, 20.0)
    row_index = np.clip(np.rint(source_rows), 0, canvas.height - 1).astype(np.intp)
    col_index = np.clip(np.rint(source_cols), 0, canvas.width - 1).astype(np.intp)
    refracted = background[row_index, col_index]
    tint = random_colour(rng, 170, 255)
    inside = blend(refracted, tint, np.full(refracted.shape[:2], rng.uniform(0.05, 0.16), np.float32))
    inside = inside * rng.uniform(1.0, 1.08)
    image = blend(background, inside, soft_alpha(glass.mask, 0.6))

    # Rim: brightest on the side facing the light, peaks at the boundary of the glass.
    edge = soft_alpha(glass.mask, rng.uniform(0.8, 1.6))
    rim = 4.0 * edge * (1.0 - edge)
    grad_rows, grad_cols = np.gradient(edge)
    light_angle = rng.uniform(0.0, 2 * np.pi)
    facing = -(grad_rows * np.sin(light_angle) + grad_cols * np.cos(light_angle))
    facing = facing / (np.abs(facing).max() + 1e-6)
    image = image + (rim * rng.uniform(12.0, 30.0) * (0.6 + 0.4 * facing))[..., None]

    # Specular highlight: a soft elongated spot inside, towards the light.
    spot_row = glass.center_row - 0.45 * glass.radius * np.sin(light_angle)
    spot_col = glass.center_col - 0.45 * glass.radius * np.cos(light_angle)
    along, across = rotated_offsets(canvas, spot_row, spot_col, light_angle + np.pi / 2)
    spot_length = max(3.0, 0.3 * glass.radius)
    highlight = np.exp(-((along / spot_length) ** 2 + (across / (0.3 * spot_length)) ** 2)) * glass.mask
    image = image + (highlight * rng.uniform(25.0, 60.0))[..., None]
    return image + pixel_grain(rng, canvas, 2.0), glass.mask


def _render_medical_gray(rng: np.random.Generator, canvas: Canvas) -> tuple[np.ndarray, np.ndarray]:
    # Body cross-section: a large soft ellipse of tissue surrounded by dark air.
    body_center = (canvas.height * rng.uniform(0.45, 0.55), canvas.width * rng.uniform(0.45, 0.55))
    body_semi_rows = canvas.height * rng.uniform(0.40, 0.50)
    body_semi_cols = canvas.width * rng.uniform(0.40, 0.50)
    body_distance = np.sqrt(
        ((canvas.rows - body_center[0]) / body_semi_rows) ** 2 + ((canvas.cols - body_center[1]) / body_semi_cols) ** 2
    )
    body = body_distance <= 1.0
    body_alpha = soft_alpha(body, 1.5)

    tissue_level = rng.uniform(85.0, 135.0)
    tissue = tissue_level + rng.uniform(6.0, 12.0) * fractal_noise(rng, canvas, rng.uniform(10.0, 30.0))
    fat = smooth_noise(rng, canvas, rng.uniform(6.0, 12.0)) > rng.uniform(1.0, 1.6)
    tissue = tissue + rng.uniform(12.0, 25.0) * soft_alpha(fat, 1.2)
    air_level = rng.uniform(8.0, 25.0)
    gray = air_level + body_alpha * (tissue - air_level)

    # Organ centred well inside the body so that the mask and the body agree.
    angle = rng.uniform(0.0, 2 * np.pi)
    offset = rng.uniform(0.0, 0.45)
    organ_center = (
        body_center[0] + offset * body_semi_rows * np.sin(angle),
        body_center[1] + offset * body_semi_cols * np.cos(angle),
    )
    organ = random_shape(rng, canvas, object_area_fraction(rng, 0.03, 0.25), ("blob", "ellipse"), organ_center)
    organ_mask = organ.mask & body
    contrast = rng.choice([-1.0, 1.0]) * rng.uniform(18.0, 32.0)
    organ_texture = rng.uniform(3.0, 7.0) * smooth_noise(rng, canvas, rng.uniform(4.0, 10.0))
    organ_alpha = soft_alpha(organ_mask, rng.uniform(1.2, 3.0))
    # The organ replaces the tissue (no fat inside it): a homogeneous region with its own texture.
    organ_intensity = tissue_level + contrast + organ_texture
    gray = gray + organ_alpha * (organ_intensity - gray)

    # Speckle (multiplicative, slightly correlated) then additive Gaussian noise.
    speckle = standardise(ndimage.gaussian_filter(rng.standard_normal(gray.shape, dtype=np.float32), 0.8))
    gray = gray * (1.0 + rng.uniform(0.05, 0.12) * speckle)
    gray = gray + rng.uniform(3.0, 7.0) * rng.standard_normal(gray.shape, dtype=np.float32)
    return np.repeat(gray[..., None], 3, axis=2), organ_mask


def _walk_path(
    rng: np.random.Generator,
    canvas: Canvas,
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


def _border_start(rng: np.random.Generator, canvas: Canvas) -> tuple[tuple[float, float], float]:
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


def _draw_vessels(rng: np.random.Generator, canvas: Canvas, draw: ImageDraw.ImageDraw) -> None:
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


def _draw_cracks(rng: np.random.Generator, canvas: Canvas, draw: ImageDraw.ImageDraw) -> None:
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


def _draw_wires(rng: np.random.Generator, canvas: Canvas, draw: ImageDraw.ImageDraw) -> None:
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
_THIN_STRUCTURES: dict[str, Callable[[np.random.Generator, Canvas, ImageDraw.ImageDraw], None]] = {
    "vessels": _draw_vessels,
    "cracks": _draw_cracks,
    "wires": _draw_wires,
}


def _render_thin(rng: np.random.Generator, canvas: Canvas) -> tuple[np.ndarray, np.ndarray]:
    style = draw_texture_style(rng)
    dark, light = random_colour(rng, 40, 150), random_colour(rng, 110, 230)
    background = np.clip(paint(render_texture(rng, canvas, style), dark, light), 0, 255)
    # Strokes are at least 5 px wide, so the clutter can never pass for a thin structure.
    background = draw_clutter(rng, canvas, background, int(rng.integers(8, 20)), ("ellipse", "stroke"), (4.0, 18.0))
    background = background + to_unit_range(smooth_noise(rng, canvas, 3.0))[..., None] * 20.0 - 10.0

    structure_layer = Image.new("L", (canvas.width, canvas.height), 0)
    kind = tuple(_THIN_STRUCTURES)[int(rng.integers(len(_THIN_STRUCTURES)))]
    _THIN_STRUCTURES[kind](rng, canvas, ImageDraw.Draw(structure_layer))
    mask = np.asarray(structure_layer, dtype=bool)

    reference = background[mask].mean(axis=0) if mask.any() else background.mean(axis=(0, 1))
    brightness = 0.35 if rng.random() < 0.75 else 1.6
    colour = np.clip(reference * brightness + rng.uniform(-15, 15, 3), 0, 255)
    alpha = np.clip(soft_alpha(mask, 0.5) * 1.4, 0.0, 1.0)
    image = blend(background, colour.astype(np.float32), alpha)
    return image + pixel_grain(rng, canvas, 3.0), mask


_Renderer = Callable[[np.random.Generator, Canvas], tuple[np.ndarray, np.ndarray]]
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
    canvas = Canvas.of_size(height, width)
    low, high = _MASK_FRACTION_LIMITS.get(group, _DEFAULT_MASK_FRACTION_LIMITS)
    # Redraws continue the same generator stream, so the accepted draw is still deterministic.
    for _ in range(_MAX_DRAW_ATTEMPTS):
        image, mask = renderer(rng, canvas)
        foreground = int(mask.sum())
        if low * canvas.area <= foreground <= high * canvas.area and 0 < foreground < canvas.area:
            return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask
    raise RuntimeError(f"demo group {group!r}: no valid mask in {_MAX_DRAW_ATTEMPTS} draws (generator bug)")
