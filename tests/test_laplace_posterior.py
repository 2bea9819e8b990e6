"""Tests of the last-layer Laplace posterior on a tiny prompt-aware head and synthetic masks (CPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from laplace import Laplace
from laplace.curvature import BackPackGGN

from modules.core.config import ConfigError, load_config
from modules.core.console import filter_noisy_warnings
from modules.evaluation.methods import STRATEGY_BUILDERS
from modules.laplace import head as lh
from modules.laplace import hypernet as lhn
from modules.laplace import posterior as lp
from modules.scoring.entropy import binary_entropy, binary_entropy_from_logits
from modules.training.models import PromptAwareHead
from modules.uncertainty.strategies import derived_seed
from tests.test_uncertainty import make_sample

REPO_ROOT = Path(__file__).resolve().parents[1]
HIDDEN_CHANNELS = 4
SIZE = 12  # H = W of the synthetic samples


def make_head(seed: int = 0) -> PromptAwareHead:
    torch.manual_seed(seed)
    head = PromptAwareHead(channels_in=3, hidden_channels=HIDDEN_CHANNELS)
    with torch.no_grad():
        head.final_conv.weight.mul_(3.0)
    return head.eval()


def make_samples(head: nn.Module, count: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` samples ``(x: 3 x SIZE x SIZE, target: SIZE x SIZE)`` with targets drawn from the head itself."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, 3, SIZE, SIZE, generator=generator)
    with torch.no_grad():
        probability = torch.sigmoid(head(x))[:, 0]
    targets = (torch.rand(probability.shape, generator=generator) < probability).to(torch.uint8)
    return list(zip(x, targets))


def all_pixel_features(head: nn.Module, samples) -> torch.Tensor:
    x = torch.stack([sample[0] for sample in samples])
    return lh.pixels_as_rows(lh.head_pixel_features(head, x))


@pytest.fixture(scope="module")
def fitted():
    """A head, its train/validation samples and a Laplace fitted with BackPACK (chunks cross samples)."""
    head = make_head()
    train = make_samples(head, 5, seed=1)
    validation = make_samples(head, 4, seed=2)
    la = lh.fit_head_laplace(head, train, backend="backpack", pixels_per_chunk=50)
    return head, train, validation, la


@pytest.mark.parametrize("backend", sorted(lh.LAPLACE_BACKENDS))
def test_laplace_hessian_row1_equals_closed_form_bernoulli_ggn(backend):
    head = make_head()
    train = make_samples(head, 3, seed=1)
    la = lh.fit_head_laplace(head, train, backend=backend, pixels_per_chunk=50)  # 144 px/sample: 50+50+44

    features = all_pixel_features(head, train)
    logits = features @ head.final_conv.weight.detach().reshape(-1) + head.final_conv.bias.detach()
    diag_w, diag_b = lh.ggn_diagonal_closed_form(features, logits)
    C = HIDDEN_CHANNELS
    torch.testing.assert_close(la.H[C : 2 * C], diag_w, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(la.H[2 * C + 1], diag_b, rtol=1e-4, atol=1e-6)
    assert la.n_data == 3 * SIZE * SIZE
    assert la.state_dict()["data"] is None


def test_a_fit_shows_no_third_party_warning():
    """BackPACK warns on every fit that its backward hook fires with no input needing a gradient
    (only the last layer is fitted, so none does); ``console.NOISY_WARNINGS`` hides it."""
    head = make_head()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filter_noisy_warnings()
        lh.fit_head_laplace(head, make_samples(head, 2, seed=1), backend="backpack", pixels_per_chunk=50)
    assert [f"{w.category.__name__}: {w.message}" for w in seen] == []


def test_probit_predictive_equals_laplace_glm_probit(fitted):
    head, _, validation, la = fitted
    la.prior_precision = 0.5
    posterior = lh.LastLayerPosterior.from_laplace(head, la)
    x = torch.stack([sample[0] for sample in validation[:2]])
    predictive = posterior.predictive(x)
    assert predictive["mean_prob"].shape == (2, SIZE, SIZE)

    features = lh.pixels_as_rows(lh.head_pixel_features(head, x))
    reference = la(features, pred_type="glm", link_approx="probit")[:, 1]
    torch.testing.assert_close(predictive["mean_prob"].reshape(-1), reference, rtol=0, atol=1e-6)
    _, f_var = la._glm_predictive_distribution(features)
    torch.testing.assert_close(predictive["logit_var"].reshape(-1), f_var[:, 1, 1], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(predictive["logit_mean"], head(x)[:, 0], rtol=1e-5, atol=1e-6)


def test_prior_search_scores_every_grid_value_and_picks_the_minimum(fitted):
    head, _, validation, la = fitted
    grid = [1e-3, 1e-1, 10.0, 1e3]
    result = lh.tune_head_prior_precision(la, head, lh.iterate_in_batches(validation, 3), grid)

    assert result.grid == tuple(grid)
    assert result.num_pixels == 4 * SIZE * SIZE
    assert result.best_prior_precision == grid[min(range(len(grid)), key=result.nll.__getitem__)]
    assert float(la.prior_precision.item()) == result.best_prior_precision
    assert len(set(result.nll)) == len(grid)  # the prior changes the predictive

    features = all_pixel_features(head, validation)
    targets = torch.stack([target for _, target in validation]).reshape(-1)
    for value, nll in zip(grid, result.nll):
        la.prior_precision = value
        probability = la(features, pred_type="glm", link_approx="probit")[:, 1].clamp(1e-6, 1 - 1e-6)
        expected = -(targets * probability.log() + (1 - targets) * (1 - probability).log()).mean()
        assert nll == pytest.approx(float(expected), rel=1e-5)
    la.prior_precision = result.best_prior_precision


def test_prior_search_nll_is_finite_for_saturated_probabilities():
    head = make_head()
    with torch.no_grad():
        head.final_conv.weight.fill_(500.0)
        head.final_conv.bias.fill_(500.0)
    samples = make_samples(head, 2, seed=3)
    wrong = [(x, 1 - target) for x, target in samples]  # every pixel confidently wrong
    la = lh.fit_head_laplace(head, samples)
    posterior = lh.LastLayerPosterior.from_laplace(head, la)
    assert bool((posterior.predictive(torch.stack([x for x, _ in wrong]))["mean_prob"] == 1.0).any())

    result = lh.tune_head_prior_precision(
        la, head, lh.iterate_in_batches(wrong, 2), [1.0, 100.0], nll_eps=1e-6
    )
    assert all(math.isfinite(value) for value in result.nll)
    assert max(result.nll) <= -math.log(1e-6) + 1e-3


def bowl_search(best_log_temperature: float, best_log_prior: float, calls: list):
    """``search_at`` of a validation NLL that is a bowl in (log10 temperature, log10 prior precision)."""

    def search_at(temperature, priors):
        calls.append((temperature, priors))
        nll = tuple((math.log10(temperature) - best_log_temperature) ** 2 + (math.log10(p) - best_log_prior) ** 2
                    for p in priors)
        return lp.PriorSearchResult(tuple(priors), nll, priors[nll.index(min(nll))], 100)

    return search_at


def test_grids_widen_until_the_best_pair_is_inside_both():
    calls = []
    outcome = lp.search_inside_grids(bowl_search(5.0, -5.0, calls), [1.0, 10.0, 100.0, 1000.0], [1e-3, 1e-2, 0.1])
    assert outcome.temperature == pytest.approx(1e5) and outcome.search.best_prior_precision == pytest.approx(1e-5)
    assert outcome.temperature_grid[-1] == pytest.approx(1e6) and outcome.prior_precision_grid[0] == pytest.approx(1e-6)
    assert not outcome.on_edge
    assert len(outcome.table) == len(outcome.temperature_grid) * len(outcome.prior_precision_grid)
    inside = []
    unchanged = lp.search_inside_grids(bowl_search(1.0, -2.0, inside), [1.0, 10.0, 100.0], [1e-3, 1e-2, 0.1])
    assert unchanged.temperature_grid == (1.0, 10.0, 100.0) and len(inside) == 3  # one pass per temperature
    assert unchanged.prior_precision_grid[0] == pytest.approx(1e-6) and unchanged.prior_precision_grid[-1] == 100.0
    beyond = lp.search_inside_grids(bowl_search(9.0, 0.0, []), [1.0, 10.0], [0.1, 1.0, 10.0], max_widenings=3)
    assert beyond.on_edge and beyond.temperature == pytest.approx(1e4)  # three decades past 10, then it stops
    too_strong = lp.search_inside_grids(bowl_search(1.0, 8.0, []), [1.0, 10.0, 100.0], [0.1, 1.0, 10.0])
    assert too_strong.on_edge and too_strong.search.best_prior_precision == pytest.approx(1e4)


def test_prior_log_evidence_is_laplace_torchs_marglik_of_the_bernoulli_row(fitted):
    head, _, _, la = fitted
    channels = head.final_conv.in_channels
    row0 = torch.cat([torch.arange(channels), torch.tensor([2 * channels])])
    priors, temperature = (0.01, 1.0, 30.0, 1e3), 50.0
    ours = lh.head_prior_log_evidence(la, head, temperature, priors)
    # laplace-torch scores both rows of the 2-logit layer; row 0 (all zeros) adds only its log-determinant
    row0_terms = lp.prior_log_evidence(torch.zeros(channels + 1), la.H[row0], priors, temperature)
    shared = (la.temperature, la.prior_precision.clone())  # the module fixture's: restored below
    la.temperature = temperature
    theirs = [float(la.log_marginal_likelihood(prior_precision=torch.tensor(p)) - la.log_likelihood) for p in priors]
    la.temperature, la.prior_precision = shared
    assert [a + b for a, b in zip(ours, row0_terms)] == pytest.approx(theirs, rel=1e-5)
    # the maximiser of a fine grid solves MacKay's fixed point lambda |theta|^2 = sum h / (h + lambda)
    fine = tuple(10 ** (k / 200) for k in range(-600, 801))
    evidence = lh.head_prior_log_evidence(la, head, temperature, fine)
    best = fine[evidence.index(max(evidence))]
    row1 = lh.bernoulli_row(head, la)
    curvature = la.H[row1].double() / temperature
    effective = float((curvature / (curvature + best)).sum())
    assert best * float(la.mean[row1].double().square().sum()) == pytest.approx(effective, rel=0.03)


def ridge_search(curvature: float, best_precision: float):
    """``search_at`` of a validation NLL that depends on the posterior precision ``curvature / T + prior``
    only (the ridge of the identity head): best where that precision is ``best_precision``."""

    def search_at(temperature, priors):
        nll = tuple((math.log10(curvature / temperature + p) - math.log10(best_precision)) ** 2 for p in priors)
        return lp.PriorSearchResult(tuple(priors), nll, priors[nll.index(min(nll))], 100)

    return search_at


def test_marglik_prior_lies_inside_the_grid_where_validation_nll_runs_to_its_end(caplog):
    weights, curvature = torch.tensor([0.0, 1.0, 0.0, 0.0]), 1e6
    temperatures, priors = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6], [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3]
    with caplog.at_level("WARNING", logger="pipeline.laplace"):
        by_nll = lp.search_inside_grids(ridge_search(curvature, 100.0), temperatures, priors, max_widenings=0)
    assert by_nll.search.best_prior_precision == 1e-3 and not by_nll.prior_precision_interior and by_nll.on_edge
    assert "prior precision (temperature" in caplog.text and "lies on an end" in caplog.text
    caplog.clear()
    assert by_nll.prior_selection == "val_nll"

    def evidence_at(temperature, grid):
        return lp.prior_log_evidence(weights, torch.full((4,), curvature), grid, temperature)

    by_evidence = lp.search_inside_grids(ridge_search(curvature, 100.0), temperatures, priors, max_widenings=0,
                                         evidence_at=evidence_at)
    # MacKay: lambda |theta|^2 ~ 4 effective weights, so 1 or 10 on a decade grid; then T ~ 1e6 / 100
    assert by_evidence.search.best_prior_precision in (1.0, 10.0) and by_evidence.temperature == 1e4
    assert by_evidence.temperature_interior and by_evidence.prior_precision_interior and not by_evidence.on_edge
    assert by_evidence.prior_selection == "marglik" and "log_evidence" in by_evidence.table[0]
    assert "lies on an end" not in caplog.text
    with pytest.raises(lp.LaplacePosteriorError, match="laplace.prior_selection"):
        lp.check_prior_selection("evidence")


def test_smaller_prior_precision_gives_larger_logit_variance(fitted):
    head, _, validation, la = fitted
    x = torch.stack([validation[0][0]])
    la.prior_precision = 1e-4
    loose = lh.LastLayerPosterior.from_laplace(head, la).predictive(x)["logit_var"]
    la.prior_precision = 1e4
    tight = lh.LastLayerPosterior.from_laplace(head, la).predictive(x)["logit_var"]
    assert bool((loose > tight).all())


def test_sample_moments_match_closed_form(fitted):
    head, _, validation, la = fitted
    la.prior_precision = 1.0
    posterior = lh.LastLayerPosterior.from_laplace(head, la)
    x = torch.stack([validation[0][0]])
    num_samples = 4000
    samples = posterior.sample_logits(x, num_samples, seed=11)
    assert samples.shape == (num_samples, 1, SIZE, SIZE)

    predictive = posterior.predictive(x)
    z_score = (samples.mean(0) - predictive["logit_mean"]) / (predictive["logit_var"] / num_samples).sqrt()
    assert float(z_score.abs().max()) < 5.0
    variance_ratio = samples.var(0) / predictive["logit_var"]
    assert float((variance_ratio - 1).abs().max()) < 0.12


def test_sample_moments_match_laplace_row1_samples(fitted):
    """Our row-1 draws have the variance of laplace-torch's ``la.sample`` row 1 (not of z1 - z0)."""
    head, _, _, la = fitted
    la.prior_precision = 1.0
    C = HIDDEN_CHANNELS
    reference = la.sample(20000, generator=torch.Generator().manual_seed(0))
    reference_row1 = torch.cat([reference[:, C : 2 * C], reference[:, 2 * C + 1 :]], dim=1)
    ours = lh.LastLayerPosterior.from_laplace(head, la).sample_weights(20000, seed=0)
    torch.testing.assert_close(ours.var(0), reference_row1.var(0), rtol=0.06, atol=0)
    torch.testing.assert_close(
        ours.mean(0), reference_row1.mean(0), rtol=0, atol=0.05 * float(ours.std(0).max())
    )


