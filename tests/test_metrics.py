"""Tests of modules.scoring.metrics: hand-computed cases, edge cases, and agreement with scikit-learn/scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from modules.scoring import metrics
from modules.scoring.metrics import (
    CalibrationAccumulator,
    CorrelationAccumulator,
    ErrorDetectionAccumulator,
    MetricInputError,
    SparsificationAccumulator,
    UncertaintyAccumulator,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# 4x4 hand case. Hard prediction p > 0.5 marks (0,0) (0,1) (0,2) (1,0):
# TP = 3 [(0,0) (0,1) (1,0)], FP = 1 [(0,2)], FN = 1 [(1,1)], TN = 11.
HAND_Y = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
HAND_P = torch.tensor(
    [[0.9, 0.8, 0.6, 0.1], [0.7, 0.4, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.2]],
    dtype=torch.float64,
)


def _random_case(seed: int, shape=(48, 40), informative: bool = True):
    """Probabilities, ground truth drawn from them (so errors exist) and an uncertainty map."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.rand(shape, generator=generator, dtype=torch.float64)
    y = torch.rand(shape, generator=generator, dtype=torch.float64) < p
    error = (p > 0.5) != y
    noise = torch.rand(shape, generator=generator, dtype=torch.float64)
    u = 0.4 * error + 0.6 * noise if informative else noise
    return p, y, u


# ------------------------------------------------------------------ segmentation


def test_segmentation_metrics_hand_case():
    result = metrics.segmentation_metrics(HAND_P, HAND_Y)
    assert result["iou"] == pytest.approx(3 / 5)  # TP / (TP + FP + FN)
    assert result["dice"] == pytest.approx(6 / 8)  # 2 TP / (2 TP + FP + FN)
    assert result["precision"] == pytest.approx(3 / 4)
    assert result["recall"] == pytest.approx(3 / 4)
    # TPR = 3/4, TNR = 11/12 -> BER = 1 - (3/4 + 11/12) / 2 = 1/6
    assert result["balanced_error_rate"] == pytest.approx(1 / 6)
    # |y - p|: foreground 0.1+0.2+0.3+0.6 = 1.2, background 0.6+0.1+0.1+0.1+0.4+0.5 = 1.8 -> 3/16
    assert result["mae"] == pytest.approx(3 / 16)


def test_segmentation_metrics_float32_and_int_mask_inputs_match_float64():
    result64 = metrics.segmentation_metrics(HAND_P, HAND_Y)
    result32 = metrics.segmentation_metrics(HAND_P.float(), HAND_Y.to(torch.uint8))
    assert result32 == pytest.approx(result64, abs=1e-6)


def test_bfloat16_inputs_are_accepted():
    p, y, u = _random_case(40)
    accumulator = UncertaintyAccumulator((0.0, 1.0))
    accumulator.update(p.bfloat16(), y, u.bfloat16())
    assert accumulator.compute()["n_pixels"] == p.numel()
    expected = metrics.segmentation_metrics(p.bfloat16().double(), y)
    assert metrics.segmentation_metrics(p.bfloat16(), y) == pytest.approx(expected, abs=1e-12)


def test_segmentation_metrics_both_empty_is_perfect():
    result = metrics.segmentation_metrics(torch.zeros(8, 8), torch.zeros(8, 8, dtype=torch.bool))
    assert result == {
        "iou": 1.0, "dice": 1.0, "boundary_iou_1pct": 1.0, "boundary_iou_2pct": 1.0,
        "precision": 1.0, "recall": 1.0, "mae": 0.0, "balanced_error_rate": 0.0,
    }


def test_segmentation_metrics_empty_prediction_of_present_object():
    y = torch.zeros(8, 8, dtype=torch.bool)
    y[2:5, 2:5] = True
    result = metrics.segmentation_metrics(torch.full((8, 8), 0.2), y)
    assert result["iou"] == 0.0 and result["dice"] == 0.0
    assert result["precision"] == 0.0 and result["recall"] == 0.0
    assert result["boundary_iou_1pct"] == 0.0
    assert result["balanced_error_rate"] == pytest.approx(0.5)  # TPR 0, TNR 1


