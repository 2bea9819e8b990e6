"""Segmentation, calibration and uncertainty-quality metrics for the evaluation stage.

Conventions shared by every function and accumulator here:

- ``p``: predicted foreground probability, a floating tensor with values in [0, 1], usually
  ``H x W`` at ground-truth resolution. Per-pixel metrics accept any shape, so a region can be
  scored by indexing first (``p[region]``, see :func:`dilated_region`).
- ``y``: ground-truth mask, bool tensor (0/1 integer or float tensors are accepted and converted),
  same shape as ``p``.
- ``u``: uncertainty map, floating tensor of the same shape; higher = more uncertain.
- Hard prediction: ``p > PROB_THRESHOLD`` (0.5). Error map: ``(p > 0.5) != y``.
- Pixel error for correlation and sparsification: ``|y - p|`` by default (the per-pixel absolute
  error; its mean is the MAE) or ``(y - p)^2`` (the per-pixel Brier score), see ``PIXEL_ERRORS``.
- Everything runs on the inputs' device (CPU or CUDA), vectorised; sums are taken in float64.
  Accumulators allocate their state on the device of the first ``update`` and refuse tensors
  from another device.

Undefined values are ``float("nan")``; the edge-case conventions are listed on each function.
Uncertainty-quality metrics (AUROC, AUPR, UEO) are NaN when a set has no error pixels (or,
for AUROC, no correct pixels): the question "does u find the errors" has no answer there.

Streaming accumulators bin the uncertainty values into ``n_bins`` equal-width bins over a fixed
``u_range = (lo, hi)`` given at construction (values outside are clamped into the end bins and
counted in ``u_clamped_fraction``); pixels in one bin are treated as tied. Pick ``u_range`` per
uncertainty-map type (``UNCERTAINTY_RANGES`` lists the natural bounds of the usual maps), and
``log_scale=True`` for maps whose mass sits near 0 over several decades (entropies of confident
pixels), so that the bins resolve those decades. The binning errors are stated per metric.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

PROB_THRESHOLD = 0.5

# Dilation width of boundary IoU as a fraction of the image diagonal, keyed by output name.
BOUNDARY_DILATION_RATIOS: dict[str, float] = {
    "boundary_iou_1pct": 0.01,
    "boundary_iou_2pct": 0.02,
}

# Natural value ranges of common uncertainty maps, for ``u_range``. Binary entropies and mutual
# information are bounded by ln 2 nats; the standard deviation of a probability by 0.5; the
# UncertSAM-style log-variance head is clamped to [-5, 5].
UNCERTAINTY_RANGES: dict[str, tuple[float, float]] = {
    "entropy": (0.0, math.log(2.0)),
    "expected_entropy": (0.0, math.log(2.0)),
    "mutual_information": (0.0, math.log(2.0)),
    "std": (0.0, 0.5),
    "variance": (0.0, 0.25),
    "log_variance": (-5.0, 5.0),
}


class MetricInputError(ValueError):
    """Malformed metric input (shape, dtype, device or value range)."""


def absolute_error(p: Tensor, y: Tensor) -> Tensor:
    """Per-pixel ``|y - p|`` (float64, shape of ``p``); its mean is the MAE."""
    return (y.to(torch.float64) - p).abs()


def squared_error(p: Tensor, y: Tensor) -> Tensor:
    """Per-pixel ``(y - p)^2`` (float64, shape of ``p``); its mean is the Brier score."""
    return (y.to(torch.float64) - p).square()


PIXEL_ERRORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "absolute": absolute_error,
    "squared": squared_error,
}


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _as_probabilities(p: Tensor, name: str = "p") -> Tensor:
    """Check ``p`` is a non-empty floating tensor in [0, 1]; return it detached as float64."""
    if not torch.is_tensor(p):
        raise MetricInputError(f"{name}: expected a torch tensor, got {type(p).__name__}")
    if not p.is_floating_point():
        raise MetricInputError(f"{name}: expected a floating tensor of probabilities, got {p.dtype}")
    if p.numel() == 0:
        raise MetricInputError(f"{name}: empty tensor")
    p = p.detach().to(torch.float64)
    if not bool(((p >= 0) & (p <= 1)).all()):  # NaN fails both comparisons
        raise MetricInputError(
            f"{name}: probabilities must lie in [0, 1] without NaN "
            f"(min {p.nan_to_num(nan=-1.0).min().item():.4g}, max {p.max().item():.4g})"
        )
    return p


def _as_scores(u: Tensor, like: Tensor, name: str = "u") -> Tensor:
    """Check ``u`` is a finite floating tensor shaped like ``like``; return it as float64."""
    if not torch.is_tensor(u):
        raise MetricInputError(f"{name}: expected a torch tensor, got {type(u).__name__}")
    if not u.is_floating_point():
        raise MetricInputError(f"{name}: expected a floating tensor, got {u.dtype}")
    _check_same_layout(u, like, name)
    u = u.detach().to(torch.float64)
    if not bool(torch.isfinite(u).all()):
        raise MetricInputError(f"{name}: contains NaN or infinite values")
    return u


def _as_mask(y: Tensor, like: Tensor, name: str = "y") -> Tensor:
    """Check ``y`` is a binary mask shaped like ``like``; return it as a bool tensor."""
    if not torch.is_tensor(y):
        raise MetricInputError(f"{name}: expected a torch tensor, got {type(y).__name__}")
    _check_same_layout(y, like, name)
    if y.dtype == torch.bool:
        return y.detach()
    if not bool(((y == 0) | (y == 1)).all()):
        raise MetricInputError(f"{name}: mask must be bool or contain only 0 and 1 (dtype {y.dtype})")
    return y.detach() != 0


def _check_same_layout(x: Tensor, like: Tensor, name: str) -> None:
    if x.shape != like.shape:
        raise MetricInputError(f"{name}: shape {tuple(x.shape)} does not match {tuple(like.shape)}")
    if x.device != like.device:
        raise MetricInputError(f"{name}: on {x.device}, expected {like.device}")


def _as_vector(x: Tensor, name: str) -> Tensor:
    if not torch.is_tensor(x):
        raise MetricInputError(f"{name}: expected a torch tensor, got {type(x).__name__}")
    x = x.detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise MetricInputError(f"{name}: contains NaN or infinite values")
    return x


def _safe_ratio(numerator: float, denominator: float, if_empty: float) -> float:
    return numerator / denominator if denominator > 0 else if_empty


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


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
    y = _as_mask(y, y)
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
    p = _as_probabilities(p)
    y = _as_mask(y, p)
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
    tpr = _safe_ratio(tp, tp + fn, math.nan)
    tnr = _safe_ratio(tn, tn + fp, math.nan)
    present_rates = [rate for rate in (tpr, tnr) if not math.isnan(rate)]
    metrics = {
        "iou": _safe_ratio(tp, tp + fp + fn, 1.0),
        "dice": _safe_ratio(2 * tp, 2 * tp + fp + fn, 1.0),
    }
    for i, name in enumerate(BOUNDARY_DILATION_RATIOS):
        metrics[name] = _safe_ratio(boundary[2 * i], boundary[2 * i + 1], 1.0)
    metrics.update(
        precision=_safe_ratio(tp, tp + fp, 1.0 if gt_empty else 0.0),
        recall=_safe_ratio(tp, tp + fn, 1.0 if pred_empty else 0.0),
        mae=mae,
        balanced_error_rate=1.0 - sum(present_rates) / len(present_rates),
    )
    return metrics


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


class _DeviceState:
    """Tracks the device the accumulator state lives on (set by the first update).

    Subclasses set ``self._device = None`` in ``__init__``.
    """

    def _bind_device(self, tensor: Tensor) -> bool:
        """Return True on the first call (state must be allocated); reject other devices later."""
        if self._device is None:
            self._device = tensor.device
            return True
        if tensor.device != self._device:
            raise MetricInputError(
                f"{type(self).__name__}: got a tensor on {tensor.device}, state is on {self._device}"
            )
        return False


class CalibrationAccumulator(_DeviceState):
    """Streaming calibration of foreground probabilities over many masks.

    Bins are ``n_bins`` equal-width intervals of the foreground probability ``p`` over [0, 1]
    (``p = 1`` falls in the last bin). Per bin the accumulator keeps the pixel count, the sum of
    ``p`` and the number of foreground pixels, so the reliability diagram compares mean ``p``
    with the observed foreground frequency. This is the "positive-class" (not the max-class
    confidence) ECE; with L1 distance and count weights:
    ``ECE = sum_b (n_b / N) |freq_b - conf_b| = sum_b |sum_{i in b} (y_i - p_i)| / N``.
    Brier = mean (p - y)^2; NLL = mean -[y log p + (1 - y) log(1 - p)] with p clamped to
    [eps, 1 - eps] (natural log, nats per pixel).
    """

    def __init__(self, n_bins: int = 15, eps: float = 1e-6) -> None:
        if n_bins < 1:
            raise MetricInputError(f"n_bins: must be >= 1, got {n_bins}")
        if not 0 < eps < 0.5:
            raise MetricInputError(f"eps: must lie in (0, 0.5), got {eps}")
        self.n_bins, self.eps = n_bins, eps
        self._device = None

    def update(self, p: Tensor, y: Tensor) -> None:
        """Add one mask (or any batch of pixels): ``p`` float in [0, 1], ``y`` bool, same shape."""
        p = _as_probabilities(p)
        self._update_checked(p, _as_mask(y, p))

    def _update_checked(self, p: Tensor, y: Tensor) -> None:
        if self._bind_device(p):
            self._count = torch.zeros(self.n_bins, dtype=torch.int64, device=p.device)
            self._prob_sum = torch.zeros(self.n_bins, dtype=torch.float64, device=p.device)
            self._positive_sum = torch.zeros(self.n_bins, dtype=torch.float64, device=p.device)
            self._brier_sum = torch.zeros((), dtype=torch.float64, device=p.device)
            self._nll_sum = torch.zeros((), dtype=torch.float64, device=p.device)
        p, y = p.reshape(-1), y.reshape(-1)
        target = y.to(torch.float64)
        bins = (p * self.n_bins).long().clamp_(max=self.n_bins - 1)
        self._count += torch.bincount(bins, minlength=self.n_bins)
        self._prob_sum += torch.bincount(bins, weights=p, minlength=self.n_bins)
        self._positive_sum += torch.bincount(bins, weights=target, minlength=self.n_bins)
        self._brier_sum += (p - target).square().sum()
        clamped = p.clamp(self.eps, 1.0 - self.eps)
        self._nll_sum -= torch.where(y, clamped.log(), torch.log1p(-clamped)).sum()

    def compute(self) -> dict:
        """Return ``ece``, ``brier``, ``nll``, ``n_bins``, ``n_pixels`` and ``reliability``.

        ``reliability`` holds per-bin lists (length ``n_bins``): ``bin_lower``, ``bin_upper``,
        ``count``, ``mean_confidence`` (mean p) and ``observed_frequency`` (fraction of
        foreground pixels); the last two are NaN for empty bins. Scalars are NaN before any
        update.
        """
        edges = torch.linspace(0.0, 1.0, self.n_bins + 1, dtype=torch.float64)
        nan_bins = [math.nan] * self.n_bins
        result = {"ece": math.nan, "brier": math.nan, "nll": math.nan, "n_bins": self.n_bins,
                  "n_pixels": 0}
        reliability = {"bin_lower": edges[:-1].tolist(), "bin_upper": edges[1:].tolist(),
                       "count": [0] * self.n_bins, "mean_confidence": nan_bins,
                       "observed_frequency": list(nan_bins)}
        if self._device is not None and int(self._count.sum()) > 0:
            n_pixels = int(self._count.sum())
            count = self._count.to(torch.float64)
            occupied = count > 0
            safe = count.clamp(min=1.0)
            nan = torch.full_like(count, math.nan)
            result.update(
                ece=((self._positive_sum - self._prob_sum).abs().sum() / n_pixels).item(),
                brier=(self._brier_sum / n_pixels).item(),
                nll=(self._nll_sum / n_pixels).item(),
                n_pixels=n_pixels,
            )
            reliability.update(
                count=self._count.tolist(),
                mean_confidence=torch.where(occupied, self._prob_sum / safe, nan).tolist(),
                observed_frequency=torch.where(occupied, self._positive_sum / safe, nan).tolist(),
            )
        result["reliability"] = reliability
        return result


def calibration_metrics(p: Tensor, y: Tensor, n_bins: int = 15, eps: float = 1e-6) -> dict:
    """Calibration of one mask: :class:`CalibrationAccumulator` fed a single update."""
    accumulator = CalibrationAccumulator(n_bins=n_bins, eps=eps)
    accumulator.update(p, y)
    return accumulator.compute()


# --------------------------------------------------------------------------------------------
# Shared ranking cores. "Groups" are tie groups ordered from most to least uncertain: the
# distinct values of u (exact per-mask versions) or the histogram bins (streaming versions).
# --------------------------------------------------------------------------------------------


def _auroc_aupr_from_groups(positives: Tensor, negatives: Tensor) -> tuple[float, float]:
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


def _ueo_from_groups(positives: Tensor, negatives: Tensor, thresholds: Tensor) -> tuple[float, float]:
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


def _sparsification_from_groups(
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


def _sparsification_summary(
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


def _weighted_pearson(weights: Tensor, x: Tensor, y: Tensor) -> float:
    """Pearson correlation of a joint distribution: ``weights`` (Gx x Gy), support ``x`` (Gx), ``y`` (Gy)."""
    total = weights.sum()
    wx, wy = weights.sum(1), weights.sum(0)
    dx = x - (wx * x).sum() / total
    dy = y - (wy * y).sum() / total
    covariance = dx @ weights @ dy
    variance = (wx * dx.square()).sum() * (wy * dy.square()).sum()
    return (covariance / variance.sqrt()).item() if variance.item() > 0 else math.nan


# --------------------------------------------------------------------------------------------
# Exact per-mask (or per-vector) uncertainty metrics
# --------------------------------------------------------------------------------------------


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two tensors with the same number of elements (flattened).

    NaN if either is constant or they hold fewer than 2 elements.
    """
    x, y = _as_vector(x, "x"), _as_vector(y, "y")
    if x.numel() != y.numel():
        raise MetricInputError(f"y: {y.numel()} elements, x has {x.numel()}")
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
    x, y = _as_vector(x, "x"), _as_vector(y, "y")
    if x.numel() != y.numel():
        raise MetricInputError(f"y: {y.numel()} elements, x has {x.numel()}")
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
    u = _as_scores(u, u)
    error = _as_mask(error, u, "error")
    _, (positives,), sizes = _tie_groups_descending(u.reshape(-1), error.reshape(-1))
    return _auroc_aupr_from_groups(positives, sizes - positives)


