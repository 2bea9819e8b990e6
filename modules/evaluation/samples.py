"""The samples the evaluation scores: the split's units (optionally a domain-balanced subset) and
each unit's ``LabelledSample``: the ``EvalSample`` the methods read (cache entry, prompt sets, image)
and, kept apart from it, the ground truth at the image's size that only the metrics and the oracle
ablations read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modules.core.config import PipelineConfig
from modules.core.paths import promptset_path
from modules.core.stage import UnitError
from modules.data.imageio import MaskReadError, read_image_rgb, read_mask, resize_mask_nearest
from modules.data.sample_files import split_samples
from modules.data.promptset import load_promptsets
from modules.evaluation.runs import EvaluationError
from modules.uncertainty.strategies import EvalSample, UncertaintyError


@dataclass(frozen=True)
class EvalUnit:
    """One sample of the split, as the manifest lists it."""

    safe_id: str
    sample_id: str
    group: str
    image_path: str
    mask_path: str
    image_hw: tuple[int, int]


def list_eval_units(cfg: PipelineConfig) -> list[EvalUnit]:
    """The split's samples; with ``evaluation.max_samples`` the first ones taken round-robin over
    the domains (so every domain is represented), in manifest order within a domain."""
    split = cfg.evaluation.split
    table = split_samples(cfg, split)
    units = [EvalUnit(str(row["safe_id"]), str(row["sample_id"]), str(row["group"]), str(row["image_path"]),
                      str(row["mask_path"]), (int(row["image_h"]), int(row["image_w"])))
             for row in table.to_dict("records")]
    if not units:
        raise EvaluationError(f"evaluation.split: the {split!r} split has no samples")
    limit = cfg.evaluation.max_samples
    if limit and limit < len(units):
        by_group: dict[str, list[EvalUnit]] = {}
        for unit in units:
            by_group.setdefault(unit.group, []).append(unit)
        queues = list(by_group.values())
        chosen: list[EvalUnit] = []
        while len(chosen) < limit:
            for queue in queues:
                if queue and len(chosen) < limit:
                    chosen.append(queue.pop(0))
        units = chosen
    return units


def read_ground_truth(unit: EvalUnit, threshold: int) -> np.ndarray:
    """``H x W`` bool mask at the image's size (resized nearest when the mask's size differs)."""
    try:
        mask = read_mask(unit.mask_path, threshold=threshold)
    except (MaskReadError, OSError) as exc:
        raise UnitError(f"{unit.mask_path}: {exc}") from None
    if mask.shape != unit.image_hw:
        mask = resize_mask_nearest(mask, unit.image_hw)
    return mask


@dataclass(frozen=True)
class LabelledSample:
    """One evaluated sample: ``inputs``, what every method reads (no ground truth), and
    ``ground_truth``, the ``H x W`` bool mask at ORIGINAL resolution, which reaches only the metrics,
    the qualitative panels and the oracle ablations (``methods.Predictor`` hands it to nothing else)."""

    inputs: EvalSample
    ground_truth: np.ndarray

    def __post_init__(self) -> None:
        ground_truth = np.asarray(self.ground_truth, dtype=bool)
        if ground_truth.shape != self.inputs.original_hw:
            raise UncertaintyError(f"{self.inputs.safe_id}: ground-truth mask {ground_truth.shape} differs from the "
                                   f"cached image size {self.inputs.original_hw}")
        object.__setattr__(self, "ground_truth", ground_truth)


def load_sample(cfg: PipelineConfig, cache, unit: EvalUnit) -> LabelledSample:
    """The ``LabelledSample`` of one unit (cache entry, prompt sets and lazy image; ground truth apart)."""
    if unit.safe_id not in cache:
        raise UnitError(f"{unit.safe_id}: not in the SAM cache {cache.folder}; rerun precompute_sam_outputs.py")
    path = promptset_path(cfg.project_root, cfg.evaluation.split, unit.safe_id)
    if not path.is_file():
        raise UnitError(f"{path}: missing prompt-set file; rerun generate_promptsets.py")
    record = load_promptsets(cfg.project_root, cfg.evaluation.split, unit.safe_id)
    inputs = EvalSample.build(unit.safe_id, unit.group, cache.entry(unit.safe_id), record, cfg.training.logit_clip,
                              image_loader=lambda: read_image_rgb(unit.image_path))
    return LabelledSample(inputs, read_ground_truth(unit, cfg.data.mask_threshold))