def test_segmentation_metrics_prediction_on_empty_ground_truth():
    p = torch.zeros(8, 8)
    p[0, :4] = 0.9  # 4 false positives among 64 background pixels
    result = metrics.segmentation_metrics(p, torch.zeros(8, 8, dtype=torch.bool))
    assert result["iou"] == 0.0 and result["precision"] == 0.0 and result["recall"] == 0.0
    assert result["balanced_error_rate"] == pytest.approx(4 / 64)  # 1 - TNR only


def test_boundary_iou_hand_case_one_pixel_shift():
    # 5x5 image: diagonal 7.07 px, so both ratios give the minimum radius 1 and the boundary band
    # is the 8-pixel ring of each 3x3 square. Shifting right by one shares 4 ring pixels of 12.
    y = torch.zeros(5, 5, dtype=torch.bool)
    y[1:4, 1:4] = True
    p = torch.zeros(5, 5)
    p[1:4, 2:5] = 1.0
    result = metrics.segmentation_metrics(p, y)
    assert result["boundary_iou_1pct"] == pytest.approx(1 / 3)
    assert result["boundary_iou_2pct"] == pytest.approx(1 / 3)
    assert result["iou"] == pytest.approx(6 / 12)


def test_boundary_iou_identical_and_shifted_large_square():
    y = torch.zeros(200, 200, dtype=torch.bool)
    y[50:150, 50:150] = True
    identical = metrics.segmentation_metrics(y.double(), y)
    assert identical["boundary_iou_1pct"] == 1.0 and identical["boundary_iou_2pct"] == 1.0

    shifted = torch.zeros(200, 200)
    shifted[51:151, 50:150] = 1.0
    result = metrics.segmentation_metrics(shifted, y)
    # Bands are 3 px (1%) and 6 px (2%) wide; a 1-px shift hurts the narrower band more, and the
    # boundary measure is stricter than mask IoU (0.98) for a large object.
    assert 0.6 < result["boundary_iou_1pct"] < result["boundary_iou_2pct"] < result["iou"] < 1.0


@pytest.mark.parametrize("radius", [1, 2, 5])
def test_erode_and_dilate_match_scipy_iterated_3x3(radius):
    generator = torch.Generator().manual_seed(radius)
    mask = torch.rand(37, 29, generator=generator) < 0.8
    structure = np.ones((3, 3), dtype=bool)
    expected_erosion = ndimage.binary_erosion(mask.numpy(), structure, iterations=radius, border_value=0)
    expected_dilation = ndimage.binary_dilation(mask.numpy(), structure, iterations=radius)
    assert np.array_equal(metrics.erode(mask, radius).numpy(), expected_erosion)
    assert np.array_equal(metrics.dilate(mask, radius).numpy(), expected_dilation)


def test_dilated_region_radius_follows_diagonal():
    y = torch.zeros(60, 80, dtype=torch.bool)  # diagonal 100 px -> 2% = 2 px
    y[30, 40] = True
    region = metrics.dilated_region(y, ratio=0.02)
    assert int(region.sum()) == 25 and bool(region[28:33, 38:43].all())


@pytest.mark.parametrize(
    "p, y, message",
    [
        (torch.full((4, 4), 1.5), torch.zeros(4, 4, dtype=torch.bool), "p: probabilities"),
        (torch.full((4, 4), math.nan), torch.zeros(4, 4, dtype=torch.bool), "p: probabilities"),
        (torch.zeros(4, 4), torch.zeros(4, 5, dtype=torch.bool), "y: shape"),
        (torch.zeros(4, 4), torch.full((4, 4), 2), "y: mask"),
        (torch.zeros(4, 4, dtype=torch.int64), torch.zeros(4, 4, dtype=torch.bool), "p: expected a floating"),
    ],
)
def test_segmentation_metrics_rejects_bad_input(p, y, message):
    with pytest.raises(MetricInputError, match=message):
        metrics.segmentation_metrics(p, y)


# ------------------------------------------------------------------ calibration


