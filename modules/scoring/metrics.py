"""Streaming uncertainty-quality metrics over the pixels of many masks, and the public surface of
``modules.scoring``'s metrics (the per-concept modules' names are re-exported here).

Streaming accumulators bin the uncertainty values into ``n_bins`` equal-width bins over a fixed
``u_range = (lo, hi)`` (values outside are clamped into the end bins and counted in
``u_clamped_fraction``); pixels in one bin are treated as tied. ``UNCERTAINTY_RANGES`` lists the
natural bounds of the usual maps; ``log_scale=True`` bins log(u), for maps whose mass spans decades
near 0. Each accumulator has ``update``, ``compute`` and ``state_dict`` / ``load_state_dict``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from modules.scoring.calibration import CalibrationAccumulator, calibration_metrics
from modules.scoring.common import (PIXEL_ERRORS, PROB_THRESHOLD, MetricInputError, StreamingState, absolute_error,
                                    as_mask, as_probabilities, as_scores, squared_error)
from modules.scoring.ranking import (auroc_aupr_from_groups, error_detection_auc, pearson, sparsification_curve,
                                     sparsification_fractions, sparsification_from_groups, sparsification_summary,
                                     spearman, ueo_from_groups, uncertainty_error_overlap, uncertainty_metrics,
                                     weighted_pearson)
from modules.scoring.segmentation import (BOUNDARY_DILATION_RATIOS, diagonal_radius, dilate, dilated_region, erode,
                                          mask_boundary, segmentation_metrics)

__all__ = [
    "BOUNDARY_DILATION_RATIOS", "PIXEL_ERRORS", "PROB_THRESHOLD", "UNCERTAINTY_RANGES",
    "CalibrationAccumulator", "CorrelationAccumulator", "ErrorDetectionAccumulator", "MetricInputError",
    "SparsificationAccumulator", "UncertaintyAccumulator",
    "absolute_error", "calibration_metrics", "diagonal_radius", "dilate", "dilated_region", "erode",
    "error_detection_auc", "mask_boundary", "pearson", "segmentation_metrics", "sparsification_curve",
    "sparsification_fractions", "spearman", "squared_error", "uncertainty_error_overlap", "uncertainty_metrics",
]

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


class ErrorDetectionAccumulator(StreamingState):
    """Streaming AUROC / AUPR of error detection and UEO for one uncertainty-map type.

    Keeps two histograms of u (error and correct pixels) over ``n_bins`` bins of ``u_range``, and
    the exact sums of u over each, for ``error_to_correct_ratio``: the mean u on error pixels over
    the mean u on correct ones (how much higher the map is where the prediction is wrong).
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
        u = as_scores(u, u)
        self._update_checked(u, as_mask(error, u, "error"))

    def _state_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"_histogram": ((self.binning.n_bins, 2), torch.int64), "_clamped": ((), torch.int64),
                "_u_sum": ((2,), torch.float64)}

    def _update_checked(self, u: Tensor, error: Tensor) -> None:
        n_bins = self.binning.n_bins
        self._bind_device(u)
        bins, clamped = self.binning.index(u.reshape(-1))
        self._histogram += torch.bincount(2 * bins + error.reshape(-1), minlength=2 * n_bins).view(n_bins, 2)
        self._clamped += clamped
        self._u_sum += torch.zeros(2, dtype=torch.float64, device=u.device).index_add_(
            0, error.reshape(-1).long(), u.reshape(-1).double())

    def compute(self) -> dict[str, float]:
        """Return auroc, aupr, auroc_binning_bound, ueo, ueo_threshold, error_rate,
        error_to_correct_ratio, u_clamped_fraction, n_pixels (NaN / 0 before any update; the ratio
        is NaN without error or correct pixels, or when the correct pixels' mean u is 0)."""
        if self._device is None or int(self._histogram.sum()) == 0:
            empty = dict.fromkeys(("auroc", "aupr", "auroc_binning_bound", "ueo", "ueo_threshold",
                                   "error_rate", "error_to_correct_ratio", "u_clamped_fraction"), math.nan)
            return empty | {"n_pixels": 0}
        histogram = self._histogram.flip(0).to(torch.float64)  # most uncertain first
        negatives, positives = histogram[:, 0], histogram[:, 1]
        n_pos, n_neg = positives.sum().item(), negatives.sum().item()
        n_pixels = n_pos + n_neg
        auroc, aupr = auroc_aupr_from_groups(positives, negatives)
        ueo, tau = ueo_from_groups(positives, negatives, self.binning.lower_edges(self._device).flip(0))
        tied_pairs = (positives * negatives).sum().item()
        correct_sum, error_sum = self._u_sum.tolist()
        mean_correct = correct_sum / n_neg if n_neg else math.nan
        ratio = (error_sum / n_pos) / mean_correct if n_pos and n_neg and mean_correct > 0 else math.nan
        return {
            "auroc": auroc,
            "aupr": aupr,
            "auroc_binning_bound": 0.5 * tied_pairs / (n_pos * n_neg) if n_pos and n_neg else math.nan,
            "ueo": ueo,
            "ueo_threshold": tau,
            "error_rate": n_pos / n_pixels,
            "error_to_correct_ratio": ratio,
            "u_clamped_fraction": self._clamped.item() / n_pixels,
            "n_pixels": int(n_pixels),
        }