def uncertainty_error_overlap(u: Tensor, error: Tensor) -> tuple[float, float]:
    """Exact UEO (Jungo & Reyes, 2019): max over tau of Dice({u >= tau}, error), and that tau.

    Every distinct value of ``u`` is tried as tau. (NaN, NaN) when there are no error pixels.
    """
    u = _as_scores(u, u)
    error = _as_mask(error, u, "error")
    distinct, (positives,), sizes = _tie_groups_descending(u.reshape(-1), error.reshape(-1))
    return _ueo_from_groups(positives, sizes - positives, distinct)


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
    u = _as_scores(u, u)
    pixel_error = _as_scores(pixel_error, u, "pixel_error").reshape(-1)
    fractions = sparsification_fractions(n_steps, u.device)
    _, (by_u_error,), by_u_count = _tie_groups_descending(u.reshape(-1), pixel_error)
    _, (oracle_error,), oracle_count = _tie_groups_descending(pixel_error, pixel_error)
    return _sparsification_summary(
        fractions,
        _sparsification_from_groups(by_u_count, by_u_error, fractions),
        _sparsification_from_groups(oracle_count, oracle_error, fractions),
        pixel_error.mean().item(),
    )


def uncertainty_metrics(
    p: Tensor, y: Tensor, u: Tensor, pixel_error: str = "absolute", n_steps: int = 20
) -> dict[str, float]:
    """Exact per-mask uncertainty quality of ``u`` for prediction ``p`` against ``y``.

    Returns a flat dict: mean_uncertainty, error_rate, auroc, aupr, ueo, ueo_threshold,
    pearson, spearman (u vs the pixel error), ause, aurg (sparsification of the pixel error).
    """
    p = _as_probabilities(p)
    y = _as_mask(y, p)
    u = _as_scores(u, p)
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