def test_calibration_hand_case_two_bins():
    result = metrics.calibration_metrics(HAND_P, HAND_Y, n_bins=2)
    # Bin [0, 0.5): p = 0.4 (fg), ten 0.1 (bg), 0.2 (bg): 12 px, sum p 1.6, 1 foreground.
    # Bin [0.5, 1]: p = 0.9, 0.8, 0.7 (fg), 0.6 (bg): 4 px, sum p 3.0, 3 foreground.
    # ECE = (|1 - 1.6| + |3 - 3.0|) / 16 = 0.0375.
    assert result["ece"] == pytest.approx(0.0375)
    assert result["reliability"]["count"] == [12, 4]
    assert result["reliability"]["mean_confidence"] == pytest.approx([1.6 / 12, 0.75])
    assert result["reliability"]["observed_frequency"] == pytest.approx([1 / 12, 0.75])
    # Squared errors: foreground 0.01+0.04+0.09+0.36, background 0.36+0.03+0.04+0.07 -> 1.0 / 16.
    assert result["brier"] == pytest.approx(1 / 16)
    # -log-likelihood: 11 pixels at 0.9, 2 at 0.8, 1 at 0.7, 2 at 0.4 (fg p=0.4, bg p=0.6).
    expected_nll = -(11 * math.log(0.9) + 2 * math.log(0.8) + math.log(0.7) + 2 * math.log(0.4)) / 16
    assert result["nll"] == pytest.approx(expected_nll)
    assert result["n_pixels"] == 16 and result["n_bins"] == 2


def test_calibration_matches_sklearn_and_clamps_nll():
    p, y, _ = _random_case(1)
    p[0, :5] = torch.tensor([0.0, 1.0, 0.0, 1.0, 1e-9], dtype=torch.float64)  # needs clamping
    y[0, :5] = torch.tensor([True, False, False, True, True])
    eps = 1e-6
    result = metrics.calibration_metrics(p, y, eps=eps)
    p_np, y_np = p.numpy().ravel(), y.numpy().ravel()
    assert result["brier"] == pytest.approx(brier_score_loss(y_np, p_np), rel=1e-12)
    assert result["nll"] == pytest.approx(log_loss(y_np, np.clip(p_np, eps, 1 - eps)), rel=1e-12)


def test_calibration_ece_matches_numpy_reference():
    p, y, _ = _random_case(2)
    p_np, y_np = p.numpy().ravel(), y.numpy().ravel().astype(float)
    bins = np.minimum((p_np * 15).astype(int), 14)
    expected = sum(
        abs(y_np[bins == b].mean() - p_np[bins == b].mean()) * (bins == b).mean()
        for b in range(15) if (bins == b).any()
    )
    assert metrics.calibration_metrics(p, y)["ece"] == pytest.approx(expected, rel=1e-10)


def test_calibration_streaming_equals_single_batch():
    p, y, _ = _random_case(3)
    accumulator = CalibrationAccumulator()
    for rows in torch.split(torch.arange(p.shape[0]), 7):
        accumulator.update(p[rows], y[rows])
    streamed, whole = accumulator.compute(), metrics.calibration_metrics(p, y)
    for key in ("ece", "brier", "nll"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-12)
    assert streamed["reliability"]["count"] == whole["reliability"]["count"]


def test_calibration_empty_accumulator_and_empty_bins_are_nan():
    assert math.isnan(CalibrationAccumulator().compute()["ece"])
    confident = torch.full((3, 3), 0.95)
    result = metrics.calibration_metrics(confident, torch.ones(3, 3, dtype=torch.bool), n_bins=10)
    assert result["reliability"]["count"] == [0] * 9 + [9]
    assert all(math.isnan(v) for v in result["reliability"]["mean_confidence"][:9])


# ------------------------------------------------------------------ exact uncertainty metrics


def test_error_detection_hand_case():
    u = torch.tensor([0.9, 0.8, 0.3, 0.1], dtype=torch.float64)
    error = torch.tensor([True, False, True, False])
    auroc, aupr = metrics.error_detection_auc(u, error)
    assert auroc == pytest.approx(3 / 4)  # error/correct pairs ordered right: 3 of 4
    assert aupr == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)  # recall steps at precision 1 and 2/3
    ueo, tau = metrics.uncertainty_error_overlap(u, error)
    assert (ueo, tau) == pytest.approx((0.8, 0.3))  # {u >= 0.3}: Dice = 2*2 / (3 + 2)


def test_error_detection_matches_sklearn_with_ties():
    p, y, u = _random_case(4)
    u = u.round(decimals=2)  # many ties
    error = (p > 0.5) != y
    auroc, aupr = metrics.error_detection_auc(u, error)
    assert auroc == pytest.approx(roc_auc_score(error.numpy().ravel(), u.numpy().ravel()), abs=1e-12)
    assert aupr == pytest.approx(average_precision_score(error.numpy().ravel(), u.numpy().ravel()), abs=1e-12)


