"""Prompt perturbation: K predictions from the original prompt and K-1 jittered copies, decoded on the
cached image embedding in one batched decoder call (no encoder pass).

The jitter is SAM's own training noise (box corners by up to ``min(0.1 side, 20 px)``, points by up
to 20 px), in a 1024-pixel reference frame scaled to the image; each prompt set seeds its copies
from ``(seed, sample key, promptset id)``.

A jittered point needs a label. The original systems re-read it from the ground truth at the new
spot, which a deployed system cannot do; here that is only the oracle ablation (the caller passes
the ground truth as ``label_masks``). The deployable ``LABEL_SOURCES``:

- ``original`` (the default): the jittered point keeps the label the user gave. The perturbation
  then models one thing, imprecise click placement with unchanged intent, and needs nothing but
  the prompt itself.
- ``own_mask``: the label is read from the first pass's own mask (the cached SAM prediction of the
  unperturbed prompt set) at the new spot: the oracle's re-read with the model's belief in place of
  the truth. It makes every copy agree with the first pass wherever a point crosses the predicted
  boundary, so it confirms the first pass's errors rather than probing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from modules.core.config import ConfigError
from modules.data.promptset import sample_key as sample_key_of_id
from modules.uncertainty.tta import decode_selected_logits

SAM_REFERENCE_SIDE = 1024
MAGNITUDES_KEY = "evaluation.prompt_perturbation"
#: ``evaluation.prompt_perturbation.label_source`` values: labels a deployed system has (module docstring).
LABEL_SOURCES = ("original", "own_mask")


@dataclass(frozen=True)
class PerturbationMagnitudes:
    """Jitter sizes; pixel amounts are in a ``reference_side`` frame (SAM's 1024 by default)."""

    point_noise_px: float = 20.0
    box_noise_fraction: float = 0.1
    box_noise_max_px: float = 20.0
    reference_side: float = SAM_REFERENCE_SIDE

    def __post_init__(self) -> None:
        for name in ("point_noise_px", "box_noise_fraction", "box_noise_max_px"):
            if not float(getattr(self, name)) >= 0.0:
                raise ConfigError(f"{MAGNITUDES_KEY}.{name}: must be >= 0, got {getattr(self, name)}")
        if not float(self.reference_side) > 0.0:
            raise ConfigError(f"{MAGNITUDES_KEY}.reference_side: must be > 0, got {self.reference_side}")

    def pixel_scale(self, hw: tuple[int, int]) -> float:
        """ORIGINAL pixels per reference-frame pixel: ``max(H, W) / reference_side``."""
        return max(int(hw[0]), int(hw[1])) / float(self.reference_side)


def perturbation_rng(seed: int, sample_key: int, promptset_id: int) -> np.random.Generator:
    """The generator of one prompt set's copies: ``SeedSequence((seed, sample_key, promptset_id))``."""
    return np.random.default_rng(np.random.SeedSequence((int(seed), int(sample_key), int(promptset_id))))


def _as_key(sample_key: int | str) -> int:
    return sample_key_of_id(sample_key) if isinstance(sample_key, str) else int(sample_key)


def labels_at(points: np.ndarray, masks: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """The value of ``masks`` at each point, as int64 labels (1 inside, 0 outside).

    Args:
        points: ``... x P x N x 2`` (x, y) ORIGINAL pixel coordinates of an ``image_hw`` image.
        masks: ``h x w`` (one mask for every prompt set) or ``P x h x w`` (one per prompt set) bool,
            covering the whole image at any resolution (ORIGINAL, or FRAME256 for cached logits);
            a point reads the mask pixel nearest to it (``(x + 0.5) * w / W - 0.5``, rounded).
    """
    masks = np.asarray(masks, dtype=bool)
    num_sets = points.shape[-3]
    if masks.ndim == 2:
        masks = np.broadcast_to(masks, (num_sets, *masks.shape))
    if masks.ndim != 3 or masks.shape[0] != num_sets:
        raise ValueError(f"labels_at: expected an h x w or {num_sets} x h x w mask, got shape {masks.shape}")
    height, width = int(image_hw[0]), int(image_hw[1])
    mask_h, mask_w = masks.shape[1:]
    # x * s + (s - 1) / 2 is (x + 0.5) * s - 0.5, exact at s = 1 (a mask at the image's own size).
    scale_x, scale_y = mask_w / width, mask_h / height
    columns = np.clip(np.rint(points[..., 0] * scale_x + (scale_x - 1) / 2).astype(np.int64), 0, mask_w - 1)
    rows = np.clip(np.rint(points[..., 1] * scale_y + (scale_y - 1) / 2).astype(np.int64), 0, mask_h - 1)
    sets = np.arange(num_sets).reshape(num_sets, 1)
    return masks[sets, rows, columns].astype(np.int64)


def perturbed_prompts(
    points: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    image_hw: tuple[int, int],
    num_samples: int,
    seed: int,
    sample_key: int | str,
    promptset_ids: Sequence[int] | None = None,
    magnitudes: PerturbationMagnitudes = PerturbationMagnitudes(),
    label_masks: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original prompts plus ``num_samples - 1`` jittered copies of each.

    Args:
        points: ``P x N x 2`` (x, y) ORIGINAL pixel coordinates; labels: ``P x N`` (1, 0, -1 padding);
            boxes: ``P x 4`` inclusive ORIGINAL pixel boxes.
        image_hw: ``(H, W)`` of the ORIGINAL image (the clamping bounds and the jitter's scale).
        num_samples: K >= 1 (sample 0 is the unperturbed prompt).
        seed, sample_key: see the module docstring; a string key is hashed with
            ``promptset.sample_key`` (the sample id).
        promptset_ids: ``P`` ids for seeding (default ``0 .. P-1``).
        label_masks: ``None``: every jittered point keeps its original label (``original``).
            Otherwise masks as ``labels_at`` takes them, read at each jittered point (``own_mask``
            with the first pass's masks; the oracle ablation with the ground truth).

    Returns:
        ``points`` ``K*P x N x 2`` float32, ``labels`` ``K*P x N`` int64, ``boxes`` ``K*P x 4`` float32,
        sample-major: rows ``k*P .. k*P + P - 1`` are sample ``k`` (``reshape(K, P, ...)`` splits them).
    """
    num_samples = int(num_samples)
    if num_samples < 1:
        raise ConfigError(f"{MAGNITUDES_KEY}.num_samples: must be at least 1, got {num_samples}")
    points_np = torch.as_tensor(points).detach().cpu().numpy().astype(np.float64)
    labels_np = torch.as_tensor(labels).detach().cpu().numpy().astype(np.int64)
    boxes_np = torch.as_tensor(boxes).detach().cpu().numpy().astype(np.float64)
    num_sets, num_points = labels_np.shape
    if points_np.shape != (num_sets, num_points, 2) or boxes_np.shape != (num_sets, 4):
        raise ValueError(f"perturbed_prompts: expected points P x N x 2, labels P x N, boxes P x 4; got "
                         f"{points_np.shape}, {labels_np.shape}, {boxes_np.shape}")
    ids = list(range(num_sets)) if promptset_ids is None else [int(i) for i in promptset_ids]
    if len(ids) != num_sets:
        raise ValueError(f"perturbed_prompts: {len(ids)} promptset_ids for {num_sets} prompt sets")
    height, width = int(image_hw[0]), int(image_hw[1])
    copies = num_samples - 1
    key = _as_key(sample_key)

    # Unit noise in [-1, 1], drawn per prompt set from its own generator: (K-1) x P x ...
    point_unit = np.empty((copies, num_sets, num_points, 2))
    box_unit = np.empty((copies, num_sets, 4))
    for p, promptset_id in enumerate(ids):
        rng = perturbation_rng(seed, key, promptset_id)
        point_unit[:, p] = rng.uniform(-1.0, 1.0, size=(copies, num_points, 2))
        box_unit[:, p] = rng.uniform(-1.0, 1.0, size=(copies, 4))

    scale = magnitudes.pixel_scale((height, width))
    upper = np.array([width - 1, height - 1], dtype=np.float64)
    valid = labels_np >= 0  # P x N; padding keeps its coordinates and label
    moved = points_np[None] + point_unit * (magnitudes.point_noise_px * scale)
    moved = np.where(valid[None, ..., None], np.clip(moved, 0.0, upper), points_np[None])
    relabelled = np.broadcast_to(labels_np[None], moved.shape[:-1])
    if label_masks is not None:
        relabelled = np.where(valid[None], labels_at(moved, label_masks, (height, width)), labels_np[None])

    sides = boxes_np[:, 2:4] - boxes_np[:, 0:2] + 1.0  # P x 2 (width, height)
    bound = np.minimum(magnitudes.box_noise_fraction * sides, magnitudes.box_noise_max_px * scale)
    jittered = boxes_np[None] + box_unit * np.concatenate([bound, bound], axis=1)[None]
    jittered = np.clip(jittered, 0.0, np.concatenate([upper, upper]))
    low = np.minimum(jittered[..., 0:2], jittered[..., 2:4])
    high = np.maximum(jittered[..., 0:2], jittered[..., 2:4])
    jittered = np.concatenate([low, high], axis=-1)

    all_points = np.concatenate([points_np[None], moved]).reshape(num_samples * num_sets, num_points, 2)
    all_labels = np.concatenate([labels_np[None], relabelled]).reshape(num_samples * num_sets, num_points)
    all_boxes = np.concatenate([boxes_np[None], jittered]).reshape(num_samples * num_sets, 4)
    return (torch.from_numpy(all_points).float(), torch.from_numpy(all_labels).long(),
            torch.from_numpy(all_boxes).float())


def prompt_perturbation_predict(
    backbone,
    features: Mapping[str, torch.Tensor],
    original_hw: tuple[int, int],
    points: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    num_samples: int,
    prompt_mode: str,
    multimask_policy: str,
    seed: int,
    sample_key: int | str,
    promptset_ids: Sequence[int] | None = None,
    magnitudes: PerturbationMagnitudes = PerturbationMagnitudes(),
    label_masks: np.ndarray | None = None,
) -> torch.Tensor:
    """Foreground probabilities of the K prompt variants, from ONE decoder call on the cached embedding.

    Args:
        backbone: a ``modules.sam.backbones.Backbone`` (only ``decode`` is used).
        features: the cached encoder features of one image (``name -> C x h x w`` or ``1 x C x h x w``).
        original_hw: ``(H, W)`` of the ORIGINAL image.
        points, labels, boxes, num_samples, seed, sample_key, promptset_ids, magnitudes, label_masks:
            as ``perturbed_prompts``.
        prompt_mode, multimask_policy: as ``sam.prompt_mode`` / ``sam.multimask_policy``.

    Returns:
        ``K x P x 256 x 256`` float32 on ``backbone.device`` in FRAME256; sample 0 is the original prompt.
    """
    original_hw = (int(original_hw[0]), int(original_hw[1]))
    num_sets = int(torch.as_tensor(labels).shape[0])
    all_points, all_labels, all_boxes = perturbed_prompts(
        points, labels, boxes, original_hw, num_samples, seed, sample_key, promptset_ids, magnitudes, label_masks
    )
    logits = decode_selected_logits(backbone, features, original_hw, all_points, all_labels, all_boxes,
                                  prompt_mode, multimask_policy)
    return torch.sigmoid(logits).reshape(int(num_samples), num_sets, *logits.shape[-2:]).float()
