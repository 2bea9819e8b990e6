"""Mask-level quality: which masks should a person check.

Per mask, scores computed WITHOUT the ground truth (``mask_scores``): the mean uncertainty in a band
around the predicted mask's boundary, the mean uncertainty over the predicted foreground, and the
expected IoU of the prediction under the method's own probabilities; SAM's predicted IoU (from the
cache) is the baseline. Each score is turned into a quality (higher = more trustworthy, ``QUALITY_SCORES``)
and rated against the true IoU (``quality_metrics``): Spearman with the IoU, the AUROC of flagging
masks with IoU below ``BAD_MASK_IOU`` (low quality flags), and the area under the risk-coverage curve
(masks accepted from the highest quality down, risk = mean ``1 - IoU`` of the accepted ones; lower is
better). A mask whose score is undefined (an empty prediction has no boundary) ranks as the least
trustworthy.

Every metric takes per-mask ``weights`` (``B x n``: how often each mask's image was drawn in a
bootstrap replicate, ``modules/scoring/bootstrap.py``) and is computed for all replicates at once;
with integer weights each equals the metric on the replicate's masks with repeats (ties averaged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import digamma
from torch import Tensor

from modules.scoring.common import PROB_THRESHOLD
from modules.scoring.segmentation import diagonal_radius, dilate, erode

#: A mask with a true IoU below this is a bad mask, to be flagged for a person to check.
BAD_MASK_IOU = 0.5


@dataclass(frozen=True)
class QualityScore:
    """A per-mask score column and whether a higher value means a better mask."""

    column: str
    higher_is_better: bool
    baseline: bool = False


#: name -> score; the columns are written per mask by ``mask_scores`` (and ``sam_predicted_iou``).
QUALITY_SCORES: dict[str, QualityScore] = {
    "boundary_band": QualityScore("band_uncertainty", higher_is_better=False),
    "foreground": QualityScore("foreground_uncertainty", higher_is_better=False),
    "expected_iou": QualityScore("expected_iou", higher_is_better=True),
    "sam_predicted_iou": QualityScore("sam_predicted_iou", higher_is_better=True, baseline=True),
}


def _mean_or_nan(values: Tensor) -> float:
    return float(values.double().mean()) if values.numel() else math.nan


def mask_scores(prob: Tensor, uncertainty: Tensor, band_fraction: float) -> list[dict[str, float]]:
    """Ground-truth-free scores of ``P`` masks: ``prob`` and ``uncertainty`` ``P x H x W``.

    ``band_uncertainty``: mean of ``uncertainty`` where the predicted mask ``prob > 0.5`` dilated by
    ``r`` differs from it eroded by ``r`` (``r = band_fraction`` of the image diagonal, at least 1 px);
    ``foreground_uncertainty``: its mean over the predicted mask; ``expected_iou``: ``sum p m / sum (p + m -
    p m)`` with ``m`` the predicted mask (the IoU of ``m`` if each pixel were foreground with probability
    ``p``). NaN where the region is empty.
    """
    radius = diagonal_radius(tuple(prob.shape[-2:]), band_fraction)
    rows = []
    for p, u in zip(prob, uncertainty):
        predicted = p > PROB_THRESHOLD
        band = dilate(predicted, radius) & ~erode(predicted, radius)
        p64, m64 = p.double(), predicted.double()
        union = (p64 + m64 - p64 * m64).sum().item()
        rows.append({"band_uncertainty": _mean_or_nan(u[band]), "foreground_uncertainty": _mean_or_nan(u[predicted]),
                     "expected_iou": (p64 * m64).sum().item() / union if union > 0 else math.nan})
    return rows


def quality_values(values: np.ndarray, score: QualityScore) -> np.ndarray:
    """Score values -> qualities (higher = better); undefined ones become ``-inf`` (least trustworthy)."""
    values = np.asarray(values, dtype=np.float64)
    quality = values if score.higher_is_better else -values
    return np.where(np.isnan(quality), -np.inf, quality)


# --------------------------------------------------------------------------- weighted, batched metrics


def _tie_groups(values: np.ndarray, descending: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(order, starts, group_of_sorted)``: the sort order of ``values`` and its groups of equal values."""
    order = np.argsort(-values if descending else values, kind="stable")
    ordered = values[order]
    new_group = np.r_[True, ordered[1:] != ordered[:-1]]
    return order, np.flatnonzero(new_group), np.cumsum(new_group) - 1