def test_error_detection_undefined_without_errors():
    u = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    no_error = torch.zeros(4, 4, dtype=torch.bool)
    assert all(math.isnan(v) for v in metrics.error_detection_auc(u, no_error))
    assert all(math.isnan(v) for v in metrics.uncertainty_error_overlap(u, no_error))
    auroc, aupr = metrics.error_detection_auc(u, ~no_error)  # all errors: AP 1, AUROC undefined
    assert math.isnan(auroc) and aupr == pytest.approx(1.0)


def test_informative_uncertainty_beats_random():
    p, y, informative = _random_case(5, shape=(96, 96))
    _, _, random_u = _random_case(5, shape=(96, 96), informative=False)
    error = (p > 0.5) != y
    assert metrics.error_detection_auc(informative, error)[0] > 0.8
    assert abs(metrics.error_detection_auc(random_u, error)[0] - 0.5) < 0.03


def test_ueo_of_the_error_map_itself_is_one():
    p, y, _ = _random_case(6)
    error = (p > 0.5) != y
    assert metrics.uncertainty_error_overlap(error.double(), error) == pytest.approx((1.0, 1.0))


def test_pearson_and_spearman_match_scipy():
    p, y, u = _random_case(7)
    u = u.round(decimals=1)  # ties in the ranks
    pixel_error = (y.double() - p).abs()
    u_np, error_np = u.numpy().ravel(), pixel_error.numpy().ravel()
    assert metrics.pearson(u, pixel_error) == pytest.approx(pearsonr(u_np, error_np)[0], abs=1e-12)
    assert metrics.spearman(u, pixel_error) == pytest.approx(spearmanr(u_np, error_np)[0], abs=1e-12)


def test_mask_level_spearman_with_ties_and_constant_input():
    mean_uncertainty = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.9, 0.5])
    one_minus_iou = torch.tensor([0.05, 0.4, 0.2, 0.2, 0.7, 0.3])
    expected = spearmanr(mean_uncertainty.numpy(), one_minus_iou.numpy())[0]
    assert metrics.spearman(mean_uncertainty, one_minus_iou) == pytest.approx(expected, abs=1e-12)
    assert math.isnan(metrics.spearman(torch.ones(5), torch.arange(5.0)))
    with pytest.raises(MetricInputError, match="y: 4 elements"):
        metrics.spearman(torch.arange(5.0), torch.arange(4.0))


def test_sparsification_hand_case():
    u = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    pixel_error = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    result = metrics.sparsification_curve(u, pixel_error, n_steps=4)
    assert result["fractions"] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    # Removing by u (0.1 first, then 0.4, 0.2): kept means 1.0/4, 0.9/3, 0.5/2, 0.3/1.
    assert result["uncertainty"] == pytest.approx([0.25, 0.3, 0.25, 0.3])
    # Oracle removes 0.4, 0.3, 0.2 first: 0.25, 0.6/3, 0.3/2, 0.1.
    assert result["oracle"] == pytest.approx([0.25, 0.2, 0.15, 0.1])
    # Gaps 0, .1, .1, .2 with spacing 1/4: trapezoid area 0.25 * (0.1 + 0.1 + 0.2 / 2) = 0.075.
    assert result["ause"] == pytest.approx(0.075)
    # Random order keeps the mean 0.25: gaps 0, -.05, 0, -.05 -> 0.25 * (-0.05 - 0.025).
    assert result["aurg"] == pytest.approx(-0.01875)


def test_sparsification_ties_are_removed_proportionally():
    u = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    pixel_error = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    result = metrics.sparsification_curve(u, pixel_error, n_steps=4)
    # Removing one of the two tied most-uncertain pixels removes half their error in expectation.
    assert result["uncertainty"][1] == pytest.approx(0.5 / 3)
    assert result["uncertainty"][2] == pytest.approx(0.0)


def test_ause_of_oracle_ordering_is_zero():
    p, y, _ = _random_case(8)
    pixel_error = (y.double() - p).abs()
    result = metrics.sparsification_curve(pixel_error, pixel_error)
    assert result["ause"] == pytest.approx(0.0, abs=1e-12)
    assert result["aurg"] > 0