# --------------------------------------------------------------------------------------------
# Streaming (binned) uncertainty metrics
# --------------------------------------------------------------------------------------------


class _UncertaintyBinning:
    """Equal-width bins of u over ``u_range`` (in log(u) when ``log_scale``), out-of-range clamped."""

    def __init__(self, u_range: tuple[float, float], n_bins: int, log_scale: bool) -> None:
        lo, hi = (float(v) for v in u_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise MetricInputError(f"u_range: need finite lo < hi, got {u_range}")
        if log_scale and lo <= 0:
            raise MetricInputError(f"u_range: log_scale needs lo > 0, got {u_range}")
        if n_bins < 2:
            raise MetricInputError(f"n_bins: must be >= 2, got {n_bins}")
        self.lo, self.hi, self.n_bins, self.log_scale = lo, hi, n_bins, log_scale
        self._transform = torch.log if log_scale else (lambda t: t)
        self._t_lo = math.log(lo) if log_scale else lo
        self._t_hi = math.log(hi) if log_scale else hi

    def index(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Bin index (int64, shape of u) and the number of clamped values (0-d int64)."""
        clamped = ((u < self.lo) | (u > self.hi)).sum()
        position = (self._transform(u.clamp(self.lo, self.hi)) - self._t_lo) / (self._t_hi - self._t_lo)
        return (position * self.n_bins).long().clamp_(0, self.n_bins - 1), clamped

    def lower_edges(self, device: torch.device) -> Tensor:
        """Lower bin edges in units of u, float64 (n_bins,)."""
        edges = torch.linspace(self._t_lo, self._t_hi, self.n_bins + 1, dtype=torch.float64, device=device)
        return (edges.exp() if self.log_scale else edges)[:-1]


class ErrorDetectionAccumulator(_DeviceState):
    """Streaming AUROC / AUPR of error detection and UEO for one uncertainty-map type.

    Keeps two histograms of u (error and correct pixels) over ``n_bins`` bins of ``u_range``.
    Pixels in one bin are treated as tied, so AUROC is exact for the binned scores and differs
    from the exact value by at most ``auroc_binning_bound`` = 0.5 * sum_b err_b ok_b / (P N)
    (the share of error/correct pairs that the bins tie; reported by ``compute``). AUPR has no
    closed bound: it is the exact average precision of the binned scores. UEO is the max Dice
    over the bin lower edges as thresholds (``u >= tau``), so tau is resolved to one bin width.
    """

    def __init__(self, u_range: tuple[float, float], n_bins: int = 1000, log_scale: bool = False) -> None:
        self.binning = _UncertaintyBinning(u_range, n_bins, log_scale)
        self._device = None

    def update(self, u: Tensor, error: Tensor) -> None:
        """Add pixels: ``u`` float uncertainty, ``error`` bool ``(p > 0.5) != y``, same shape."""
        u = _as_scores(u, u)
        self._update_checked(u, _as_mask(error, u, "error"))

    def _update_checked(self, u: Tensor, error: Tensor) -> None:
        n_bins = self.binning.n_bins
        if self._bind_device(u):
            self._histogram = torch.zeros(n_bins, 2, dtype=torch.int64, device=u.device)
            self._clamped = torch.zeros((), dtype=torch.int64, device=u.device)
        bins, clamped = self.binning.index(u.reshape(-1))
        self._histogram += torch.bincount(2 * bins + error.reshape(-1), minlength=2 * n_bins).view(n_bins, 2)
        self._clamped += clamped

    def compute(self) -> dict[str, float]:
        """Return auroc, aupr, auroc_binning_bound, ueo, ueo_threshold, error_rate,
        u_clamped_fraction, n_pixels (NaN / 0 before any update)."""
        if self._device is None or int(self._histogram.sum()) == 0:
            empty = dict.fromkeys(("auroc", "aupr", "auroc_binning_bound", "ueo", "ueo_threshold",
                                   "error_rate", "u_clamped_fraction"), math.nan)
            return empty | {"n_pixels": 0}
        histogram = self._histogram.flip(0).to(torch.float64)  # most uncertain first
        negatives, positives = histogram[:, 0], histogram[:, 1]
        n_pos, n_neg = positives.sum().item(), negatives.sum().item()
        n_pixels = n_pos + n_neg
        auroc, aupr = _auroc_aupr_from_groups(positives, negatives)
        ueo, tau = _ueo_from_groups(positives, negatives, self.binning.lower_edges(self._device).flip(0))
        tied_pairs = (positives * negatives).sum().item()
        return {
            "auroc": auroc,
            "aupr": aupr,
            "auroc_binning_bound": 0.5 * tied_pairs / (n_pos * n_neg) if n_pos and n_neg else math.nan,
            "ueo": ueo,
            "ueo_threshold": tau,
            "error_rate": n_pos / n_pixels,
            "u_clamped_fraction": self._clamped.item() / n_pixels,
            "n_pixels": int(n_pixels),
        }


class CorrelationAccumulator(_DeviceState):
    """Streaming Pearson and (binned) Spearman correlation between u and the pixel error.

    Pearson is exact up to float64 rounding: running sums of u, e, u^2, e^2 and u e, taken about
    a shift fixed at the first update (its means) to avoid cancellation. Spearman is the Pearson
    correlation of average ranks computed from a joint 2-D histogram: u in the ``n_bins`` bins of
    ``u_range``, the error in ``n_error_bins`` log-spaced bins over [error_floor, 1] (errors
    below the floor, including 0, share the first bin). It equals the exact Spearman of the
    binned values: pixels sharing a bin are ranked as ties. The error axis is logarithmic because
    rank correlation only sees order and |y - p| of a confident model spans decades near 0.
    Also reports ``mean_uncertainty`` (the sharpness of the map).
    """

    def __init__(
        self,
        u_range: tuple[float, float],
        n_bins: int = 1000,
        log_scale: bool = False,
        n_error_bins: int = 256,
        error_floor: float = 1e-6,
    ) -> None:
        if not 0 < error_floor < 1:
            raise MetricInputError(f"error_floor: must lie in (0, 1), got {error_floor}")
        self.binning = _UncertaintyBinning(u_range, n_bins, log_scale)
        self.error_binning = _UncertaintyBinning((error_floor, 1.0), n_error_bins, log_scale=True)
        self._device = None

    def update(self, u: Tensor, pixel_error: Tensor) -> None:
        """Add pixels: ``u`` float uncertainty, ``pixel_error`` float in [0, 1] (e.g. |y - p|)."""
        u = _as_scores(u, u)
        self._update_checked(u, _as_scores(pixel_error, u, "pixel_error"))

    def _update_checked(self, u: Tensor, pixel_error: Tensor) -> None:
        u, pixel_error = u.reshape(-1), pixel_error.reshape(-1)
        n_u, n_e = self.binning.n_bins, self.error_binning.n_bins
        if self._bind_device(u):
            self._shift = torch.stack([u.mean(), pixel_error.mean()])
            self._moments = torch.zeros(6, dtype=torch.float64, device=u.device)
            self._joint = torch.zeros(n_u * n_e, dtype=torch.int64, device=u.device)
        du, de = u - self._shift[0], pixel_error - self._shift[1]
        self._moments += torch.stack([
            torch.tensor(float(u.numel()), dtype=torch.float64, device=u.device),
            du.sum(), de.sum(), du.square().sum(), de.square().sum(), (du * de).sum(),
        ])
        u_bins, _ = self.binning.index(u)
        e_bins, _ = self.error_binning.index(pixel_error)
        self._joint += torch.bincount(u_bins * n_e + e_bins, minlength=n_u * n_e)

    def compute(self) -> dict[str, float]:
        """Return pearson, spearman, mean_uncertainty (NaN before any update or if constant)."""
        if self._device is None:
            return {"pearson": math.nan, "spearman": math.nan, "mean_uncertainty": math.nan}
        n, su, se, suu, see, sue = self._moments.tolist()
        covariance = sue - su * se / n
        variance = (suu - su * su / n) * (see - se * se / n)
        joint = self._joint.view(self.binning.n_bins, self.error_binning.n_bins).to(torch.float64)
        return {
            "pearson": covariance / math.sqrt(variance) if variance > 0 else math.nan,
            "spearman": _weighted_pearson(
                joint, _bin_average_ranks(joint.sum(1)), _bin_average_ranks(joint.sum(0))
            ),
            "mean_uncertainty": self._shift[0].item() + su / n,
        }


def _bin_average_ranks(counts: Tensor) -> Tensor:
    """Average 1-based rank of the pixels in each bin, bins in ascending order (float64)."""
    return torch.cumsum(counts, 0) - (counts - 1.0) / 2.0


class SparsificationAccumulator(_DeviceState):
    """Streaming sparsification curves and AUSE of one uncertainty-map type.

    Per u-bin (``n_bins`` over ``u_range``) the accumulator keeps the pixel count and the error
    sum; removal by decreasing u goes bin by bin, a bin cut by the removal fraction losing its
    pixels proportionally (ties inside a bin in random order, in expectation). The oracle uses
    the same scheme on ``n_error_bins`` equal-width bins of the error over [0, 1]; each of its
    points is within 1 / n_error_bins of the exact oracle (errors in a bin differ by less than
    the bin width). The uncertainty curve is exact for the binned u; it differs from the exact
    curve where the error varies inside a u bin. Fractions: :func:`sparsification_fractions`.
    """

    def __init__(
        self,
        u_range: tuple[float, float],
        n_bins: int = 1000,
        log_scale: bool = False,
        n_error_bins: int = 10000,
        n_steps: int = 20,
    ) -> None:
        sparsification_fractions(n_steps)  # validates n_steps
        self.binning = _UncertaintyBinning(u_range, n_bins, log_scale)
        self.error_binning = _UncertaintyBinning((0.0, 1.0), n_error_bins, log_scale=False)
        self.n_steps = n_steps
        self._device = None

    def update(self, u: Tensor, pixel_error: Tensor) -> None:
        """Add pixels: ``u`` float uncertainty, ``pixel_error`` float in [0, 1] (e.g. |y - p|)."""
        u = _as_scores(u, u)
        self._update_checked(u, _as_scores(pixel_error, u, "pixel_error"))

    def _update_checked(self, u: Tensor, pixel_error: Tensor) -> None:
        u, pixel_error = u.reshape(-1), pixel_error.reshape(-1)
        if self._bind_device(u):
            u_shape, e_shape = self.binning.n_bins, self.error_binning.n_bins
            self._u_count = torch.zeros(u_shape, dtype=torch.float64, device=u.device)
            self._u_error = torch.zeros(u_shape, dtype=torch.float64, device=u.device)
            self._e_count = torch.zeros(e_shape, dtype=torch.float64, device=u.device)
            self._e_error = torch.zeros(e_shape, dtype=torch.float64, device=u.device)
        for binning, count, error_sum, values in (
            (self.binning, self._u_count, self._u_error, u),
            (self.error_binning, self._e_count, self._e_error, pixel_error),
        ):
            bins, _ = binning.index(values)
            count += torch.bincount(bins, minlength=binning.n_bins)
            error_sum += torch.bincount(bins, weights=pixel_error, minlength=binning.n_bins)

    def compute(self) -> dict:
        """Return fractions, uncertainty, oracle (lists), random, ause, aurg (NaN when empty)."""
        fractions = sparsification_fractions(self.n_steps)
        if self._device is None or self._u_count.sum().item() == 0:
            nan_curve = [math.nan] * fractions.numel()
            return {"fractions": fractions.tolist(), "uncertainty": nan_curve, "oracle": list(nan_curve),
                    "random": math.nan, "ause": math.nan, "aurg": math.nan}
        fractions = fractions.to(self._device)
        return _sparsification_summary(
            fractions,
            _sparsification_from_groups(self._u_count.flip(0), self._u_error.flip(0), fractions),
            _sparsification_from_groups(self._e_count.flip(0), self._e_error.flip(0), fractions),
            (self._u_error.sum() / self._u_count.sum()).item(),
        )


class UncertaintyAccumulator:
    """Everything for one (method, uncertainty map) pair, streamed over the masks of a domain.

    Bundles :class:`CalibrationAccumulator` (of p), :class:`ErrorDetectionAccumulator`,
    :class:`CorrelationAccumulator` and :class:`SparsificationAccumulator` (of u). ``u_range``,
    ``n_bins`` and ``log_scale`` set the shared u binning (see the module docstring);
    ``pixel_error`` names the entry of ``PIXEL_ERRORS`` used for correlation and sparsification.
    """

    def __init__(
        self,
        u_range: tuple[float, float],
        *,
        n_bins: int = 1000,
        log_scale: bool = False,
        calibration_bins: int = 15,
        eps: float = 1e-6,
        pixel_error: str = "absolute",
        n_sparsification_steps: int = 20,
        n_oracle_bins: int = 10000,
        n_rank_error_bins: int = 256,
    ) -> None:
        if pixel_error not in PIXEL_ERRORS:
            raise MetricInputError(f"pixel_error: unknown '{pixel_error}', choose from {sorted(PIXEL_ERRORS)}")
        self.pixel_error = pixel_error
        self.calibration = CalibrationAccumulator(n_bins=calibration_bins, eps=eps)
        self.error_detection = ErrorDetectionAccumulator(u_range, n_bins=n_bins, log_scale=log_scale)
        self.correlation = CorrelationAccumulator(
            u_range, n_bins=n_bins, log_scale=log_scale, n_error_bins=n_rank_error_bins
        )
        self.sparsification = SparsificationAccumulator(
            u_range, n_bins=n_bins, log_scale=log_scale, n_error_bins=n_oracle_bins,
            n_steps=n_sparsification_steps,
        )

    def update(self, p: Tensor, y: Tensor, u: Tensor) -> None:
        """Add one mask: ``p`` probabilities in [0, 1], ``y`` bool, ``u`` uncertainty, same shape."""
        p = _as_probabilities(p)
        y = _as_mask(y, p)
        u = _as_scores(u, p)
        errors = PIXEL_ERRORS[self.pixel_error](p, y)
        self.calibration._update_checked(p, y)
        self.error_detection._update_checked(u, (p > PROB_THRESHOLD) != y)
        self.correlation._update_checked(u, errors)
        self.sparsification._update_checked(u, errors)

    def compute(self) -> dict[str, float]:
        """Flat dict of scalars for a CSV row.

        Keys: ece, brier, nll, n_pixels, error_rate, mean_uncertainty, auroc, aupr,
        auroc_binning_bound, ueo, ueo_threshold, pearson, spearman, ause, aurg,
        u_clamped_fraction.
        """
        calibration = self.calibration.compute()
        detection = self.error_detection.compute()
        correlation = self.correlation.compute()
        sparsification = self.sparsification.compute()
        return {
            "ece": calibration["ece"],
            "brier": calibration["brier"],
            "nll": calibration["nll"],
            "n_pixels": calibration["n_pixels"],
            "error_rate": detection["error_rate"],
            "mean_uncertainty": correlation["mean_uncertainty"],
            "auroc": detection["auroc"],
            "aupr": detection["aupr"],
            "auroc_binning_bound": detection["auroc_binning_bound"],
            "ueo": detection["ueo"],
            "ueo_threshold": detection["ueo_threshold"],
            "pearson": correlation["pearson"],
            "spearman": correlation["spearman"],
            "ause": sparsification["ause"],
            "aurg": sparsification["aurg"],
            "u_clamped_fraction": detection["u_clamped_fraction"],
        }

    def curves(self) -> dict:
        """Plot data: ``reliability`` (CalibrationAccumulator.compute()) and ``sparsification``
        (SparsificationAccumulator.compute()), the inputs of modules.plots."""
        return {"reliability": self.calibration.compute(), "sparsification": self.sparsification.compute()}