def test_sampling_is_seeded(fitted):
    head, _, validation, la = fitted
    posterior = lh.LastLayerPosterior.from_laplace(head, la)
    x = torch.stack([validation[0][0], validation[1][0]])
    first = posterior.sample_logits(x, 8, seed=5)
    assert torch.equal(first, posterior.sample_logits(x, 8, seed=5))
    assert torch.equal(first, posterior.sample_logits(x, 8, generator=torch.Generator().manual_seed(5)))
    assert not torch.allclose(first, posterior.sample_logits(x, 8, seed=6))
    with pytest.raises(lp.LaplacePosteriorError, match="laplace.seed"):
        posterior.sample_logits(x, 8, seed=5, generator=torch.Generator())
    with pytest.raises(lp.LaplacePosteriorError, match="laplace.num_samples"):
        posterior.sample_logits(x, 0, seed=5)


def test_uncertainty_maps_decompose_total_entropy(fitted):
    head, _, validation, la = fitted
    la.prior_precision = 1e-2  # wide posterior: clearly non-zero epistemic part
    posterior = lh.LastLayerPosterior.from_laplace(head, la)
    x = torch.stack([validation[0][0], validation[1][0]])
    maps = posterior.uncertainty_maps(x, 64, seed=3, samples_per_chunk=10)
    assert set(maps) == {"mean_prob", "total_entropy", "expected_entropy", "mutual_information"}
    assert all(value.shape == (2, SIZE, SIZE) for value in maps.values())
    assert bool((maps["mutual_information"] >= 0).all())
    assert float(maps["mutual_information"].max()) > 1e-3
    torch.testing.assert_close(
        maps["total_entropy"], maps["expected_entropy"] + maps["mutual_information"], rtol=0, atol=1e-6
    )
    assert float(maps["total_entropy"].max()) <= math.log(2) + 1e-6
    torch.testing.assert_close(maps["mean_prob"], posterior.predictive(x)["mean_prob"])

    # Same draws as sample_logits, evaluated chunk-wise.
    probability = torch.sigmoid(posterior.sample_logits(x, 64, seed=3))
    torch.testing.assert_close(
        maps["total_entropy"], binary_entropy(probability.mean(0)), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        maps["expected_entropy"], binary_entropy(probability).mean(0), rtol=0, atol=1e-5
    )


