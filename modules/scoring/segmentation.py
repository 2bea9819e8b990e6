"""Per-mask segmentation quality of the hard prediction: overlap, boundary IoU, precision / recall,
MAE and balanced error rate, with the binary morphology they need.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from modules.scoring.common import (PROB_THRESHOLD, MetricInputError, absolute_error, as_mask, as_probabilities,
                                    safe_ratio)

# Dilation width of boundary IoU as a fraction of the image diagonal, keyed by output name.
BOUNDARY_DILATION_RATIOS: dict[str, float] = {
    "boundary_iou_1pct": 0.01,
    "boundary_iou_2pct": 0.02,
}


def _sliding_max(x: Tensor, window: int, dim: int) -> Tensor:
    """Maximum over every ``window``-long run along ``dim`` (output length ``len - window + 1``).

    Doubling table: after step j each entry holds the max of the 2^j entries starting there, so
    a window of any length is the max of two overlapping power-of-two spans. Cost O(n log window)
    in plain tensor ops, independent of the kernel area (unlike a (2d+1)^2 max-pool).
    """
    out_len = x.size(dim) - window + 1
    span, table = 1, x
    while 2 * span <= window:
        length = table.size(dim) - span
        table = torch.maximum(table.narrow(dim, 0, length), table.narrow(dim, span, length))
        span *= 2
    return torch.maximum(table.narrow(dim, 0, out_len), table.narrow(dim, window - span, out_len))


def erode(mask: Tensor, radius: int) -> Tensor:
    """Binary erosion of an ``H x W`` bool mask by a ``(2 radius + 1)`` square (chessboard radius).

    Pixels outside the image count as background, so foreground touching the image border erodes
    from there (as in the boundary-IoU reference code, which zero-pads before eroding). Equivalent
    to ``radius`` iterations of a 3x3 erosion; done as a separable max-filter of the background.
    """
    if mask.dim() != 2:
        raise MetricInputError(f"mask: expected H x W, got shape {tuple(mask.shape)}")
    if radius < 1:
        return mask.clone()
    background = F.pad((~mask).to(torch.uint8), (radius, radius, radius, radius), value=1)
    window = 2 * radius + 1
    background = _sliding_max(_sliding_max(background, window, dim=0), window, dim=1)
    return background == 0


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation of an ``H x W`` bool mask by a ``(2 radius + 1)`` square."""
    if mask.dim() != 2:
        raise MetricInputError(f"mask: expected H x W, got shape {tuple(mask.shape)}")
    if radius < 1:
        return mask.clone()
    padded = F.pad(mask.to(torch.uint8), (radius, radius, radius, radius), value=0)
    window = 2 * radius + 1
    return _sliding_max(_sliding_max(padded, window, dim=0), window, dim=1) != 0


def diagonal_radius(shape: tuple[int, ...], ratio: float) -> int:
    """``max(1, round(ratio * sqrt(H^2 + W^2)))`` pixels for an ``H x W`` shape."""
    height, width = shape[-2], shape[-1]
    return max(1, int(round(ratio * math.hypot(height, width))))


def mask_boundary(mask: Tensor, radius: int) -> Tensor:
    """Inner boundary band of an ``H x W`` bool mask: the mask minus its erosion by ``radius``."""
    return mask & ~erode(mask, radius)


def dilated_region(y: Tensor, ratio: float = 0.02) -> Tensor:
    """``H x W`` bool region: the ground truth dilated by ``ratio`` of the image diagonal.

    Used to score metrics near the object (as the reference evaluation does at 2%):
    ``region = dilated_region(y); accumulator.update(p[region], y[region], u[region])``.
    """
    y = as_mask(y, y)
    return dilate(y, diagonal_radius(tuple(y.shape), ratio))


def segmentation_metrics(p: Tensor, y: Tensor) -> dict[str, float]:
    """Per-mask segmentation quality of the hard prediction ``p > 0.5`` against ``y``.

    Args:
        p: ``H x W`` foreground probabilities in [0, 1] (ground-truth resolution).
        y: ``H x W`` bool ground truth.

    Returns keys (all floats in [0, 1]):
        iou, dice: overlap of prediction and ground truth. Both masks empty -> 1.0.
            (F1 equals Dice for binary masks, so it is not reported separately.)
        boundary_iou_1pct, boundary_iou_2pct: boundary IoU (Cheng et al., 2021): IoU of the
            inner boundary bands ``mask minus erode(mask, d)`` of prediction and ground truth,
            ``d = max(1, round(ratio * image diagonal))`` px, square structuring element, image
            border treated as background. Both bands empty (both masks empty) -> 1.0.
        precision: TP / (TP + FP). Empty prediction -> 1.0 if the ground truth is empty too,
            else 0.0 (an empty prediction of a present object is a total miss).
        recall: TP / (TP + FN). Empty ground truth -> 1.0 if the prediction is empty too, else 0.0.
        mae: mean |y - p| over all pixels (soft, uses the probabilities).
        balanced_error_rate: 1 - (TPR + TNR) / 2. If a class is absent from the ground truth its
            rate is undefined and dropped: empty ground truth -> 1 - TNR (the false-positive
            rate); all-foreground ground truth -> 1 - TPR.
    """
    p = as_probabilities(p)
    y = as_mask(y, p)
    if p.dim() != 2:
        raise MetricInputError(f"p: expected H x W, got shape {tuple(p.shape)}")
    pred = p > PROB_THRESHOLD
    counts = [
        (pred & y).sum(),
        (pred & ~y).sum(),
        (~pred & y).sum(),
        (~pred & ~y).sum(),
    ]
    for ratio in BOUNDARY_DILATION_RATIOS.values():
        radius = diagonal_radius(tuple(y.shape), ratio)
        pred_band, gt_band = mask_boundary(pred, radius), mask_boundary(y, radius)
        counts += [(pred_band & gt_band).sum(), (pred_band | gt_band).sum()]
    values = torch.stack([c.to(torch.float64) for c in counts] + [absolute_error(p, y).mean()])
    tp, fp, fn, tn, *boundary, mae = values.tolist()  # one device sync

    gt_empty, pred_empty = tp + fn == 0, tp + fp == 0
    tpr = safe_ratio(tp, tp + fn, math.nan)
    tnr = safe_ratio(tn, tn + fp, math.nan)
    present_rates = [rate for rate in (tpr, tnr) if not math.isnan(rate)]
    metrics = {
        "iou": safe_ratio(tp, tp + fp + fn, 1.0),
        "dice": safe_ratio(2 * tp, 2 * tp + fp + fn, 1.0),
    }
    for i, name in enumerate(BOUNDARY_DILATION_RATIOS):
        metrics[name] = safe_ratio(boundary[2 * i], boundary[2 * i + 1], 1.0)
    metrics.update(
        precision=safe_ratio(tp, tp + fp, 1.0 if gt_empty else 0.0),
        recall=safe_ratio(tp, tp + fn, 1.0 if pred_empty else 0.0),
        mae=mae,
        balanced_error_rate=1.0 - sum(present_rates) / len(present_rates),
    )
    return metrics
