"""The head's validation guard: a trained head is kept, whole or in part, only when it beats raw SAM on validation.

After training, the best epoch's residual head is scored on the validation rows at each weight ``w``
of ``head.guard_blends``: the head whose last layer carries a fraction ``w`` of the learned
correction, ``sam_logit + w * (trained - sam_logit)`` (``PromptAwareHead.blended_state``; ``w = 0``
is raw SAM, the mask ``SAM logit > 0``, ``w = 1`` the trained head). Scores are ``hard_iou`` in the
256 x 256 logit frame, mean over rows, overall and per group. ``head.guard`` names the rule
(``GUARD_RULES``) a weight must pass; among the passing weights the one with the best overall
validation IoU is kept, and when none passes ``best.pt`` becomes the identity head (raw SAM's
clipped logit exactly). A shrunken correction is the point: a head that helps where SAM is wrong
but costs a little where SAM is right often helps everywhere at a fraction of its weight. The
variance network, the Laplace fit and the fusion module then build on ``best.pt`` as on any head.
Only validation rows are read.

The decision is global: at inference the group of a user's image is unknown, so a per-group
decision could not be applied to it. Per-group figures are recorded in the guard's json; the
``every_group`` rule uses them to keep a weight only when no validation group loses more than
``head.guard_group_tolerance`` of IoU against raw SAM.

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
import torch.nn.functional as F

from modules.cache.packed_reader import PackedSplitDataset
from modules.core.errors import PipelineError
from modules.core.fileio import atomic_write_json, read_json
from modules.training.losses import hard_iou
from modules.training.models import FINAL_LAYER_NAME, PromptAwareHead
from modules.training.run_state import BEST_FILE, save_tensors, load_checkpoint_file

log = logging.getLogger(__name__)

GUARD_FILE = "head_guard.json"
TRAINED_BEST_FILE = "trained_best.pt"
GUARD_FORMAT_VERSION = 2


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


def _beats_overall(scores: ValidationScores, tolerance: float) -> bool:
    return scores.overall.gain > 0


def _beats_overall_loses_nowhere(scores: ValidationScores, tolerance: float) -> bool:
    return _beats_overall(scores, tolerance) and all(score.gain >= -tolerance for score in scores.groups.values())


#: ``head.guard`` -> whether a (blended) head passes, from its validation scores and the per-group tolerance.
GUARD_RULES: dict[str, Callable[[ValidationScores, float], bool]] = {
    "overall": _beats_overall,  # the head's mean validation IoU above raw SAM's
    "every_group": _beats_overall_loses_nowhere,  # that, and no validation group more than the tolerance below it
    "off": lambda scores, tolerance: True,  # always keep the trained head (w = 1)
}


def _final_layers(head: PromptAwareHead, weights: list[float]) -> dict[float, tuple[torch.Tensor, torch.Tensor]]:
    """Weight ``w`` -> the ``final_conv`` (weight, bias) of ``head`` blended at ``w`` (the trained
    layer itself for a head that cannot be blended, whose only weight is 1)."""
    state = {name: value.detach() for name, value in head.state_dict().items()}
    layers = {}
    for weight in weights:
        blended = state if weight == 1.0 and not head.residual else head.blended_state(state, weight)
        layers[weight] = (blended[f"{FINAL_LAYER_NAME}.weight"], blended[f"{FINAL_LAYER_NAME}.bias"])
    return layers


@torch.no_grad()
def score_on_validation(head: PromptAwareHead, val: PackedSplitDataset, device: torch.device | str = "cpu",
                        batch_size: int = 8, weights: list[float] | tuple[float, ...] = (1.0,)
                        ) -> dict[float, ValidationScores]:
    """Per-row IoU of ``head`` blended at each of ``weights`` (``PromptAwareHead.blended_state``) and
    of raw SAM on every row of the packed validation split, as means overall and per group
    (``val.index["group"]``). The hidden features are computed once per batch; each weight's last
    layer is the very convolution its blended head runs, so the scores are that head's."""
    head = head.to(device).eval()
    layers = _final_layers(head, list(weights))
    head_iou: dict[float, list[torch.Tensor]] = {weight: [] for weight in layers}
    raw_iou = []
    for start in range(0, len(val), batch_size):
        batch = val.read_batch(np.arange(start, min(start + batch_size, len(val))))
        inputs = batch["inputs"].to(device)
        embedding = batch.get("image_embedding")
        features = head.features(inputs, embedding.to(device) if embedding is not None else None)
        target = batch["target"].to(device)
        for weight, (conv_weight, conv_bias) in layers.items():
            logits = F.conv2d(features, conv_weight.to(features), conv_bias.to(features)).float()
            head_iou[weight].append(hard_iou(logits, target).cpu())
        raw_iou.append(hard_iou(inputs[:, :1], target).cpu())
    raw_rows = torch.cat(raw_iou).double().numpy() if raw_iou else np.zeros(0)
    groups = val.index["group"].astype(str).to_numpy()

    def scores(head_rows: np.ndarray) -> ValidationScores:
        def score(mask: np.ndarray) -> GroupScore:
            return GroupScore(int(mask.sum()), float(head_rows[mask].mean()), float(raw_rows[mask].mean()))
        return ValidationScores(overall=score(np.ones(len(head_rows), dtype=bool)),
                                groups={name: score(groups == name) for name in sorted(set(groups))})

    return {weight: scores(torch.cat(rows).double().numpy() if rows else np.zeros(0))
            for weight, rows in head_iou.items()}


