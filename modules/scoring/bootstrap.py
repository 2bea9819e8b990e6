"""Seeded bootstrap intervals over images, from per-image sufficient statistics.

A replicate resamples the ``n`` images of an aggregate with replacement; it is represented by how
often each image was drawn (``counts``, ``B x n``), so a metric whose statistic is a sum over images
(histograms, calibration bins, IoU sums) is recomputed per replicate with one matrix product, and
mask-level metrics weight each mask by its image's count (``modules/scoring/mask_quality.py``).
The interval is the percentile interval of the replicates (NaN replicates, e.g. an AUROC of a
replicate without errors, are left out; all NaN gives NaN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate (on every image) and its bootstrap percentile interval."""

    value: float
    lo: float
    hi: float


def resample_counts(n_units: int, samples: int, seed: int) -> np.ndarray:
    """``samples x n_units`` int64: how often each unit is drawn in each replicate (each row sums to
    ``n_units``). Seeded: the same arguments give the same replicates."""
    if n_units < 1 or samples < 1:
        raise ValueError(f"resample_counts: need n_units >= 1 and samples >= 1, got {n_units}, {samples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=samples).astype(np.int64)


def percentile_interval(value: float, replicates: np.ndarray, level: float = 0.95) -> Interval:
    """``value`` with the ``level`` percentile interval of ``replicates`` (``B``; NaNs ignored)."""
    finite = np.asarray(replicates, dtype=np.float64)
    finite = finite[~np.isnan(finite)]
    if finite.size == 0 or math.isnan(value):
        return Interval(float(value), math.nan, math.nan)
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return Interval(float(value), float(lo), float(hi))


def summed(statistics: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-replicate sums of per-image statistics: ``n x ...`` and ``B x n`` -> ``B x ...`` (float64)."""
    statistics = np.asarray(statistics, dtype=np.float64)
    flat = statistics.reshape(statistics.shape[0], -1)
    return (np.asarray(counts, dtype=np.float64) @ flat).reshape(counts.shape[0], *statistics.shape[1:])


def ratio_interval(numerators: np.ndarray, denominators: np.ndarray, counts: np.ndarray) -> Interval:
    """``sum(numerators) / sum(denominators)`` over images (e.g. IoU sums over mask counts: the mean
    IoU over masks) and its interval; ``numerators``, ``denominators``: ``n``; ``counts``: ``B x n``."""
    numerators, denominators = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
    total = denominators.sum()
    value = numerators.sum() / total if total > 0 else math.nan
    top, bottom = summed(numerators, counts), summed(denominators, counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        replicates = np.where(bottom > 0, top / bottom, np.nan)
    return percentile_interval(value, replicates)


def auroc_from_histograms(histograms: np.ndarray) -> np.ndarray:
    """AUROC of error detection from ``... x n_bins x 2`` histograms of u (column 0: correct pixels,
    column 1: errors; bins in ascending u), pixels of one bin tied; NaN without errors or without
    correct pixels. The formula of ``ranking.auroc_aupr_from_groups``, batched over the leading axes."""
    histograms = np.asarray(histograms, dtype=np.float64)
    negatives, positives = histograms[..., 0], histograms[..., 1]
    n_neg, n_pos = negatives.sum(-1), positives.sum(-1)
    negatives_below = np.cumsum(negatives, -1) - negatives
    pairs = (positives * (negatives_below + 0.5 * negatives)).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), pairs / (n_pos * n_neg), np.nan)


def ece_from_bins(count: np.ndarray, prob_sum: np.ndarray, positive_sum: np.ndarray) -> np.ndarray:
    """``sum_b |positive_sum_b - prob_sum_b| / N`` (``CalibrationAccumulator``'s ECE) over the last
    axis of ``... x n_bins`` bin statistics; NaN without pixels."""
    total = np.asarray(count, np.float64).sum(-1)
    gap = np.abs(np.asarray(positive_sum, np.float64) - np.asarray(prob_sum, np.float64)).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, gap / total, np.nan)
