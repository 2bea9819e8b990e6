"""Test-time augmentation (TTA) with exact inverses, batched through a frozen SAM backbone.

Every transform maps the image and the prompts forward and the predicted FRAME256 logits back
exactly (flips and quarter turns permute pixels, a rescale keeps the FRAME256 extent, photometric
jitter moves nothing), so the K predictions can be averaged pixel by pixel. Photometric factors
follow torchvision's ``ColorJitter`` and are seeded per (seed, sample key, transform index).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from modules.core.config import ConfigError
from modules.sam.prompting import Prompts, decode_selected, round_features

#: Default photometric magnitudes (see the module docstring).
PHOTOMETRIC_DEFAULTS: dict[str, float] = {"brightness": 0.1, "contrast": 0.05, "saturation": 0.05, "hue": 0.5}
IDENTITY = "identity"
RESCALE_PREFIX = "rescale_"
TRANSFORMS_KEY = "evaluation.tta.transforms"
MAGNITUDES_KEY = "evaluation.tta.magnitudes"


def transform_rng(seed: int, sample_key: int, transform_index: int) -> np.random.Generator:
    """The generator of one augmentation: ``SeedSequence((seed, sample_key, transform_index))``."""
    return np.random.default_rng(np.random.SeedSequence((int(seed), int(sample_key), int(transform_index))))


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"tta: expected an H x W x 3 uint8 image, got {getattr(image, 'shape', None)} "
                         f"{getattr(image, 'dtype', None)}")


class ImageTransform(ABC):
    """One augmentation: forward maps for the image and the prompts, inverse for FRAME256 logits.

    ``hw`` arguments are the ``(H, W)`` of the image BEFORE the transform; ``output_hw`` gives the
    size after it. Prompt maps accept any leading shape (``... x 2`` points, ``... x 4`` boxes).
    """

    name: str
    #: True when ``apply_image`` draws from the generator it is given.
    random: ClassVar[bool] = False

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """``(H', W')`` of the transformed image."""
        return (int(hw[0]), int(hw[1]))

    @abstractmethod
    def apply_image(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """``H x W x 3`` uint8 -> ``H' x W' x 3`` uint8."""

    def apply_mask(self, mask: np.ndarray) -> np.ndarray:
        """``H x W`` bool -> ``H' x W'`` bool (nearest neighbour); the geometric part only."""
        return np.asarray(mask, dtype=bool).copy()

    def map_points(self, points: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """``... x 2`` (x, y) pixel coordinates of the original image -> the transformed image's."""
        return points.clone()

    def map_boxes(self, boxes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """``... x 4`` (x0, y0, x1, y1) inclusive boxes -> the transformed image's (x0 <= x1, y0 <= y1)."""
        return boxes.clone()

    def forward_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``... x 256 x 256`` maps in the original FRAME256 -> the transformed image's FRAME256."""
        return logits.clone()

    def invert_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``... x 256 x 256`` maps in the transformed image's FRAME256 -> the original FRAME256."""
        return logits.clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


@dataclass(frozen=True, repr=False)
class DihedralTransform(ImageTransform):
    """An optional horizontal flip followed by ``quarter_turns`` counter-clockwise quarter turns.

    A permutation of pixels: prompts map exactly, logits invert exactly (module docstring).
    """

    name: str
    hflip: bool
    quarter_turns: int

    def output_hw(self, hw):
        height, width = int(hw[0]), int(hw[1])
        return (width, height) if self.quarter_turns % 2 else (height, width)

    def apply_image(self, image, rng=None):
        _check_image(image)
        return self.apply_mask(image)

    def apply_mask(self, mask):
        array = np.asarray(mask)
        if self.hflip:
            array = array[:, ::-1]
        return np.ascontiguousarray(np.rot90(array, k=self.quarter_turns))

    def map_points(self, points, hw):
        height, width = int(hw[0]), int(hw[1])
        x, y = points[..., 0], points[..., 1]
        if self.hflip:
            x = (width - 1) - x
        for _ in range(self.quarter_turns):
            x, y = y, (width - 1) - x
            height, width = width, height
        return torch.stack([x, y], dim=-1)

    def map_boxes(self, boxes, hw):
        corners = self.map_points(boxes.reshape(*boxes.shape[:-1], 2, 2), hw)
        low, high = corners.min(dim=-2).values, corners.max(dim=-2).values
        return torch.cat([low, high], dim=-1)

    def forward_logits(self, logits):
        if self.hflip:
            logits = logits.flip(-1)
        return torch.rot90(logits, k=self.quarter_turns, dims=(-2, -1)).contiguous()

    def invert_logits(self, logits):
        logits = torch.rot90(logits, k=-self.quarter_turns, dims=(-2, -1))
        if self.hflip:
            logits = logits.flip(-1)
        return logits.contiguous()


@dataclass(frozen=True, repr=False)
class RescaleTransform(ImageTransform):
    """Resize by ``scale`` (PIL bilinear for images, nearest for masks); identity on FRAME256 logits.

    Points map pixel centre to pixel centre, ``x' = (x + 0.5) * W' / W - 0.5``; boxes map their
    pixel edges, ``x0' = x0 * W' / W`` and ``x1' = (x1 + 1) * W' / W - 1`` (the box covers the same
    scene extent, as ``promptset.to_frame256_box``), kept at least ``x0'`` for one-pixel boxes.
    """

    name: str
    scale: float

    def output_hw(self, hw):
        return tuple(max(1, int(round(int(side) * self.scale))) for side in hw)

    def _factors(self, hw) -> tuple[float, float]:
        out_h, out_w = self.output_hw(hw)
        return out_w / int(hw[1]), out_h / int(hw[0])

    def apply_image(self, image, rng=None):
        _check_image(image)
        out_h, out_w = self.output_hw(image.shape[:2])
        return np.array(Image.fromarray(image).resize((out_w, out_h), Image.BILINEAR))

    def apply_mask(self, mask):
        out_h, out_w = self.output_hw(mask.shape[:2])
        resized = Image.fromarray(np.asarray(mask, dtype=np.uint8)).resize((out_w, out_h), Image.NEAREST)
        return np.asarray(resized).astype(bool)

    def map_points(self, points, hw):
        factor_x, factor_y = self._factors(hw)
        factors = points.new_tensor([factor_x, factor_y])
        return (points + 0.5) * factors - 0.5

    def map_boxes(self, boxes, hw):
        factor_x, factor_y = self._factors(hw)
        factors = boxes.new_tensor([factor_x, factor_y])
        low = boxes[..., 0:2] * factors
        high = torch.maximum((boxes[..., 2:4] + 1.0) * factors - 1.0, low)
        return torch.cat([low, high], dim=-1)


def _multiplicative_factor(rng: np.random.Generator, magnitude: float) -> float:
    return float(rng.uniform(max(0.0, 1.0 - magnitude), 1.0 + magnitude))


def _shift_factor(rng: np.random.Generator, magnitude: float) -> float:
    return float(rng.uniform(-magnitude, magnitude))


#: Photometric name -> (the ``torchvision.transforms.functional`` function applied to a ``3 x H x W``
#: uint8 tensor, the sampler of its factor from the magnitude, the largest valid magnitude).
PHOTOMETRIC_ADJUSTMENTS: dict[str, tuple[str, Callable[[np.random.Generator, float], float], float]] = {
    "brightness": ("adjust_brightness", _multiplicative_factor, math.inf),
    "contrast": ("adjust_contrast", _multiplicative_factor, math.inf),
    "saturation": ("adjust_saturation", _multiplicative_factor, math.inf),
    "hue": ("adjust_hue", _shift_factor, 0.5),
}


@dataclass(frozen=True, repr=False)
class PhotometricTransform(ImageTransform):
    """A colour jitter with a factor drawn from the generator; no geometry changes."""

    name: str
    magnitude: float
    random: ClassVar[bool] = True

    def draw_factor(self, rng: np.random.Generator) -> float:
        _, sampler, _ = PHOTOMETRIC_ADJUSTMENTS[self.name]
        return sampler(rng, self.magnitude)

    def apply_image(self, image, rng=None):
        _check_image(image)
        if rng is None:
            raise ValueError(f"tta transform {self.name!r}: a seeded np.random.Generator is required")
        function_name, _, _ = PHOTOMETRIC_ADJUSTMENTS[self.name]
        # writable and contiguous (cached images may be read-only views; torch warns on those)
        pixels = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
        adjusted = getattr(TF, function_name)(pixels, self.draw_factor(rng))
        return adjusted.permute(1, 2, 0).contiguous().numpy()


#: Geometric transforms by config name (``rescale_<s>`` is parsed separately).
DIHEDRAL_TRANSFORMS: dict[str, DihedralTransform] = {
    IDENTITY: DihedralTransform(IDENTITY, hflip=False, quarter_turns=0),
    "hflip": DihedralTransform("hflip", hflip=True, quarter_turns=0),
    "vflip": DihedralTransform("vflip", hflip=True, quarter_turns=2),
    "rot90": DihedralTransform("rot90", hflip=False, quarter_turns=1),
    "rot180": DihedralTransform("rot180", hflip=False, quarter_turns=2),
    "rot270": DihedralTransform("rot270", hflip=False, quarter_turns=3),
}


def known_transform_names() -> list[str]:
    return [*DIHEDRAL_TRANSFORMS, f"{RESCALE_PREFIX}<s>", *PHOTOMETRIC_ADJUSTMENTS]


def build_transform(name: str, magnitudes: Mapping[str, float] | None = None) -> ImageTransform:
    """One transform from its config name; photometric magnitudes from ``magnitudes`` or the defaults.

    Raises:
        ConfigError: unknown name, malformed ``rescale_<s>`` or an out-of-range magnitude.
    """
    name = str(name).strip()
    if name in DIHEDRAL_TRANSFORMS:
        return DIHEDRAL_TRANSFORMS[name]
    if name.startswith(RESCALE_PREFIX):
        try:
            scale = float(name[len(RESCALE_PREFIX):])
        except ValueError:
            scale = float("nan")
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"{TRANSFORMS_KEY}: {name!r} must be rescale_<positive number>, e.g. rescale_0.75")
        return RescaleTransform(name, scale)
    if name in PHOTOMETRIC_ADJUSTMENTS:
        merged = {**PHOTOMETRIC_DEFAULTS, **dict(magnitudes or {})}
        magnitude = float(merged[name])
        largest = PHOTOMETRIC_ADJUSTMENTS[name][2]
        if not 0.0 <= magnitude <= largest:
            raise ConfigError(f"{MAGNITUDES_KEY}.{name}: must be in [0, {largest}], got {magnitude}")
        return PhotometricTransform(name, magnitude)
    raise ConfigError(f"{TRANSFORMS_KEY}: unknown transform {name!r} (known: {', '.join(known_transform_names())})")


