"""Exact per-mask uncertainty quality of ``u`` against the prediction's errors (error detection,
correlation, sparsification), and the tie-group cores the streaming accumulators share with it.

"Groups" are tie groups ordered from most to least uncertain: the distinct values of u (exact
per-mask versions) or the histogram bins (streaming versions, ``modules.scoring.metrics``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modules.scoring.common import (PIXEL_ERRORS, PROB_THRESHOLD, MetricInputError, as_mask, as_probabilities,
                                    as_scores, as_vector)


def auroc_aupr_from_groups(positives: Tensor, negatives: Tensor) -> tuple[float, float]:
    """AUROC and average precision of error detection from per-group counts (float64, G).

    AUROC = P(u_error > u_correct) + 0.5 P(tie), i.e. the trapezoid area of the ROC curve with
    one vertex per group. AUPR = sum_k (R_k - R_{k-1}) P_k with one threshold per group, the
    step-wise average precision of scikit-learn (no interpolation). NaN when undefined.
    """
    n_pos, n_neg = positives.sum().item(), negatives.sum().item()
    if n_pos == 0:
        return math.nan, math.nan
    cum_pos = torch.cumsum(positives, 0)
    cum_all = torch.cumsum(positives + negatives, 0)
    precision = cum_pos / cum_all.clamp(min=1.0)
    average_precision = (torch.where(positives > 0, positives * precision, 0.0).sum() / n_pos).item()
    if n_neg == 0:
        return math.nan, average_precision
    negatives_below = n_neg - torch.cumsum(negatives, 0)
    auroc = ((positives * (negatives_below + 0.5 * negatives)).sum() / (n_pos * n_neg)).item()
    return auroc, average_precision


def ueo_from_groups(positives: Tensor, negatives: Tensor, thresholds: Tensor) -> tuple[float, float]:
    """Max over thresholds of Dice({u >= tau}, error), and the maximising tau.

    Selecting the first k groups is the set {u >= thresholds[k-1]}; Dice_k = 2 TP_k / (k_pixels + P).
    Returns (NaN, NaN) when there are no error pixels.
    """
    n_pos = positives.sum().item()
    if n_pos == 0:
        return math.nan, math.nan
    dice = 2.0 * torch.cumsum(positives, 0) / (torch.cumsum(positives + negatives, 0) + n_pos)
    best = int(torch.argmax(dice))
    return dice[best].item(), thresholds[best].item()


def sparsification_from_groups(
    group_count: Tensor, group_error: Tensor, fractions: Tensor
) -> Tensor:
    """Mean error of the pixels kept after removing each fraction, groups removed in order.

    ``group_count`` / ``group_error``: float64 (G,) pixel counts and error sums in removal order.
    A group split by the cut is removed proportionally (its pixels are exchangeable: the
    expected value over random tie-breaking). ``fractions`` must be < 1 (something is kept).
    Returns float64 (len(fractions),).
    """
    occupied = group_count > 0
    group_count, group_error = group_count[occupied], group_error[occupied]
    total_count, total_error = group_count.sum(), group_error.sum()
    cum_count = torch.cumsum(group_count, 0)
    cum_error = torch.cumsum(group_error, 0)
    removed = fractions.to(group_count) * total_count
    index = torch.searchsorted(cum_count, removed, side="left").clamp_(max=cum_count.numel() - 1)
    count_before = cum_count[index] - group_count[index]
    error_before = cum_error[index] - group_error[index]
    removed_error = error_before + (removed - count_before) * group_error[index] / group_count[index]
    return ((total_error - removed_error) / (total_count - removed)).clamp_(min=0.0)


def sparsification_fractions(n_steps: int, device: torch.device | str = "cpu") -> Tensor:
    """Removal fractions ``k / n_steps`` for k = 0 .. n_steps - 1 (float64).

    Fraction 1 is left out: nothing is kept there, and the limit of the kept mean (the error of
    the single least-uncertain pixel, or bin) is too noisy to enter the area.
    """
    if n_steps < 1:
        raise MetricInputError(f"n_steps: must be >= 1, got {n_steps}")
    return torch.arange(n_steps, dtype=torch.float64, device=device) / n_steps


def sparsification_summary(
    fractions: Tensor, by_uncertainty: Tensor, oracle: Tensor, mean_error: float
) -> dict:
    """Curves as lists plus AUSE = trapz(method - oracle) and AURG = trapz(random - method)."""
    return {
        "fractions": fractions.tolist(),
        "uncertainty": by_uncertainty.tolist(),
        "oracle": oracle.tolist(),
        "random": mean_error,
        "ause": torch.trapezoid(by_uncertainty - oracle, fractions).item(),
        "aurg": torch.trapezoid(mean_error - by_uncertainty, fractions).item(),
    }


def _tie_groups_descending(scores: Tensor, *values: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
    """Sort by ``scores`` descending and sum each of ``values`` per tie group.

    Returns (distinct scores descending (G,), per-group sums of each value (G,), group sizes (G,)).
    """
    sorted_scores, order = torch.sort(scores, descending=True)
    distinct, sizes = torch.unique_consecutive(sorted_scores, return_counts=True)
    ends = torch.cumsum(sizes, 0) - 1
    sums = []
    for value in values:
        cumulative = torch.cumsum(value[order].to(torch.float64), 0)[ends]
        sums.append(torch.diff(cumulative, prepend=cumulative.new_zeros(1)))
    return distinct, sums, sizes.to(torch.float64)


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor with ties given their average rank (float64)."""
    sorted_x, order = torch.sort(x)
    _, inverse, sizes = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = torch.cumsum(sizes, 0).to(torch.float64)
    group_rank = ends - (sizes.to(torch.float64) - 1.0) / 2.0
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = group_rank[inverse]
    return ranks