class CorrelationAccumulator(StreamingState):
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
        u = as_scores(u, u)
        self._update_checked(u, as_scores(pixel_error, u, "pixel_error"))

    def _state_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"_shift": ((2,), torch.float64), "_moments": ((6,), torch.float64),
                "_joint": ((self.binning.n_bins * self.error_binning.n_bins,), torch.int64)}

    def _update_checked(self, u: Tensor, pixel_error: Tensor) -> None:
        u, pixel_error = u.reshape(-1), pixel_error.reshape(-1)
        n_u, n_e = self.binning.n_bins, self.error_binning.n_bins
        if self._bind_device(u):  # sums are taken about the first update's means
            self._shift = torch.stack([u.mean(), pixel_error.mean()])
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
            "spearman": weighted_pearson(
                joint, _bin_average_ranks(joint.sum(1)), _bin_average_ranks(joint.sum(0))
            ),
            "mean_uncertainty": self._shift[0].item() + su / n,
        }


def _bin_average_ranks(counts: Tensor) -> Tensor:
    """Average 1-based rank of the pixels in each bin, bins in ascending order (float64)."""
    return torch.cumsum(counts, 0) - (counts - 1.0) / 2.0


class SparsificationAccumulator(StreamingState):
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
        u = as_scores(u, u)
        self._update_checked(u, as_scores(pixel_error, u, "pixel_error"))

    def _state_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        u_shape, e_shape = (self.binning.n_bins,), (self.error_binning.n_bins,)
        return {"_u_count": (u_shape, torch.float64), "_u_error": (u_shape, torch.float64),
                "_e_count": (e_shape, torch.float64), "_e_error": (e_shape, torch.float64)}

    def _update_checked(self, u: Tensor, pixel_error: Tensor) -> None:
        u, pixel_error = u.reshape(-1), pixel_error.reshape(-1)
        self._bind_device(u)
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
        return sparsification_summary(
            fractions,
            sparsification_from_groups(self._u_count.flip(0), self._u_error.flip(0), fractions),
            sparsification_from_groups(self._e_count.flip(0), self._e_error.flip(0), fractions),
            (self._u_error.sum() / self._u_count.sum()).item(),
        )


class UncertaintyAccumulator:
    """Everything for one (method, uncertainty map) pair, streamed over the masks of a domain.

    Bundles :class:`CalibrationAccumulator` (of p), :class:`ErrorDetectionAccumulator`,
    :class:`CorrelationAccumulator` and :class:`SparsificationAccumulator` (of u). ``u_range``,
    ``n_bins`` and ``log_scale`` set the shared u binning (see the module docstring);
    ``pixel_error`` names the entry of ``PIXEL_ERRORS`` used for correlation and sparsification.
    """

    #: The streaming parts, as attributes and as the keys of ``state_dict``.
    PARTS = ("calibration", "error_detection", "correlation", "sparsification")

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
        p = as_probabilities(p)
        y = as_mask(y, p)
        u = as_scores(u, p)
        errors = PIXEL_ERRORS[self.pixel_error](p, y)
        self.calibration._update_checked(p, y)
        self.error_detection._update_checked(u, (p > PROB_THRESHOLD) != y)
        self.correlation._update_checked(u, errors)
        self.sparsification._update_checked(u, errors)

    def compute(self) -> dict[str, float]:
        """Flat dict of scalars for a CSV row.

        Keys: ece, brier, nll, n_pixels, error_rate, mean_uncertainty, auroc, aupr,
        auroc_binning_bound, error_to_correct_ratio, ueo, ueo_threshold, pearson, spearman, ause,
        aurg, u_clamped_fraction.
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
            "error_to_correct_ratio": detection["error_to_correct_ratio"],
            "ueo": detection["ueo"],
            "ueo_threshold": detection["ueo_threshold"],
            "pearson": correlation["pearson"],
            "spearman": correlation["spearman"],
            "ause": sparsification["ause"],
            "aurg": sparsification["aurg"],
            "u_clamped_fraction": detection["u_clamped_fraction"],
        }

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        """``part -> its state_dict`` for the parts in ``PARTS`` (parts never updated left out)."""
        return {part: state for part in self.PARTS if (state := getattr(self, part).state_dict())}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Restore a ``state_dict`` into an accumulator built with the same settings."""
        unknown = sorted(set(state) - set(self.PARTS))
        if unknown:
            raise MetricInputError(f"UncertaintyAccumulator: unknown state parts {unknown} (known: {list(self.PARTS)})")
        for part in self.PARTS:
            getattr(self, part).load_state_dict(state.get(part, {}))

    def curves(self) -> dict:
        """Plot data: ``reliability`` (CalibrationAccumulator.compute()) and ``sparsification``
        (SparsificationAccumulator.compute()), the inputs of modules.scoring.plots."""
        return {"reliability": self.calibration.compute(), "sparsification": self.sparsification.compute()}