def build_transforms(names: Sequence[str], magnitudes: Mapping[str, float] | None = None) -> list[ImageTransform]:
    """The TTA list: the clean pass (``identity``) first, then ``names`` in order.

    An ``identity`` inside ``names`` is not repeated (the clean pass is always there exactly once).
    Other names may repeat: repeated photometric transforms draw different factors (the seed includes
    the transform's index). Unknown magnitude keys are a ``ConfigError``.
    """
    unknown = sorted(set(magnitudes or {}) - set(PHOTOMETRIC_ADJUSTMENTS))
    if unknown:
        raise ConfigError(f"{MAGNITUDES_KEY}: unknown key(s) {unknown} (known: {list(PHOTOMETRIC_ADJUSTMENTS)})")
    transforms = [DIHEDRAL_TRANSFORMS[IDENTITY]]
    transforms += [build_transform(name, magnitudes) for name in names if str(name).strip() != IDENTITY]
    return transforms


# --------------------------------------------------------------------------- prediction


def decode_selected_logits(backbone, features: Mapping[str, torch.Tensor], original_hw: tuple[int, int],
                           points: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None,
                           prompt_mode: str, multimask_policy: str) -> torch.Tensor:
    """One ``decode`` call for P prompt sets of one image -> selected logits ``P x 256 x 256`` (FRAME256).

    ``prompt_mode`` and ``multimask_policy`` as ``sam.prompt_mode`` / ``sam.multimask_policy``
    (``modules.sam.prompting.decode_selected``).
    """
    return decode_selected(backbone, features, original_hw, Prompts(points, labels, boxes), prompt_mode,
                           multimask_policy).logits


