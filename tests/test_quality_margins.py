"""``quality.json``'s boolean checks (``PosteriorQualityAccumulator``) need a margin that means something:
a Laplace predictive equal to the MAP head, or mutual information 1.007x higher on errors, passes none."""

from __future__ import annotations

import torch

from modules.laplace.posterior import QUALITY_MARGINS, PosteriorQualityAccumulator


def _checks(laplace_prob: torch.Tensor, map_prob: torch.Tensor, targets: torch.Tensor, mi_wrong: float,
            mi_right: float) -> dict:
    wrong = (map_prob > 0.5) != (targets > 0.5)
    mutual_information = torch.where(wrong, torch.tensor(mi_wrong), torch.tensor(mi_right))
    quality = PosteriorQualityAccumulator()
    quality.update(map_prob, {"mean_prob": laplace_prob, "mutual_information": mutual_information}, targets)
    return quality.compute()


def _pixels(seed: int = 0):
    """An overconfident MAP head: p = 0.95 on the class it predicts, wrong on about 20% of the pixels."""
    generator = torch.Generator().manual_seed(seed)
    targets = (torch.rand(2, 32, 32, generator=generator) < 0.4).float()
    mistakes = torch.rand(2, 32, 32, generator=generator) < 0.2
    predicted = torch.where(mistakes, 1.0 - targets, targets)
    return torch.where(predicted > 0, 0.95, 0.05), targets


def test_a_posterior_equal_to_the_map_with_barely_higher_mi_passes_no_check():
    map_prob, targets = _pixels()
    checks = _checks(map_prob, map_prob, targets, mi_wrong=0.1007, mi_right=0.1)
    assert checks["mi_error_ratio"] > 1.0 and checks["nll_no_worse"]
    assert not checks["mi_higher_on_errors"] and not checks["ece_better"] and not checks["nll_better"]
    assert {checks[f"margin_{name}"] for name in QUALITY_MARGINS} == set(QUALITY_MARGINS.values())


def test_a_clearly_better_posterior_passes_every_check():
    map_prob, targets = _pixels()
    softened = 0.5 + (map_prob - 0.5) * 0.3 / 0.45  # 0.8 on the predicted class: calibrated
    checks = _checks(softened, map_prob, targets, mi_wrong=0.3, mi_right=0.1)
    assert checks["laplace_nll"] < checks["map_nll"] * (1 - QUALITY_MARGINS["nll_better"])
    assert checks["nll_better"] and checks["ece_better"] and checks["mi_higher_on_errors"], checks