def test_uncertainty_metrics_flat_dict():
    p, y, u = _random_case(9)
    result = metrics.uncertainty_metrics(p, y, u)
    assert set(result) == {"mean_uncertainty", "error_rate", "auroc", "aupr", "ueo", "ueo_threshold",
                           "pearson", "spearman", "ause", "aurg"}
    assert result["error_rate"] == pytest.approx(((p > 0.5) != y).double().mean().item())
    with pytest.raises(MetricInputError, match="pixel_error: unknown"):
        metrics.uncertainty_metrics(p, y, u, pixel_error="hinge")


# ------------------------------------------------------------------ streaming uncertainty metrics


def test_binned_error_detection_hand_case_is_exact_when_bins_separate_values():
    accumulator = ErrorDetectionAccumulator(u_range=(0.0, 1.0), n_bins=10)
    accumulator.update(torch.tensor([0.95, 0.85, 0.35, 0.15]), torch.tensor([True, False, True, False]))
    result = accumulator.compute()
    assert result["auroc"] == pytest.approx(3 / 4) and result["auroc_binning_bound"] == 0.0
    assert result["aupr"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert result["ueo"] == pytest.approx(0.8) and result["ueo_threshold"] == pytest.approx(0.3)
    assert result["error_rate"] == 0.5 and result["n_pixels"] == 4


def test_streaming_matches_exact_within_binning_tolerance():
    batches = [_random_case(seed, shape=(40, 50)) for seed in range(10, 15)]
    p = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    u = torch.cat([b[2] for b in batches])
    accumulator = UncertaintyAccumulator(u_range=(0.0, 1.0), n_bins=1000)
    for batch_p, batch_y, batch_u in batches:
        accumulator.update(batch_p, batch_y, batch_u)
    streamed, exact = accumulator.compute(), metrics.uncertainty_metrics(p, y, u)

    assert abs(streamed["auroc"] - exact["auroc"]) <= streamed["auroc_binning_bound"] + 1e-12
    assert abs(streamed["auroc"] - exact["auroc"]) < 5e-3
    assert abs(streamed["aupr"] - exact["aupr"]) < 5e-3
    assert abs(streamed["ueo"] - exact["ueo"]) < 5e-3
    assert abs(streamed["ueo_threshold"] - exact["ueo_threshold"]) < 2e-3  # one bin width is 1e-3
    assert streamed["pearson"] == pytest.approx(exact["pearson"], abs=1e-10)
    assert abs(streamed["spearman"] - exact["spearman"]) < 1e-2
    assert abs(streamed["ause"] - exact["ause"]) < 2e-3
    assert abs(streamed["aurg"] - exact["aurg"]) < 2e-3
    assert streamed["mean_uncertainty"] == pytest.approx(exact["mean_uncertainty"], rel=1e-12)
    assert streamed["error_rate"] == pytest.approx(exact["error_rate"], rel=1e-12)
    calibration = metrics.calibration_metrics(p, y)
    assert streamed["ece"] == pytest.approx(calibration["ece"], rel=1e-10)
    assert streamed["n_pixels"] == p.numel() and streamed["u_clamped_fraction"] == 0.0


def test_log_scale_bins_resolve_uncertainty_spanning_decades():
    # Entropy-like scores: correct pixels near 1e-5, errors near 1e-3, both spread over decades.
    generator = torch.Generator().manual_seed(20)
    error = torch.rand(20000, generator=generator) < 0.1
    exponent = torch.randn(20000, generator=generator, dtype=torch.float64) - 5.0 + 2.0 * error
    u = (10.0 ** exponent).clamp(max=math.log(2.0))
    exact_auroc, _ = metrics.error_detection_auc(u, error)
    linear = ErrorDetectionAccumulator((0.0, math.log(2.0)), n_bins=1000)
    logarithmic = ErrorDetectionAccumulator((1e-9, math.log(2.0)), n_bins=1000, log_scale=True)
    linear.update(u, error)
    logarithmic.update(u, error)
    assert abs(logarithmic.compute()["auroc"] - exact_auroc) < 1e-3
    assert linear.compute()["auroc_binning_bound"] > 0.05  # linear bins tie most of the mass


def test_correlation_accumulator_spearman_equals_exact_spearman_of_binned_values():
    p, y, u = _random_case(21)
    pixel_error = (y.double() - p).abs()
    accumulator = CorrelationAccumulator((0.0, 1.0), n_bins=50, n_error_bins=64, error_floor=1e-4)
    accumulator.update(u, pixel_error)
    u_bins = np.minimum((u.numpy() * 50).astype(int), 49)
    log_error = np.log(np.clip(pixel_error.numpy(), 1e-4, 1.0))
    e_bins = np.clip(((log_error - math.log(1e-4)) / -math.log(1e-4) * 64).astype(int), 0, 63)
    expected = spearmanr(u_bins.ravel(), e_bins.ravel())[0]
    assert accumulator.compute()["spearman"] == pytest.approx(expected, abs=1e-10)


def test_sparsification_accumulator_oracle_ordering_has_near_zero_ause():
    p, y, _ = _random_case(22)
    pixel_error = (y.double() - p).abs()
    accumulator = SparsificationAccumulator((0.0, 1.0), n_bins=1000, n_error_bins=10000)
    accumulator.update(pixel_error, pixel_error)
    assert abs(accumulator.compute()["ause"]) < 1e-3


def test_out_of_range_uncertainty_is_clamped_and_counted():
    accumulator = ErrorDetectionAccumulator((0.0, 1.0), n_bins=10)
    accumulator.update(torch.tensor([-1.0, 0.5, 2.0, 3.0]), torch.tensor([False, False, True, True]))
    result = accumulator.compute()
    assert result["u_clamped_fraction"] == 0.75
    assert result["auroc"] == pytest.approx(1.0)


def test_accumulators_before_any_update_return_nan():
    result = UncertaintyAccumulator((0.0, 1.0)).compute()
    assert result["n_pixels"] == 0
    assert all(math.isnan(result[key]) for key in ("ece", "auroc", "pearson", "spearman", "ause"))


def test_accumulator_construction_errors_name_the_argument():
    with pytest.raises(MetricInputError, match="u_range"):
        ErrorDetectionAccumulator((1.0, 1.0))
    with pytest.raises(MetricInputError, match="u_range: log_scale"):
        ErrorDetectionAccumulator((0.0, 1.0), log_scale=True)
    with pytest.raises(MetricInputError, match="pixel_error"):
        UncertaintyAccumulator((0.0, 1.0), pixel_error="hinge")
    with pytest.raises(MetricInputError, match="u: contains NaN"):
        UncertaintyAccumulator((0.0, 1.0)).update(torch.rand(3, 3), torch.ones(3, 3, dtype=torch.bool),
                                                  torch.full((3, 3), math.nan))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_rejects_mixed_devices():
    p, y, u = _random_case(30)
    results = {}
    for device in ("cpu", "cuda"):
        accumulator = UncertaintyAccumulator((0.0, 1.0))
        accumulator.update(p.to(device).float(), y.to(device), u.to(device).float())
        results[device] = accumulator.compute()
        results[device + "_seg"] = metrics.segmentation_metrics(p.to(device), y.to(device))
    assert results["cuda"] == pytest.approx(results["cpu"], rel=1e-6, abs=1e-9)
    assert results["cuda_seg"] == pytest.approx(results["cpu_seg"], abs=1e-12)
    with pytest.raises(MetricInputError, match="state is on cuda"):
        accumulator.update(p, y, u)


def test_error_to_correct_ratio_is_the_exact_ratio_of_means_and_merges_across_updates():
    p = torch.tensor([0.9, 0.9, 0.1, 0.1, 0.8, 0.2])
    y = torch.tensor([True, False, False, True, True, False])  # errors at pixels 1 and 3
    u = torch.tensor([0.1, 0.6, 0.2, 0.3, 0.05, 0.25])
    expected = ((0.6 + 0.3) / 2) / ((0.1 + 0.2 + 0.05 + 0.25) / 4)
    whole = UncertaintyAccumulator((0.0, 1.0), n_bins=10)
    whole.update(p, y, u)
    assert whole.compute()["error_to_correct_ratio"] == pytest.approx(expected, rel=1e-6)  # u is float32
    halves = UncertaintyAccumulator((0.0, 1.0), n_bins=10)
    halves.update(p[:3], y[:3], u[:3])
    halves.update(p[3:], y[3:], u[3:])
    assert halves.compute()["error_to_correct_ratio"] == pytest.approx(expected, rel=1e-6)  # u is float32
    no_errors = UncertaintyAccumulator((0.0, 1.0), n_bins=10)
    no_errors.update(p, p > 0.5, u)
    assert math.isnan(no_errors.compute()["error_to_correct_ratio"])