def _mutual_information_float64(posterior, x, num_samples, seed):
    """BALD computed the direct way, ``H(mean p) - mean H(p)``, entirely in float64."""
    features = posterior.prepare(x).double()
    weights = posterior.sample_weights(num_samples, seed=seed).double()
    logits = torch.einsum("sc,bchw->sbhw", weights[:, :-1], features) + weights[:, -1, None, None, None]
    probability = torch.sigmoid(logits)
    return binary_entropy(probability.mean(0)) - binary_entropy(probability).mean(0)


@pytest.mark.parametrize("variance_scale", [1.0, 1e-4, 1e-8])
def test_mutual_information_is_accurate_for_tight_posteriors(fitted, variance_scale):
    """A posterior fitted on many pixels moves logits by ~1e-3 or less; its mutual information
    (~1e-6 nats and below) must still be the float64 value, not float32 rounding noise."""
    head, _, validation, la = fitted
    la.prior_precision = 1e-2
    posterior = lh.LastLayerPosterior.from_laplace(head, la)
    posterior.weight_variance = posterior.weight_variance * variance_scale
    x = torch.stack([validation[0][0], validation[1][0]])
    maps = posterior.uncertainty_maps(x, 32, seed=4, samples_per_chunk=7)
    reference = _mutual_information_float64(posterior, x, 32, seed=4)
    assert float(reference.max()) > 0
    # where the reference is not itself at float64 rounding noise (~1e-16 nats)
    big = reference > max(float(reference.max()) * 1e-3, 1e-13)
    torch.testing.assert_close(maps["mutual_information"][big].double(), reference[big], rtol=2e-3, atol=0)
    # the ordering of pixels (what AUROC and sparsification use) is the float64 one
    ranks = torch.stack([maps["mutual_information"][big].double(), reference[big]]).argsort(dim=1).argsort(dim=1)
    assert float(torch.corrcoef(ranks.double())[0, 1]) > 0.999


