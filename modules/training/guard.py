"""The head's validation guard: a trained head is kept only when it beats raw SAM on validation.

After training, the best epoch's head and raw SAM (the mask ``SAM logit > 0``, input channel 0) are
scored on the same validation rows (``hard_iou`` in the 256 x 256 logit frame, mean over rows),
overall and per group. ``head.guard`` names the rule (``GUARD_RULES``) that decides whether the
trained head stays; when it does not, ``best.pt`` becomes the identity head (``PromptAwareHead.
identity_state``: raw SAM's clipped logit exactly), on which the variance network, the Laplace fit
and the fusion module then build as on any head. Only validation rows are read.

The decision is global: at inference the group of a user's image is unknown, so a per-group
decision could not be applied to it. Per-group figures are recorded in the guard's json; the
``every_group`` rule uses them to keep a head only when it loses on no validation group.

Crash safety: the trained best weights are first copied to ``trained_best.pt`` (the guard's only
source of truth on a rerun), then ``best.pt`` is (re)written from the decision, then the json; a
rerun with the json in place does nothing, one without it decides again from ``trained_best.pt``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from modules.cache.packed_reader import PackedSplitDataset
from modules.core.errors import PipelineError
from modules.core.fileio import atomic_write_json, read_json
from modules.training.losses import hard_iou
from modules.training.models import PromptAwareHead
from modules.training.run_state import BEST_FILE, save_tensors, load_checkpoint_file

log = logging.getLogger(__name__)

GUARD_FILE = "head_guard.json"
TRAINED_BEST_FILE = "trained_best.pt"
GUARD_FORMAT_VERSION = 1


@dataclass
class GroupScore:
    """Mean validation IoU of the trained head and of raw SAM over ``rows`` rows of one group (or all)."""

    rows: int
    head_iou: float
    raw_sam_iou: float

    @property
    def gain(self) -> float:
        return self.head_iou - self.raw_sam_iou


@dataclass
class ValidationScores:
    overall: GroupScore
    groups: dict[str, GroupScore] = field(default_factory=dict)


def _beats_overall(scores: ValidationScores) -> bool:
    return scores.overall.gain > 0


def _beats_overall_loses_nowhere(scores: ValidationScores) -> bool:
    return _beats_overall(scores) and all(score.gain >= 0 for score in scores.groups.values())


#: ``head.guard`` -> whether the trained head is kept, from its validation scores.
GUARD_RULES: dict[str, Callable[[ValidationScores], bool]] = {
    "overall": _beats_overall,  # the head's mean validation IoU above raw SAM's
    "every_group": _beats_overall_loses_nowhere,  # that, and below raw SAM on no validation group
    "off": lambda scores: True,  # always keep the trained head
}


@torch.no_grad()
def score_on_validation(head: PromptAwareHead, val: PackedSplitDataset, device: torch.device | str = "cpu",
                        batch_size: int = 8) -> ValidationScores:
    """Per-row IoU of ``head`` and of raw SAM on every row of the packed validation split, as means
    overall and per group (``val.index["group"]``)."""
    head = head.to(device).eval()
    head_iou, raw_iou = [], []
    for start in range(0, len(val), batch_size):
        batch = val.read_batch(np.arange(start, min(start + batch_size, len(val))))
        inputs = batch["inputs"].to(device)
        embedding = batch.get("image_embedding")
        logits = head(inputs, embedding.to(device) if embedding is not None else None).float()
        target = batch["target"].to(device)
        head_iou.append(hard_iou(logits, target).cpu())
        raw_iou.append(hard_iou(inputs[:, :1], target).cpu())
    head_rows = torch.cat(head_iou).double().numpy() if head_iou else np.zeros(0)
    raw_rows = torch.cat(raw_iou).double().numpy() if raw_iou else np.zeros(0)
    groups = val.index["group"].astype(str).to_numpy()

    def score(mask: np.ndarray) -> GroupScore:
        return GroupScore(int(mask.sum()), float(head_rows[mask].mean()), float(raw_rows[mask].mean()))

    return ValidationScores(overall=score(np.ones(len(head_rows), dtype=bool)),
                            groups={name: score(groups == name) for name in sorted(set(groups))})


def apply_guard(run_dir: Path, head: PromptAwareHead, val: PackedSplitDataset, rule: str,
                device: torch.device | str = "cpu", batch_size: int = 8) -> dict:
    """Decide (``GUARD_RULES[rule]``) whether the trained ``best.pt`` of ``run_dir`` stays or becomes
    the identity head, write ``best.pt`` and ``head_guard.json`` accordingly, and return the json's
    content. ``head``: a model of the run's design (its weights are replaced)."""
    if rule not in GUARD_RULES:
        raise PipelineError(f"head.guard: {rule!r} is not one of {', '.join(GUARD_RULES)}")
    run_dir = Path(run_dir)
    guard_path = run_dir / GUARD_FILE
    if guard_path.is_file():
        return read_json(guard_path)
    trained_path = run_dir / TRAINED_BEST_FILE
    if not trained_path.is_file():
        save_tensors(load_checkpoint_file(run_dir / BEST_FILE), trained_path)
    trained = load_checkpoint_file(trained_path)
    head.load_state_dict(trained)
    scores = score_on_validation(head, val, device, batch_size)
    keep = GUARD_RULES[rule](scores)
    figures = (f"validation IoU {scores.overall.head_iou:.4f} vs raw SAM {scores.overall.raw_sam_iou:.4f} over "
               f"{scores.overall.rows} rows; per group head - raw SAM: "
               + ", ".join(f"{name} {score.gain:+.4f}" for name, score in scores.groups.items()))
    if not keep and not head.residual:
        log.warning("head guard (%s): the trained head does not pass (%s), but a head without head.residual cannot "
                    "become raw SAM: kept as trained", rule, figures)
    fallback = not keep and head.residual
    save_tensors(head.identity_state(trained) if fallback else trained, run_dir / BEST_FILE)
    report = {
        "format_version": GUARD_FORMAT_VERSION,
        "rule": rule,
        "kept": "raw_sam_identity" if fallback else "trained_head",
        "trained_head_beats_raw_sam": keep,
        "frame": "256 x 256 logit frame, hard IoU of logit > 0, mean over validation rows",
        "overall": {**asdict(scores.overall), "gain": scores.overall.gain},
        "groups": {name: {**asdict(score), "gain": score.gain} for name, score in scores.groups.items()},
        "trained_weights": TRAINED_BEST_FILE,
    }
    atomic_write_json(guard_path, report)
    if fallback:
        log.info("head guard (%s): the trained head does not pass (%s): best.pt is now raw SAM (the identity head); "
                 "the trained weights stay in %s", rule, figures, TRAINED_BEST_FILE)
    elif keep:
        log.info("head guard (%s): trained head kept (%s)", rule, figures)
    return report
