"""Calibration of foreground probabilities: reliability bins, ECE, Brier score and NLL, streamed
over many masks (``CalibrationAccumulator``) or for one mask (``calibration_metrics``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modules.scoring.common import MetricInputError, StreamingState, as_mask, as_probabilities


class CalibrationAccumulator(StreamingState):
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
        p = as_probabilities(p)
        self._update_checked(p, as_mask(y, p))

    def _state_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"_count": ((self.n_bins,), torch.int64), "_prob_sum": ((self.n_bins,), torch.float64),
                "_positive_sum": ((self.n_bins,), torch.float64), "_brier_sum": ((), torch.float64),
                "_nll_sum": ((), torch.float64)}

    def _update_checked(self, p: Tensor, y: Tensor) -> None:
        self._bind_device(p)
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