def tta_predict(
    backbone,
    image: np.ndarray,
    points: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    transforms: Sequence[ImageTransform],
    prompt_mode: str,
    multimask_policy: str,
    encoder_batch_size: int,
    seed: int = 0,
    sample_key: int = 0,
    clean_features: Mapping[str, torch.Tensor] | None = None,
    fp16_features: bool = True,
) -> torch.Tensor:
    """Foreground probabilities of every augmentation, mapped back to the original FRAME256.

    Args:
        backbone: a ``modules.sam.base.Backbone``.
        image: ``H x W x 3`` uint8, the ORIGINAL image.
        points: ``P x N x 2`` ORIGINAL pixel coordinates; labels ``P x N`` (-1 padding);
            boxes ``P x 4`` inclusive ORIGINAL pixel boxes.
        transforms: from ``build_transforms`` (identity first). K = ``len(transforms)``.
        prompt_mode, multimask_policy: as ``sam.prompt_mode`` / ``sam.multimask_policy``.
        encoder_batch_size: augmented images per ``backbone.encode`` call.
        seed, sample_key: seed the photometric draws per (seed, sample_key, transform index).
        clean_features: the cached encoder features of the ORIGINAL image (``name -> C x h x w``);
            when given, identity transforms reuse them instead of running the encoder.
        fp16_features: round encoder outputs to float16 before decoding, exactly as the cache does,
            so the clean pass reproduces the cached logits.

    Returns:
        ``K x P x 256 x 256`` float32 on ``backbone.device``: ``sigmoid`` of the selected output's
        logits, inverted into the original FRAME256.
    """
    _check_image(image)
    if int(encoder_batch_size) < 1:
        raise ConfigError(f"sam.encoder_batch_size: must be at least 1, got {encoder_batch_size}")
    if not transforms:
        raise ValueError("tta_predict: empty transform list (build it with tta.build_transforms)")
    original_hw = (int(image.shape[0]), int(image.shape[1]))
    points, labels, boxes = (torch.as_tensor(t).float() for t in (points, labels, boxes))
    labels = labels.long()
    probs: list[torch.Tensor | None] = [None] * len(transforms)

    def decode_into(index: int, features: Mapping[str, torch.Tensor], transformed_hw) -> None:
        transform = transforms[index]
        logits = decode_selected_logits(
            backbone, features, transformed_hw,
            transform.map_points(points, original_hw), labels, transform.map_boxes(boxes, original_hw),
            prompt_mode, multimask_policy,
        )
        probs[index] = torch.sigmoid(transform.invert_logits(logits))

    to_encode = list(range(len(transforms)))
    if clean_features is not None:
        clean = {name: torch.as_tensor(value) for name, value in clean_features.items()}
        clean = round_features(clean) if fp16_features else clean
        reusable = [i for i in to_encode if transforms[i] == DIHEDRAL_TRANSFORMS[IDENTITY]]
        for index in reusable:
            decode_into(index, clean, original_hw)
        to_encode = [i for i in to_encode if i not in reusable]

    for start in range(0, len(to_encode), int(encoder_batch_size)):
        batch = to_encode[start : start + int(encoder_batch_size)]
        pixels, sizes = [], []
        for index in batch:
            rng = transform_rng(seed, sample_key, index) if transforms[index].random else None
            augmented = transforms[index].apply_image(image, rng)
            sizes.append((int(augmented.shape[0]), int(augmented.shape[1])))
            pixels.append(backbone.preprocess(augmented))
        features = backbone.encode(torch.stack(pixels))
        if fp16_features:
            features = round_features(features)
        for position, index in enumerate(batch):
            single = {name: value[position : position + 1] for name, value in features.items()}
            decode_into(index, single, sizes[position])
    return torch.stack(probs).float()
