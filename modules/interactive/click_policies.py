"""Where the next click goes: the uncertainty policies and the error oracle of interactive segmentation.

Every policy works on one image's maps in one frame (``H x W``, usually FRAME256 for the uncertainty
maps) and returns a ``ClickChoice`` in that frame. Pixels already clicked, and with
``min_distance > 0`` every pixel closer than that to a previous click, are never chosen; a choice
is always inside the map.

- ``choose_by_map``: the argmax of an uncertainty map (BALD = the Laplace mutual information, total
  entropy, the variance network, prompt-perturbation disagreement, SAM's entropy); it never sees
  the ground truth. Ties go to the first pixel in raster order.
- ``choose_at_random``: a uniformly random allowed pixel (seeded).
- ``choose_by_error_oracle``: the standard simulated annotator of interactive segmentation (f-BRS,
  RITM): the interior point farthest from the boundary of the largest error region, positive where
  foreground is missed, negative where background is covered. It reads the ground truth: it is the
  oracle baseline, not an uncertainty method.

The simulated annotator answers every uncertainty click with the ground-truth label of the chosen
pixel (``annotator_label``); that is the only ground truth the uncertainty policies' runs read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from modules.core.frames import FRAME256
from modules.uncertainty.strategies import StrategyOutput

#: ``min_distance: auto`` keeps clicks this many prompt-map sigmas apart (``click_spacing``).
CLICK_SPACING_SIGMAS = 2.0


def click_spacing(setting: str | float, gaussian_sigma: float, original_hw: tuple[int, int] | None = None) -> float:
    """``min_distance`` in pixels: a number as it is; ``auto``: ``CLICK_SPACING_SIGMAS`` times the
    prompt maps' ``gaussian_sigma`` (a FRAME256 length), in FRAME256 pixels, or with ``original_hw``
    in ORIGINAL pixels along the image's longer side (FRAME256 stretches each side to 256).

    Why ``auto`` is not 0: the head reads clicks as Gaussian prompt maps, summed and clamped to 1, so a
    click within a sigma or two of an earlier one of the same label barely changes its input, yet the
    uncertainty there need not fall; without spacing BALD kept clicking one spot (README,
    "Simulated clicks")."""
    if setting == "auto":
        scale = 1.0 if original_hw is None else max(original_hw) / FRAME256
        return CLICK_SPACING_SIGMAS * float(gaussian_sigma) * scale
    if isinstance(setting, str) or not np.isfinite(setting) or setting < 0:
        raise ValueError(f"min_distance: must be 'auto' or a non-negative number, got {setting!r}")
    return float(setting)


@dataclass(frozen=True)
class ClickChoice:
    """A chosen pixel ``(row, col)`` of the map's frame and, for the oracle, its label (1 / 0)."""

    row: int
    col: int
    label: int | None = None


@dataclass(frozen=True)
class ClickPolicy:
    """How a policy chooses: ``map`` (the argmax of ``strategy``'s ``map_name``; it never sees the
    ground truth), ``random``, or ``oracle`` (the error oracle, which reads the ground truth)."""

    kind: str
    strategy: str | None = None
    map_name: str | None = None

    @property
    def reads_ground_truth(self) -> bool:
        return self.kind == "oracle"

    def map_of(self, output: StrategyOutput) -> torch.Tensor:
        """The ``P x 256 x 256`` map this policy reads from ``strategy``'s output: ``map_name``, or
        the strategy's primary map where ``map_name`` is None (a map whose meaning depends on the
        fitted model, as the variance network's on its loss)."""
        return output.maps[self.map_name or output.primary_map]


#: Policy name -> policy, for the click simulation (``evaluation.active_prompting.policies``) and the
#: predictor's ``suggest_click``. ``bald``: the Laplace posterior's mutual information (its epistemic
#: part); ``entropy``: its total predictive entropy; ``prompt_perturbation``: where the jittered
#: prompts disagree most (their mutual information).
CLICK_POLICIES: dict[str, ClickPolicy] = {
    "oracle": ClickPolicy("oracle"),
    "bald": ClickPolicy("map", "laplace", "mutual_information"),
    "entropy": ClickPolicy("map", "laplace", "total_entropy"),
    "variance_network": ClickPolicy("map", "variance_network"),
    "head_entropy": ClickPolicy("map", "map_head", "entropy"),
    "sam_entropy": ClickPolicy("map", "raw_sam", "entropy"),
    "prompt_perturbation": ClickPolicy("map", "prompt_perturbation", "mutual_information"),
    "random": ClickPolicy("random"),
}