def weighted_pearson(weights: Tensor, x: Tensor, y: Tensor) -> float:
    """Pearson correlation of a joint distribution: ``weights`` (Gx x Gy), support ``x`` (Gx), ``y`` (Gy)."""
    total = weights.sum()
    wx, wy = weights.sum(1), weights.sum(0)
    dx = x - (wx * x).sum() / total
    dy = y - (wy * y).sum() / total
    covariance = dx @ weights @ dy
    variance = (wx * dx.square()).sum() * (wy * dy.square()).sum()
    return (covariance / variance.sqrt()).item() if variance.item() > 0 else math.nan


def _paired_vectors(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Both inputs flattened to finite float64 vectors of one length."""
    x, y = as_vector(x, "x"), as_vector(y, "y")
    if x.numel() != y.numel():
        raise MetricInputError(f"y: {y.numel()} elements, x has {x.numel()}")
    return x, y


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two tensors with the same number of elements (flattened).

    NaN if either is constant or they hold fewer than 2 elements.
    """
    x, y = _paired_vectors(x, y)
    if x.numel() < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    denominator = (dx.square().sum() * dy.square().sum()).sqrt().item()
    return (dx @ dy).item() / denominator if denominator > 0 else math.nan


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks, ties averaged), flattened inputs.

    Used per mask (u vs pixel error) and across masks (mean uncertainty per mask vs 1 - IoU).
    NaN if either is constant or they hold fewer than 2 elements.
    """
    x, y = _paired_vectors(x, y)
    if x.numel() < 2:
        return math.nan
    return pearson(_average_ranks(x), _average_ranks(y))


def error_detection_auc(u: Tensor, error: Tensor) -> tuple[float, float]:
    """Exact AUROC and AUPR (average precision) of detecting ``error`` pixels by ``u``.

    ``u``: float uncertainty, ``error``: bool, same shape. Ties in ``u`` count one half in the
    AUROC (trapezoid rule) and form one threshold in the AUPR (as scikit-learn). AUROC is NaN
    without error pixels or without correct pixels; AUPR is NaN without error pixels.
    Cost: one sort, O(n log n).
    """
    u = as_scores(u, u)
    error = as_mask(error, u, "error")
    _, (positives,), sizes = _tie_groups_descending(u.reshape(-1), error.reshape(-1))
    return auroc_aupr_from_groups(positives, sizes - positives)


def uncertainty_error_overlap(u: Tensor, error: Tensor) -> tuple[float, float]:
    """Exact UEO (Jungo & Reyes, 2019): max over tau of Dice({u >= tau}, error), and that tau.

    Every distinct value of ``u`` is tried as tau. (NaN, NaN) when there are no error pixels.
    """
    u = as_scores(u, u)
    error = as_mask(error, u, "error")
    distinct, (positives,), sizes = _tie_groups_descending(u.reshape(-1), error.reshape(-1))
    return ueo_from_groups(positives, sizes - positives, distinct)


def sparsification_curve(u: Tensor, pixel_error: Tensor, n_steps: int = 20) -> dict:
    """Exact sparsification curves of one mask and their AUSE.

    Pixels are removed in order of decreasing ``u`` (ties removed proportionally) at fractions
    ``k / n_steps``, k = 0 .. n_steps - 1 (:func:`sparsification_fractions`); the curve is the
    mean ``pixel_error`` of the kept pixels. Areas are trapezoids over these fractions.
    The oracle removes in order of decreasing true error. Returns ``fractions``, ``uncertainty``
    and ``oracle`` (lists), ``random`` (the mean error, the expected curve of a random order),
    ``ause`` = area between the uncertainty and oracle curves (>= 0, in units of the error;
    0 when u orders pixels like the error) and ``aurg`` = area between random and uncertainty
    curves (> 0 when u beats a random order).
    """
    u = as_scores(u, u)
    pixel_error = as_scores(pixel_error, u, "pixel_error").reshape(-1)
    fractions = sparsification_fractions(n_steps, u.device)
    _, (by_u_error,), by_u_count = _tie_groups_descending(u.reshape(-1), pixel_error)
    _, (oracle_error,), oracle_count = _tie_groups_descending(pixel_error, pixel_error)
    return sparsification_summary(
        fractions,
        sparsification_from_groups(by_u_count, by_u_error, fractions),
        sparsification_from_groups(oracle_count, oracle_error, fractions),
        pixel_error.mean().item(),
    )


def uncertainty_metrics(
    p: Tensor, y: Tensor, u: Tensor, pixel_error: str = "absolute", n_steps: int = 20
) -> dict[str, float]:
    """Exact per-mask uncertainty quality of ``u`` for prediction ``p`` against ``y``.

    Returns a flat dict: mean_uncertainty, error_rate, auroc, aupr, ueo, ueo_threshold,
    pearson, spearman (u vs the pixel error), ause, aurg (sparsification of the pixel error).
    """
    p = as_probabilities(p)
    y = as_mask(y, p)
    u = as_scores(u, p)
    if pixel_error not in PIXEL_ERRORS:
        raise MetricInputError(f"pixel_error: unknown '{pixel_error}', choose from {sorted(PIXEL_ERRORS)}")
    error = (p > PROB_THRESHOLD) != y
    errors = PIXEL_ERRORS[pixel_error](p, y)
    auroc, aupr = error_detection_auc(u, error)
    ueo, ueo_threshold = uncertainty_error_overlap(u, error)
    curves = sparsification_curve(u, errors, n_steps=n_steps)
    return {
        "mean_uncertainty": u.mean().item(),
        "error_rate": error.to(torch.float64).mean().item(),
        "auroc": auroc,
        "aupr": aupr,
        "ueo": ueo,
        "ueo_threshold": ueo_threshold,
        "pearson": pearson(u, errors),
        "spearman": spearman(u, errors),
        "ause": curves["ause"],
        "aurg": curves["aurg"],
    }