def test_binary_entropy_from_logits_keeps_float64():
    logits = torch.tensor([-30.0, -1e-3, 0.0, 2.0, 40.0], dtype=torch.float64)
    entropy = binary_entropy_from_logits(logits)
    assert entropy.dtype == torch.float64
    probability = torch.sigmoid(logits)
    torch.testing.assert_close(entropy[1:4], binary_entropy(probability)[1:4], rtol=1e-14, atol=0)
    assert binary_entropy_from_logits(logits.half()).dtype == torch.float32


ROUND_TRIP_SCRIPT = textwrap.dedent("""
    import sys, torch
    from modules.laplace import head as lh
    from modules.training.models import PromptAwareHead
    run_dir, head_path, inputs_path, out_path = sys.argv[1:5]
    head = PromptAwareHead(channels_in=3, hidden_channels={channels})
    head.load_state_dict(torch.load(head_path, weights_only=True))
    posterior = lh.load_posterior(run_dir, head, "cpu")
    x = torch.load(inputs_path, weights_only=True)
    outputs = {{f"predictive/{{k}}": v for k, v in posterior.predictive(x).items()}}
    outputs.update({{f"maps/{{k}}": v for k, v in posterior.uncertainty_maps(x, 16, seed=7).items()}})
    outputs["samples"] = posterior.sample_logits(x, 6, seed=7)
    torch.save(outputs, out_path)
    """).format(channels=HIDDEN_CHANNELS)