def _as_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    weights = np.ones((1, n)) if weights is None else np.asarray(weights, dtype=np.float64)
    return weights.reshape(1, -1) if weights.ndim == 1 else weights


def weighted_average_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``B x n`` 1-based average ranks of ``values`` (``n``) when mask ``i`` appears ``weights[b, i]`` times."""
    order, starts, group = _tie_groups(values)
    group_weight = np.add.reduceat(weights[:, order], starts, axis=1)
    group_rank = np.cumsum(group_weight, axis=1) - (group_weight - 1.0) / 2.0
    ranks = np.empty_like(weights)
    ranks[:, order] = group_rank[:, group]
    return ranks


def _weighted_pearson(x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> np.ndarray:
    total = weights.sum(1, keepdims=True)
    mean_x, mean_y = (weights * x).sum(1, keepdims=True) / total, (weights * y).sum(1, keepdims=True) / total
    dx, dy = x - mean_x, y - mean_y
    covariance = (weights * dx * dy).sum(1)
    variance = (weights * dx * dx).sum(1) * (weights * dy * dy).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(variance > 0, covariance / np.sqrt(np.where(variance > 0, variance, 1.0)), np.nan)


def weighted_spearman(x: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``B`` Spearman correlations of ``x`` and ``y`` (``n``, finite or ``-inf``) under ``weights``."""
    weights = _as_weights(weights, len(x))
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return _weighted_pearson(weighted_average_ranks(x, weights), weighted_average_ranks(y, weights), weights)


def weighted_auroc(risk: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``B`` AUROCs of ``risk`` (``n``) for detecting ``positive`` (bool ``n``), ties counted half;
    NaN where a replicate has no positive or no negative."""
    weights = _as_weights(weights, len(risk))
    order, starts, _ = _tie_groups(np.asarray(risk, np.float64))
    positive = np.asarray(positive, bool)[order]
    ordered = weights[:, order]
    pos = np.add.reduceat(ordered * positive, starts, axis=1)
    neg = np.add.reduceat(ordered * ~positive, starts, axis=1)
    n_pos, n_neg = pos.sum(1), neg.sum(1)
    pairs = (pos * (np.cumsum(neg, 1) - neg + 0.5 * neg)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), pairs / (n_pos * n_neg), np.nan)


def _harmonic(n: np.ndarray) -> np.ndarray:
    """``H(n) = sum_{k=1..n} 1/k`` for real ``n >= 0`` (``H(0) = 0``)."""
    return digamma(n + 1.0) + np.euler_gamma


def weighted_aurc(quality: np.ndarray, loss: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``B`` areas under the risk-coverage curve: masks accepted from the highest ``quality`` down,
    risk(k) = mean ``loss`` of the first k accepted, AURC = mean of risk(k) over k = 1..N. Masks of
    equal quality are accepted as one group with their mean loss. NaN for an empty replicate."""
    weights = _as_weights(weights, len(quality))
    order, starts, _ = _tie_groups(np.asarray(quality, np.float64), descending=True)
    ordered = weights[:, order]
    count = np.add.reduceat(ordered, starts, axis=1)
    loss_sum = np.add.reduceat(ordered * np.asarray(loss, np.float64)[order], starts, axis=1)
    mean_loss = np.divide(loss_sum, count, out=np.zeros_like(loss_sum), where=count > 0)
    covered = np.cumsum(count, 1)
    covered_before = covered - count
    loss_before = np.cumsum(loss_sum, 1) - loss_sum
    harmonic_step = _harmonic(covered) - _harmonic(covered_before)
    # Inside a group of m masks the accepted loss grows by mean_loss per mask: the sum of
    # risk(k) = (loss_before + j mean_loss) / (covered_before + j) over j = 1..m, in closed form.
    area = (loss_before * harmonic_step + mean_loss * (count - covered_before * harmonic_step)).sum(1)
    total = covered[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, area / total, np.nan)


def quality_metrics(quality: np.ndarray, iou: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``spearman`` (quality vs IoU), ``auroc_bad`` (low quality flags IoU < ``BAD_MASK_IOU``) and ``aurc``
    (risk ``1 - IoU``), each ``B`` values for ``weights`` ``B x n`` (one value without weights)."""
    iou = np.asarray(iou, np.float64)
    return {"spearman": weighted_spearman(quality, iou, weights),
            "auroc_bad": weighted_auroc(-np.asarray(quality, np.float64), iou < BAD_MASK_IOU, weights),
            "aurc": weighted_aurc(quality, 1.0 - iou, weights)}

