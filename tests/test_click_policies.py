"""Click policies: each choice is the argmax of its map and never a clicked or blocked pixel; the error
oracle clicks at the interior of the largest error region, with its label."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from modules.uncertainty.strategies import StrategyOutput, read_variance, variance_readout
from modules.interactive.click_policies import (
    CLICK_POLICIES,
    ClickChoice,
    annotator_label,
    blocked_pixels,
    choose_at_random,
    choose_by_error_oracle,
    choose_by_map,
    click_spacing,
)


def _disk(shape, centre, radius):
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def test_map_policy_takes_the_argmax_and_never_a_clicked_or_nearby_pixel():
    scores = np.random.default_rng(0).random((40, 50))
    first = choose_by_map(scores, [])
    assert (first.row, first.col) == np.unravel_index(np.argmax(scores), scores.shape)
    second = choose_by_map(scores, [(first.row, first.col)])
    masked = scores.copy()
    masked[first.row, first.col] = -np.inf
    assert (second.row, second.col) == np.unravel_index(np.argmax(masked), scores.shape)
    spaced = choose_by_map(scores, [(first.row, first.col)], min_distance=6)
    assert np.hypot(spaced.row - first.row, spaced.col - first.col) >= 6
    allowed = ~blocked_pixels(scores.shape, [(first.row, first.col)], 6)
    assert scores[spaced.row, spaced.col] == scores[allowed].max()


def test_min_distance_auto_is_two_prompt_map_sigmas_in_the_frame_asked_for():
    assert click_spacing("auto", 8.0) == 16.0  # FRAME256 pixels (the predictor's frame)
    assert click_spacing("auto", 8.0, (300, 512)) == 32.0  # ORIGINAL pixels along the longer side
    assert click_spacing("auto", 4.0, (128, 100)) == 4.0
    assert click_spacing(5, 8.0, (300, 512)) == 5.0 and click_spacing(0.0, 8.0) == 0.0
    for bad in ("far", -1, float("nan")):
        with pytest.raises(ValueError, match="min_distance: must be 'auto' or a non-negative number"):
            click_spacing(bad, 8.0)


def test_map_policy_skips_nan_breaks_ties_in_raster_order_and_stops_when_all_is_blocked():
    scores = np.zeros((4, 5))
    scores[0, 0] = np.nan
    assert choose_by_map(scores, []) == ClickChoice(0, 1)
    every_pixel = [(r, c) for r in range(4) for c in range(5)]
    assert choose_by_map(scores, every_pixel) is None
    with pytest.raises(ValueError, match="outside"):
        choose_by_map(scores, [(4, 0)])
    with pytest.raises(ValueError, match="H x W"):
        choose_by_map(np.zeros((2, 3, 4)), [])


def test_random_policy_is_seeded_and_only_picks_allowed_pixels():
    clicks = [(10, 10), (20, 5)]
    picks = [choose_at_random((30, 30), clicks, np.random.default_rng(seed), min_distance=3) for seed in range(50)]
    blocked = blocked_pixels((30, 30), clicks, 3)
    assert not any(blocked[p.row, p.col] for p in picks)
    assert len({(p.row, p.col) for p in picks}) > 40
    assert picks[7] == choose_at_random((30, 30), clicks, np.random.default_rng(7), min_distance=3)


def test_oracle_clicks_the_centre_of_the_largest_error_region_with_its_label():
    truth = _disk((64, 80), (30, 30), 12)
    missed = choose_by_error_oracle(np.zeros_like(truth), truth, [])
    assert (missed.row, missed.col, missed.label) == (30, 30, 1)
    assert annotator_label(truth, missed) == 1
    predicted = truth.copy()
    predicted[5:25, 50:75] = True  # a covered background block larger than the missed part below
    predicted &= ~_disk(truth.shape, (30, 30), 4)
    covered = choose_by_error_oracle(predicted, truth, [])
    assert covered.label == 0 and 5 <= covered.row < 25 and 50 <= covered.col < 75
    assert ndimage.distance_transform_edt(np.pad(predicted & ~truth, 1))[1:-1, 1:-1][covered.row, covered.col] >= 9
    assert choose_by_error_oracle(truth, truth, []) is None


def test_oracle_treats_the_image_border_as_boundary_and_skips_clicked_pixels():
    truth = np.zeros((20, 40), dtype=bool)
    truth[:, :10] = True  # a strip touching three borders
    choice = choose_by_error_oracle(np.zeros_like(truth), truth, [])
    assert choice.col in (4, 5) and 4 <= choice.row <= 15  # 5 px from the border and the strip edge
    again = choose_by_error_oracle(np.zeros_like(truth), truth, [(choice.row, choice.col)])
    assert (again.row, again.col) != (choice.row, choice.col) and truth[again.row, again.col]


def test_the_variance_network_policy_reads_the_map_its_loss_ranks_errors_by():
    # The logit-noise network's log-variance is not an error score (its predictive entropy is);
    # the residual-NLL network's log-variance is. The policy follows the strategy's primary map.
    logits = torch.tensor([[[6.0, 0.5], [-0.3, -7.0]]])
    log_variance = torch.tensor([[[4.0, -2.0], [-2.0, 4.0]]])  # largest where |z| is large
    policy = CLICK_POLICIES["variance_network"]
    for loss, expected in (("mc_logit_noise", "entropy"), ("gaussian_residual_nll", "log_variance")):
        readout = variance_readout(loss)
        _, maps = read_variance(readout, logits, log_variance)
        output = StrategyOutput(torch.sigmoid(logits), maps, readout.primary_map)
        assert torch.equal(policy.map_of(output), maps[expected])
    noise_map = policy.map_of(StrategyOutput(torch.sigmoid(logits), read_variance(
        variance_readout("mc_logit_noise"), logits, log_variance)[1], "entropy"))
    assert noise_map.flatten().argmax().item() in (1, 2)  # an uncertain pixel, not a confident one
    laplace = StrategyOutput(logits, {"mutual_information": logits, "total_entropy": -logits}, "total_entropy")
    assert torch.equal(CLICK_POLICIES["bald"].map_of(laplace), logits)  # a named map, not the primary