def posterior_outputs(posterior: lh.LastLayerPosterior, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs = {f"predictive/{k}": v for k, v in posterior.predictive(x).items()}
    outputs.update({f"maps/{k}": v for k, v in posterior.uncertainty_maps(x, 16, seed=7).items()})
    outputs["samples"] = posterior.sample_logits(x, 6, seed=7)
    return outputs


def test_save_and_reload_in_a_fresh_process_is_bit_identical(tmp_path):
    head = make_head(seed=4)
    train = make_samples(head, 3, seed=5)
    validation = make_samples(head, 2, seed=6)
    la = lh.fit_head_laplace(head, train)
    search = lh.tune_head_prior_precision(la, head, lh.iterate_in_batches(validation, 2), [1e-2, 1.0, 100.0])
    head_path = tmp_path / "head.pt"
    torch.save(head.state_dict(), head_path)
    from modules.core.fileio import file_md5

    meta = lp.PosteriorMeta.for_head(la, "backpack", search, file_md5(head_path))
    run_dir = tmp_path / "laplace"
    config = {"backend": "backpack", "prior_precision_grid": [1e-2, 1.0, 100.0], "num_samples": 16, "seed": 7}
    lh.save_posterior(run_dir, la, meta, config)

    assert sorted(path.name for path in run_dir.iterdir()) == sorted(
        [lp.STATE_FILE, lp.CONFIG_FILE, lp.META_FILE]
    )
    state = torch.load(run_dir / lp.STATE_FILE, weights_only=True)
    assert state["data"] is None and state["_last_layer_name"] == lh.LAST_LAYER_NAME
    assert yaml.safe_load((run_dir / lp.CONFIG_FILE).read_text()) == config
    saved_meta = json.loads((run_dir / lp.META_FILE).read_text())
    assert saved_meta["n_data"] == 3 * SIZE * SIZE
    assert saved_meta["num_parameters"] == 2 * HIDDEN_CHANNELS + 2
    assert saved_meta["prior_precision"] == search.best_prior_precision
    assert saved_meta["prior_precision_nll"] == list(search.nll)
    assert saved_meta["source_checkpoint_md5"] == file_md5(head_path)
    assert set(saved_meta["library_versions"]) == {"torch", "laplace-torch"}

    x = torch.stack([sample[0] for sample in validation])
    inputs_path, out_path = tmp_path / "x.pt", tmp_path / "reloaded.pt"
    torch.save(x, inputs_path)
    expected = posterior_outputs(lh.LastLayerPosterior.from_laplace(head, la), x)
    subprocess.run(
        [
            sys.executable,
            "-c",
            ROUND_TRIP_SCRIPT,
            str(run_dir),
            str(head_path),
            str(inputs_path),
            str(out_path),
        ],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    reloaded = torch.load(out_path, weights_only=True)
    assert reloaded.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(reloaded[key], value), key


def test_load_rejects_another_checkpoint_and_missing_files(tmp_path, fitted):
    head, _, _, la = fitted
    lh.save_posterior(
        tmp_path,
        la,
        lp.PosteriorMeta.for_head(la, "backpack", lp.PriorSearchResult((1.0,), (0.5,), 1.0, 1), "md5"),
        {},
    )
    with pytest.raises(lp.LaplacePosteriorError, match="another checkpoint"):
        lh.load_posterior(tmp_path, make_head(seed=9), "cpu")
    with pytest.raises(lp.LaplacePosteriorError, match="posterior_meta.json: missing"):
        lh.load_posterior(tmp_path / "absent", head, "cpu")
    (tmp_path / lp.STATE_FILE).write_bytes(b"not a torch file")
    with pytest.raises(lp.LaplacePosteriorError, match="laplace_state.pt: unreadable"):
        lh.load_posterior(tmp_path, head, "cpu")


def test_target_layer_must_name_the_heads_final_layer():
    lh.check_target_layer("final_conv")
    with pytest.raises(lp.LaplacePosteriorError, match="laplace.target_layer: 'conv2' is not the head's final layer"):
        lh.check_target_layer("conv2")


def test_bad_configuration_and_inputs_raise_one_line_errors(fitted):
    head, train, validation, la = fitted
    with pytest.raises(lp.LaplacePosteriorError, match="laplace.backend"):
        lh.build_head_laplace(head, backend="kfac")
    with pytest.raises(lp.LaplacePosteriorError, match="laplace.target_layer"):
        lh.build_head_laplace(nn.Sequential(nn.Conv2d(3, 2, 1)))
    with pytest.raises(lp.LaplacePosteriorError, match="laplace.prior_precision_grid"):
        lh.tune_head_prior_precision(la, head, lh.iterate_in_batches(validation, 2), [])
    soft = [(x, target.float() * 0.7) for x, target in train]
    with pytest.raises(lp.LaplacePosteriorError, match="training sample 0: target must be a binary"):
        lh.fit_head_laplace(head, soft)
    la.prior_precision = 1.0


# --------------------------------------------------------------------------- SAM decoder hypernetwork target


def hypernet_case(seed: int = 0, prompts: int = 2, channels: int = 3, token_dim: int = 5, size: int = 4):
    generator = torch.Generator().manual_seed(seed)
    upscaled = torch.randn(prompts, channels, size, size, generator=generator)
    tokens = torch.randn(prompts, token_dim, generator=generator)
    weight = torch.randn(channels, token_dim, generator=generator) * 0.5
    bias = torch.randn(channels, generator=generator) * 0.5
    logits = torch.einsum("pkhw,pk->phw", upscaled, tokens @ weight.T + bias)
    return upscaled, tokens, weight, bias, logits


def hypernet_pixel_features(upscaled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Brute force: per pixel ``[vec(outer(u, h)), u]``, ``(P*H*W) x (K*J + K)``."""
    rows = []
    for p in range(upscaled.shape[0]):
        for i in range(upscaled.shape[2]):
            for j in range(upscaled.shape[3]):
                u = upscaled[p, :, i, j]
                rows.append(torch.cat([torch.outer(u, tokens[p]).reshape(-1), u]))
    return torch.stack(rows)


def test_hypernet_ggn_factorised_equals_brute_force():
    upscaled, tokens, weight, bias, logits = hypernet_case()
    diag_weight, diag_bias = lhn.hypernet_ggn_diagonal(upscaled, tokens, logits)
    features = hypernet_pixel_features(upscaled, tokens)
    brute_force, _ = lh.ggn_diagonal_closed_form(features, logits.reshape(-1))
    K, J = weight.shape
    torch.testing.assert_close(diag_weight, brute_force[: K * J].reshape(K, J), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(diag_bias, brute_force[K * J :], rtol=1e-5, atol=1e-7)

    accumulated_weight, accumulated_bias, n_pixels = lhn.hypernet_ggn_from_batches(
        weight,
        bias,
        [lhn.HypernetInputs(upscaled[:1], tokens[:1]), lhn.HypernetInputs(upscaled[1:], tokens[1:])],
    )
    torch.testing.assert_close(accumulated_weight, diag_weight)
    torch.testing.assert_close(accumulated_bias, diag_bias)
    assert n_pixels == logits.numel()


def test_hypernet_posterior_matches_laplace_torch_on_explicit_features():
    upscaled, tokens, weight, bias, logits = hypernet_case(seed=1)
    K, J = weight.shape
    features = hypernet_pixel_features(upscaled, tokens)
    linear = nn.Linear(K * J + K, 2, bias=False)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[1] = torch.cat([weight.reshape(-1), bias])
    targets = (
        torch.rand(logits.numel(), generator=torch.Generator().manual_seed(2))
        < torch.sigmoid(logits.reshape(-1))
    ).long()
    la = Laplace(
        nn.Sequential(linear),
        "classification",
        subset_of_weights="last_layer",
        hessian_structure="diag",
        last_layer_name="0",
        backend=BackPackGGN,
        prior_precision=0.3,
    )
    la.fit(DataLoader(TensorDataset(features, targets), batch_size=10))

    diag_weight, diag_bias = lhn.hypernet_ggn_diagonal(upscaled, tokens, logits)
    D = K * J + K
    torch.testing.assert_close(
        la.H[D:], torch.cat([diag_weight.reshape(-1), diag_bias]), rtol=1e-4, atol=1e-6
    )

    posterior = lhn.HypernetPosterior.from_ggn(weight, bias, diag_weight, diag_bias, prior_precision=0.3)
    predictive = posterior.predictive(lhn.HypernetInputs(upscaled, tokens))
    reference = la(features, pred_type="glm", link_approx="probit")[:, 1]
    torch.testing.assert_close(predictive["mean_prob"].reshape(-1), reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(predictive["logit_mean"], logits, rtol=1e-5, atol=1e-6)
    brute_force_var = features.square() @ posterior.weight_variance
    torch.testing.assert_close(predictive["logit_var"].reshape(-1), brute_force_var, rtol=1e-5, atol=1e-7)


def test_hypernet_samples_are_seeded_coherent_and_match_moments():
    upscaled, tokens, weight, bias, logits = hypernet_case(seed=3)
    diag_weight, diag_bias = lhn.hypernet_ggn_diagonal(upscaled, tokens, logits)
    posterior = lhn.HypernetPosterior.from_ggn(weight, bias, diag_weight, diag_bias, prior_precision=1.0)
    inputs = lhn.HypernetInputs(upscaled, tokens)
    samples = posterior.sample_logits(inputs, 4000, seed=1)
    assert samples.shape == (4000, *logits.shape)
    assert torch.equal(samples, posterior.sample_logits(inputs, 4000, seed=1))

    # Each sample is one weight draw applied to every pixel: recompute sample 0 by hand.
    drawn = posterior.sample_weights(4000, seed=1)[0]
    K, J = weight.shape
    hyper = tokens @ drawn[: K * J].reshape(K, J).T + drawn[K * J :]
    torch.testing.assert_close(samples[0], torch.einsum("pkhw,pk->phw", upscaled, hyper))

    predictive = posterior.predictive(inputs)
    z_score = (samples.mean(0) - predictive["logit_mean"]) / (predictive["logit_var"] / 4000).sqrt()
    assert float(z_score.abs().max()) < 5.0
    assert float((samples.var(0) / predictive["logit_var"] - 1).abs().max()) < 0.12
    maps = posterior.uncertainty_maps(inputs, 32, seed=2)
    assert bool((maps["mutual_information"] >= 0).all())

    restored = lhn.HypernetPosterior.from_state_dict(posterior.state_dict())
    assert torch.equal(restored.sample_logits(inputs, 3, seed=4), posterior.sample_logits(inputs, 3, seed=4))


# --------------------------------------------------------------------------- closed-form predictive


def test_probit_probability_on_known_values():
    mean = torch.tensor([0.0, 2.0, -3.0, 1.5])
    variance = torch.tensor([5.0, 0.0, 8.0 / math.pi, 3.0 * 8.0 / math.pi])
    probability = lp.binary_probit_probability(mean, variance)
    expected = torch.sigmoid(torch.tensor([0.0, 2.0, -3.0 / math.sqrt(2.0), 1.5 / 2.0]))
    torch.testing.assert_close(probability, expected, rtol=0, atol=1e-7)
    # ... and it approximates E[sigmoid(z)], z ~ N(mean, variance), to about 0.02
    draws = mean.double() + variance.double().sqrt() * torch.randn(200_000, 4, generator=torch.Generator().manual_seed(0),
                                                                    dtype=torch.float64)
    assert float((torch.sigmoid(draws).mean(0) - probability.double()).abs().max()) < 0.02


def _monte_carlo_entropies(mean: torch.Tensor, variance: torch.Tensor, num_samples: int) -> dict[str, torch.Tensor]:
    """Reference per-pixel Monte Carlo in float64 (each pixel's logit is exactly Gaussian)."""
    generator = torch.Generator().manual_seed(0)
    logits = mean.double() + variance.double().sqrt() * torch.randn(num_samples, *mean.shape, generator=generator,
                                                                    dtype=torch.float64)
    total = binary_entropy(torch.sigmoid(logits).mean(0))
    expected = binary_entropy_from_logits(logits).mean(0)
    return {"total_entropy": total, "expected_entropy": expected, "mutual_information": total - expected}


def test_closed_form_entropies_exact_limits_and_agreement_with_monte_carlo():
    mean = torch.linspace(-8.0, 8.0, 17)
    # no posterior spread: no epistemic part, total = aleatoric = the entropy of sigmoid(mean)
    at_map = lp.closed_form_entropies(mean, torch.zeros_like(mean))
    assert torch.equal(at_map["mutual_information"], torch.zeros_like(mean))
    torch.testing.assert_close(at_map["total_entropy"], binary_entropy_from_logits(mean), rtol=1e-6, atol=0)
    torch.testing.assert_close(at_map["expected_entropy"], at_map["total_entropy"], rtol=0, atol=0)
    # mean 0, tiny variance: BALD = v / 8 nats (second-order expansion), kept at float32 precision
    tiny = torch.tensor([1e-8, 1e-6, 1e-4])
    at_zero = lp.closed_form_entropies(torch.zeros(3), tiny)["mutual_information"]
    torch.testing.assert_close(at_zero, tiny / 8.0, rtol=2e-3, atol=0)

    for variance in (1e-4, 1e-2, 0.1, 1.0):
        closed = lp.closed_form_entropies(mean, torch.full_like(mean, variance))
        sampled = _monte_carlo_entropies(mean, torch.full_like(mean, variance), 200_000)
        for name in ("total_entropy", "expected_entropy"):
            assert float((closed[name].double() - sampled[name]).abs().max()) < 0.02 * max(1.0, variance), name
        information = closed["mutual_information"].double()
        reference = sampled["mutual_information"]
        assert bool((information >= 0).all())
        assert float((information - reference).abs().max()) < 0.2 * float(reference.max())
        central = mean.abs() <= 2.0  # Houlsby's Gaussian tails undershoot BALD at |mean| >> 1
        assert float(((information - reference) / reference)[central].abs().max()) < 0.35
        # both peak at mean 0 and fall with |mean|
        assert int(information.argmax()) == int(reference.argmax()) == 8


def test_closed_form_maps_agree_with_large_sample_monte_carlo(fitted):
    head, _, validation, la = fitted
    la.prior_precision = 1e-2  # wide posterior: clearly non-zero epistemic part
    posterior = lh.LastLayerPosterior.from_laplace(head, la)
    x = torch.stack([sample[0] for sample in validation])
    closed = posterior.closed_form_maps(x)
    sampled = posterior.uncertainty_maps(x, 2048, seed=0, samples_per_chunk=512)
    assert set(closed) == set(sampled)
    assert all(value.shape == (4, SIZE, SIZE) and value.dtype == torch.float32 for value in closed.values())
    assert torch.equal(closed["mean_prob"], sampled["mean_prob"])
    torch.testing.assert_close(closed["total_entropy"], closed["expected_entropy"] + closed["mutual_information"],
                               rtol=0, atol=1e-6)
    for name in ("total_entropy", "expected_entropy"):
        torch.testing.assert_close(closed[name], sampled[name], rtol=0, atol=0.01)
    information, reference = closed["mutual_information"].double(), sampled["mutual_information"].double()
    assert float(reference.min()) > 5e-4
    assert float(((information - reference).abs() / reference).mean()) < 0.05
    ranks = torch.stack([information.flatten(), reference.flatten()]).argsort(dim=1).argsort(dim=1)
    assert float(torch.corrcoef(ranks.double())[0, 1]) > 0.95
    # predictive="closed_form" ignores the sample count and seed; "mc" is uncertainty_maps
    assert all(torch.equal(closed[name], value)
               for name, value in posterior.maps(x, "closed_form", 1, seed=123).items())
    few = posterior.uncertainty_maps(x, 4, seed=0)
    assert all(torch.equal(few[name], value) for name, value in
               posterior.maps(x, "mc", 4, generator=torch.Generator().manual_seed(0)).items())
    with pytest.raises(lp.LaplacePosteriorError, match="laplace.predictive"):
        posterior.maps(x, "quadrature", 8, seed=0)


def test_hypernet_closed_form_maps_agree_with_monte_carlo():
    """The decoder target's logit variance is a diagonal quadratic form too: the closed form applies."""
    upscaled, tokens, weight, bias, logits = hypernet_case(seed=5, size=6)
    diag_weight, diag_bias = lhn.hypernet_ggn_diagonal(upscaled, tokens, logits)
    posterior = lhn.HypernetPosterior.from_ggn(weight, bias, diag_weight, diag_bias, prior_precision=1.0)
    inputs = lhn.HypernetInputs(upscaled, tokens)
    closed = posterior.closed_form_maps(inputs)
    sampled = posterior.uncertainty_maps(inputs, 4096, seed=1, samples_per_chunk=512)
    for name in ("total_entropy", "expected_entropy"):
        torch.testing.assert_close(closed[name], sampled[name], rtol=0, atol=0.03)
    information, reference = closed["mutual_information"].double(), sampled["mutual_information"].double()
    assert float((information - reference).abs().max()) < 0.1 * float(reference.max())
    ranks = torch.stack([information.flatten(), reference.flatten()]).argsort(dim=1).argsort(dim=1)
    assert float(torch.corrcoef(ranks.double())[0, 1]) > 0.9


def test_laplace_predictive_setting_reaches_the_evaluation_maps():
    head = make_head(seed=3)
    mean = torch.cat([head.final_conv.weight.detach().flatten(), head.final_conv.bias.detach()])
    posterior = lh.LastLayerPosterior(head, mean, torch.full_like(mean, 0.05), prior_precision=1.0)
    sample = make_sample("s1", seed=0, num_sets=2)
    inputs = lh.HeadInputs(sample.head_inputs)
    outputs = {}
    for predictive in lp.PREDICTIVES:
        cfg = load_config(None, [f"laplace.predictive={predictive}", "laplace.num_samples=8", "laplace.seed=5"])
        strategy = STRATEGY_BUILDERS["laplace"].build(cfg, SimpleNamespace(posterior=posterior))
        outputs[predictive] = strategy.predict(sample)
    closed = posterior.closed_form_maps(inputs)
    sampled = posterior.uncertainty_maps(inputs, 8, seed=derived_seed(5, sample.sample_key))
    for predictive, expected in (("closed_form", closed), ("mc", sampled)):
        output = outputs[predictive]
        assert torch.equal(output.mean_prob, expected["mean_prob"])
        assert all(torch.equal(output.maps[name], expected[name]) for name in output.maps)
    assert not torch.equal(outputs["mc"].maps["mutual_information"], outputs["closed_form"].maps["mutual_information"])
    with pytest.raises(ConfigError, match="laplace.predictive"):
        load_config(None, ["laplace.predictive=exact"])