def blocked_pixels(shape: tuple[int, int], clicks: list[tuple[int, int]], min_distance: float = 0.0) -> np.ndarray:
    """``H x W`` bool: the clicked pixels and, with ``min_distance > 0``, every pixel at a Euclidean
    distance below ``min_distance`` from one of them."""
    blocked = np.zeros(shape, dtype=bool)
    if not clicks:
        return blocked
    rows, cols = np.asarray(clicks, dtype=np.int64).T
    if rows.min() < 0 or cols.min() < 0 or rows.max() >= shape[0] or cols.max() >= shape[1]:
        raise ValueError(f"click outside the {shape[0]} x {shape[1]} map: {clicks}")
    blocked[rows, cols] = True
    if min_distance > 0:
        blocked |= ndimage.distance_transform_edt(~blocked) < min_distance
    return blocked


def choose_by_map(score_map: np.ndarray, clicks: list[tuple[int, int]], min_distance: float = 0.0) -> ClickChoice | None:
    """The allowed pixel of ``score_map`` (``H x W``, higher = click here) with the highest score;
    ``None`` when every pixel is blocked. NaN scores are never chosen."""
    scores = np.asarray(score_map, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"score map: expected H x W, got shape {scores.shape}")
    allowed = ~blocked_pixels(scores.shape, clicks, min_distance) & ~np.isnan(scores)
    if not allowed.any():
        return None
    flat = np.where(allowed, scores, -np.inf).ravel()
    row, col = np.unravel_index(int(np.argmax(flat)), scores.shape)
    return ClickChoice(int(row), int(col))


def choose_at_random(shape: tuple[int, int], clicks: list[tuple[int, int]], rng: np.random.Generator,
                     min_distance: float = 0.0) -> ClickChoice | None:
    """A uniformly random allowed pixel of an ``H x W`` map; ``None`` when every pixel is blocked."""
    allowed = np.flatnonzero(~blocked_pixels(shape, clicks, min_distance))
    if allowed.size == 0:
        return None
    row, col = np.unravel_index(int(rng.choice(allowed)), shape)
    return ClickChoice(int(row), int(col))


def choose_by_error_oracle(predicted: np.ndarray, truth: np.ndarray, clicks: list[tuple[int, int]],
                           min_distance: float = 0.0) -> ClickChoice | None:
    """The error oracle's next click (``predicted`` and ``truth`` ``H x W`` bool, one frame).

    The error regions are the connected components (8-connectivity) of the missed foreground
    (``truth & ~predicted``, label 1) and of the covered background (``predicted & ~truth``, label
    0). In the largest region (ties: missed foreground first, then the first in raster order), the
    click goes to the allowed pixel farthest from the region's boundary, the image border counting as
    boundary. ``None`` when the prediction is exact or every error pixel is blocked.
    """
    predicted, truth = np.asarray(predicted, dtype=bool), np.asarray(truth, dtype=bool)
    if predicted.shape != truth.shape or predicted.ndim != 2:
        raise ValueError(f"oracle: predicted {predicted.shape} and truth {truth.shape} must be one H x W frame")
    allowed = ~blocked_pixels(truth.shape, clicks, min_distance)
    regions = []
    for label, error in ((1, truth & ~predicted), (0, predicted & ~truth)):
        components, count = ndimage.label(error & allowed, structure=np.ones((3, 3), dtype=bool))
        if count:
            sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
            regions.append((int(sizes.max()), label, components == int(np.argmax(sizes)) + 1))
    if not regions:
        return None
    _, label, region = max(regions, key=lambda item: (item[0], item[1]))
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return ClickChoice(int(row), int(col), label)


def annotator_label(truth: np.ndarray, choice: ClickChoice) -> int:
    """The simulated annotator's answer for a chosen pixel: its ground-truth label (1 / 0)."""
    return int(bool(np.asarray(truth)[choice.row, choice.col]))