def choose_blend(candidates: dict[float, ValidationScores], rule: str, tolerance: float) -> float:
    """The kept weight: among the nonzero ``candidates`` that pass ``GUARD_RULES[rule]``, the one with
    the best overall validation IoU (the smaller weight on a tie); 0 (raw SAM) when none passes."""
    passing = [weight for weight, scores in candidates.items()
               if weight > 0 and GUARD_RULES[rule](scores, tolerance)]
    if not passing:
        return 0.0
    return max(passing, key=lambda weight: (candidates[weight].overall.head_iou, -weight))


def _figures(scores: ValidationScores) -> str:
    return (f"validation IoU {scores.overall.head_iou:.4f} vs raw SAM {scores.overall.raw_sam_iou:.4f} over "
            f"{scores.overall.rows} rows; per group head - raw SAM: "
            + ", ".join(f"{name} {score.gain:+.4f}" for name, score in scores.groups.items()))


def apply_guard(run_dir: Path, head: PromptAwareHead, val: PackedSplitDataset, rule: str,
                device: torch.device | str = "cpu", batch_size: int = 8,
                blends: list[float] | tuple[float, ...] = (0.0, 1.0), group_tolerance: float = 0.0) -> dict:
    """Decide (``GUARD_RULES[rule]`` over the weights ``blends``, ``choose_blend``) how much of the
    trained ``best.pt`` of ``run_dir`` stays, write ``best.pt`` and ``head_guard.json`` accordingly,
    and return the json's content. ``head``: a model of the run's design (its weights are replaced).
    ``rule`` ``off``, or a head without ``head.residual``, can only keep the trained weights."""
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
    can_blend = head.residual and rule != "off"
    weights = sorted({0.0, 1.0, *map(float, blends)}) if can_blend else [1.0]
    candidates = score_on_validation(head, val, device, batch_size, weights)
    trained_scores = candidates[1.0]
    trained_passes = GUARD_RULES[rule](trained_scores, group_tolerance)
    if can_blend:
        blend = choose_blend({weight: candidates[weight] for weight in map(float, blends)}, rule, group_tolerance)
    else:
        blend = 1.0
        if not trained_passes:
            log.warning("head guard (%s): the trained head does not pass (%s), but a head without head.residual "
                        "cannot become raw SAM: kept as trained", rule, _figures(trained_scores))
    kept = {0.0: "raw_sam_identity", 1.0: "trained_head"}.get(blend, "blended_head")
    save_tensors(trained if blend == 1.0 else head.blended_state(trained, blend), run_dir / BEST_FILE)
    kept_scores = candidates.get(blend, trained_scores)
    report = {
        "format_version": GUARD_FORMAT_VERSION,
        "rule": rule,
        "group_tolerance": group_tolerance,
        "kept": kept,
        "blend": blend,
        "trained_head_beats_raw_sam": trained_passes,
        "frame": "256 x 256 logit frame, hard IoU of logit > 0, mean over validation rows",
        "overall": {**asdict(trained_scores.overall), "gain": trained_scores.overall.gain},
        "groups": {name: {**asdict(score), "gain": score.gain} for name, score in trained_scores.groups.items()},
        "kept_overall": {**asdict(kept_scores.overall), "gain": kept_scores.overall.gain},
        "blends": [{"weight": weight, "head_iou": scores.overall.head_iou, "gain": scores.overall.gain,
                    "group_gains": {name: score.gain for name, score in scores.groups.items()},
                    "passes": weight > 0 and GUARD_RULES[rule](scores, group_tolerance)}
                   for weight, scores in candidates.items()],
        "trained_weights": TRAINED_BEST_FILE,
    }
    atomic_write_json(guard_path, report)
    log.info("head guard (%s): kept %s (weight %.2f of the learned correction): %s; the trained head: %s", rule,
             kept, blend, _figures(kept_scores), _figures(trained_scores))
    return report
