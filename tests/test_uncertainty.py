"""Sample statistics on hand-computed cases, the head's input packing, EvalSample checks, and every
strategy of the registry on small real components (demo SAM with random weights, tiny heads)."""

import math

import numpy as np
import pytest
import torch

from modules.training.models import PromptAwareHead, VarianceNetwork
from modules.data.promptset import PromptSpec, build_promptset_record, gaussian_prompt_maps, promptset_tensors
from modules.cache.sam_cache import CacheEntry
from modules.laplace.posterior import binary_probit_probability
from modules.sam.prompting import round_features
from modules.uncertainty.tta import build_transforms
from modules.uncertainty.strategies import (
    STRATEGIES,
    EvalSample,
    LaplaceStrategy,
    MapHeadStrategy,
    PromptPerturbationStrategy,
    RawSamStrategy,
    StrategyOutput,
    TTAStrategy,
    UncertaintyError,
    VARIANCE_READOUTS,
    VarianceNetworkStrategy,
    binary_entropy,
    binary_entropy_from_logits,
    head_inputs,
    sample_statistics,
)
from modules.core.config import ConfigError
from modules.training.losses import LOSSES
from tests.helpers.precompute_fixtures import save_random_checkpoint

LN2 = math.log(2.0)
HW = (48, 64)
CLIP = 20.0


def entropy_of(p):
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


# --------------------------------------------------------------------------- statistics


def test_sample_statistics_hand_computed_cases():
    stats = sample_statistics(torch.tensor([[0.0], [1.0]]))
    for name, expected in {"mean_prob": 0.5, "entropy": LN2, "std": 0.5, "expected_entropy": 0.0,
                           "mutual_information": LN2}.items():
        assert stats[name].item() == pytest.approx(expected, abs=1e-6), name

    stats = sample_statistics(torch.full((4, 2, 3), 0.3))
    assert torch.allclose(stats["entropy"], torch.tensor(entropy_of(0.3)))
    assert torch.allclose(stats["expected_entropy"], torch.tensor(entropy_of(0.3)))
    assert (stats["mutual_information"] == 0).all() and (stats["std"] == 0).all()
    assert stats["mean_prob"].shape == (2, 3)

    stats = sample_statistics(torch.tensor([0.2, 0.6]))
    assert stats["mean_prob"].item() == pytest.approx(0.4)
    assert stats["std"].item() == pytest.approx(0.2)
    assert stats["entropy"].item() == pytest.approx(entropy_of(0.4), abs=1e-6)
    expected_entropy = (entropy_of(0.2) + entropy_of(0.6)) / 2
    assert stats["expected_entropy"].item() == pytest.approx(expected_entropy, abs=1e-6)
    assert stats["mutual_information"].item() == pytest.approx(entropy_of(0.4) - expected_entropy, abs=1e-6)


def test_sample_statistics_are_safe_at_and_beyond_the_ends():
    stats = sample_statistics(torch.tensor([[0.0, 1.0, 1.0 + 1e-7, -1e-7]]))  # K = 1
    for values in stats.values():
        assert torch.isfinite(values).all()
    assert (stats["entropy"] == 0).all() and (stats["std"] == 0).all() and (stats["mutual_information"] == 0).all()
    with pytest.raises(ValueError, match="K >= 1"):
        sample_statistics(torch.zeros(0, 3))


def test_entropy_from_logits_matches_and_keeps_confident_pixels_resolved():
    logits = torch.linspace(-8, 8, 33)
    torch.testing.assert_close(binary_entropy_from_logits(logits), binary_entropy(torch.sigmoid(logits)),
                               atol=1e-6, rtol=1e-4)
    assert binary_entropy_from_logits(torch.tensor([0.0])).item() == pytest.approx(LN2)
    confident = binary_entropy_from_logits(torch.tensor([20.0, -20.0, 60.0]))
    assert confident[0] == confident[1] and confident[0].item() == pytest.approx(21 * math.exp(-20), rel=1e-3)
    assert 0 < confident[2] < 1e-20


# --------------------------------------------------------------------------- samples


def disc_ground_truth():
    """The ``HW`` ground truth of ``make_sample`` (its prompts are drawn from it): a disc."""
    rows, cols = np.mgrid[: HW[0], : HW[1]]
    return (rows - 24) ** 2 + (cols - 30) ** 2 < 12**2


def make_sample(safe_id="s1", seed=0, logits=None, features=None, image=None, num_sets=3, loader_calls=None):
    rng = np.random.default_rng(seed)
    mask = disc_ground_truth()
    spec = PromptSpec(min_pairs=1, max_pairs=3, prompt_seed=7, gaussian_sigma=4.0, box_jitter=0.0)
    record = build_promptset_record({"sample_id": f"group/{safe_id}", "safe_id": safe_id}, "test", mask, num_sets,
                                    spec, source={})
    if logits is None:
        logits = (rng.standard_normal((num_sets, 256, 256)) * 8).astype(np.float16)
    if features is None:
        features = {"image_embed": rng.standard_normal((256, 64, 64)).astype(np.float16)}
    entry = CacheEntry(safe_id=safe_id, split="test", features=features, logits=logits,
                       promptset_ids=np.arange(num_sets, dtype=np.int32), branch_index=np.zeros(num_sets, np.int8),
                       iou_predictions=np.zeros((num_sets, 3), np.float32), original_hw=HW, input_hw=(192, 256),
                       promptset_md5="0" * 32)
    if image is None:
        image = rng.integers(0, 256, (*HW, 3), dtype=np.uint8)

    def loader():
        if loader_calls is not None:
            loader_calls.append(safe_id)
        return image

    return EvalSample.build(safe_id, "group", entry, record, CLIP, image_loader=loader)


def test_head_inputs_pack_clipped_logits_and_prompt_maps():
    sample = make_sample()
    logits = torch.from_numpy(sample.cache_entry.logits.astype(np.float32))
    packed = head_inputs(sample.cache_entry.logits, sample.record, logit_clip=5.0)
    assert packed.shape == (3, 3, 256, 256) and packed.dtype == torch.float32
    torch.testing.assert_close(packed[:, 0], logits.clamp(-5, 5))
    assert packed[:, 0].abs().max() == 5.0 and logits.abs().max() > 5.0
    _, labels, points_256, _ = promptset_tensors(sample.record)
    torch.testing.assert_close(packed[:, 1:], gaussian_prompt_maps(points_256, labels, 4.0), atol=1e-3, rtol=0)
    x, y = (int(round(v)) for v in sample.record["promptsets"][0]["points_256"][0])
    assert packed[0, 1, y, x] > 0.9  # the first point is positive
    with pytest.raises(UncertaintyError, match="do not match 2 prompt sets"):
        head_inputs(sample.cache_entry.logits, {**sample.record, "promptsets": sample.record["promptsets"][:2]}, 5.0)


def test_eval_sample_checks_consistency_and_loads_the_image_once():
    calls = []
    sample = make_sample(loader_calls=calls)
    assert calls == [] and sample.num_promptsets == 3 and sample.original_hw == HW
    assert sample.image.shape == (*HW, 3) and sample.image.shape == (*HW, 3)
    assert calls == ["s1"]
    entry, record = sample.cache_entry, sample.record
    reordered = {**record, "promptsets": record["promptsets"][::-1]}
    with pytest.raises(UncertaintyError, match="s1: cached prompt sets"):
        EvalSample.build("s1", "g", entry, reordered, CLIP)
    with pytest.raises(UncertaintyError, match="no image_loader"):
        _ = EvalSample.build("s1", "g", entry, record, CLIP).image


def test_strategy_output_checks_its_maps():
    probability = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="primary map"):
        StrategyOutput(probability, {"entropy": probability}, "std")
    with pytest.raises(ValueError, match="shape"):
        StrategyOutput(probability, {"entropy": torch.zeros(2, 4, 5)}, "entropy")


# --------------------------------------------------------------------------- cheap strategies


def seeded_head(seed=0, **kwargs):
    torch.manual_seed(seed)
    return PromptAwareHead(hidden_channels=8, **kwargs).eval()


def test_raw_sam_and_map_head():
    sample = make_sample()
    raw = RawSamStrategy("cpu").predict(sample)
    logits = torch.from_numpy(sample.cache_entry.logits.astype(np.float32))
    torch.testing.assert_close(raw.mean_prob, torch.sigmoid(logits))
    assert raw.primary_map == "entropy" and raw.primary.shape == (3, 256, 256)
    torch.testing.assert_close(raw.primary, binary_entropy(torch.sigmoid(logits)), atol=1e-5, rtol=1e-3)

    head = seeded_head()
    output = MapHeadStrategy(head).predict(sample)
    with torch.no_grad():
        expected = torch.sigmoid(head(sample.head_inputs))[:, 0]
    torch.testing.assert_close(output.mean_prob, expected)
    assert output.primary.max() <= LN2 + 1e-6 and output.primary.min() >= 0

    head_with_embedding = seeded_head(use_image_embedding=True)
    output = MapHeadStrategy(head_with_embedding).predict(sample)
    embedding = torch.from_numpy(sample.cache_entry.features["image_embed"].astype(np.float32))[None].expand(3, -1, -1, -1)
    with torch.no_grad():
        expected = torch.sigmoid(head_with_embedding(sample.head_inputs, embedding))[:, 0]
    torch.testing.assert_close(output.mean_prob, expected)


def test_batched_head_with_image_embedding_equals_one_sample_at_a_time():
    # Each row must get its own image's embedding when the samples' rows are stacked.
    samples = [make_sample("s1", seed=0, num_sets=3), make_sample("s2", seed=1, num_sets=2)]
    head = seeded_head(use_image_embedding=True)
    batched = MapHeadStrategy(head).predict_batch(samples)
    for sample, output in zip(samples, batched):
        alone = MapHeadStrategy(head).predict(sample)
        assert output.mean_prob.shape == alone.mean_prob.shape
        assert torch.equal(output.mean_prob, alone.mean_prob)
    assert not torch.equal(batched[0].mean_prob[:2], batched[1].mean_prob)


def test_variance_network_strategy():

    sample, other = make_sample("s1", seed=0), make_sample("s2", seed=1)
    head = seeded_head()
    with torch.no_grad():
        head.final_conv.weight.mul_(20.0)  # confident logits, far from 1/2
    torch.manual_seed(1)
    variance_net = VarianceNetwork(channels_in=4, hidden_channels=8, initial_log_var=2.0).eval()
    with torch.no_grad():
        variance_net.final_conv.weight.normal_(0.0, 0.3)  # a spatially varying variance
        map_logits = head(sample.head_inputs)
        log_var = variance_net(VarianceNetwork.build_inputs(sample.head_inputs, map_logits))[:, 0]
    assert log_var.std() > 0.05

    # Logit-noise network (the mc_logit_noise loss): the closed-form predictive and its entropy.
    plain = VarianceNetworkStrategy(head, variance_net, loss="mc_logit_noise").predict(sample)
    assert plain.primary_map == "entropy" and set(plain.maps) == {"log_variance", "entropy"}
    torch.testing.assert_close(plain.maps["log_variance"], log_var)
    torch.testing.assert_close(plain.mean_prob, binary_probit_probability(map_logits[:, 0], log_var.exp()))
    torch.testing.assert_close(plain.primary, binary_entropy(plain.mean_prob), atol=1e-5, rtol=1e-4)
    assert torch.equal(plain.mean_prob > 0.5, map_logits[:, 0] > 0)  # the head's mask is kept

    # Residual-NLL network: the head's probability, and the log-variance is the error score.
    residual = VarianceNetworkStrategy(head, variance_net, loss="gaussian_residual_nll").predict(sample)
    assert residual.primary_map == "log_variance"
    torch.testing.assert_close(residual.primary, log_var)
    torch.testing.assert_close(residual.mean_prob, torch.sigmoid(map_logits)[:, 0])
    with pytest.raises(ConfigError, match="variance.loss"):
        VarianceNetworkStrategy(head, variance_net, loss="laplace")
    assert set(VARIANCE_READOUTS) == set(LOSSES)

    strategy = VarianceNetworkStrategy(head, variance_net, mc_samples=64, seed=3, loss="mc_logit_noise")
    noisy = strategy.predict(sample)
    # Logit noise pulls probabilities towards 1/2 and raises the entropy (the head's own is lower).
    confident = (residual.mean_prob - 0.5).abs() > 0.4
    assert confident.float().mean() > 0.1
    assert ((noisy.mean_prob - 0.5).abs() < (residual.mean_prob - 0.5).abs())[confident].float().mean() > 0.95
    assert noisy.maps["entropy"].mean() > residual.maps["entropy"].mean()
    # The Monte-Carlo predictive agrees with the closed form to MC and probit-approximation error.
    assert (noisy.mean_prob - plain.mean_prob).abs().mean() < 0.03
    # Seeded per sample: the order samples are processed in does not matter.
    strategy.predict(other)
    assert torch.equal(strategy.predict(sample).mean_prob, noisy.mean_prob)
    assert not torch.equal(VarianceNetworkStrategy(head, variance_net, 64, seed=4, loss="mc_logit_noise")
                           .predict(sample).mean_prob,
                           noisy.mean_prob)


def test_an_untrained_variance_network_ranks_pixels_as_the_head_entropy():
    """Untrained (constant log-variance), the logit-noise readout is a strictly increasing function of
    the head's own entropy, so it detects errors exactly as well; training can only reorder pixels."""
    sample = make_sample("s1", seed=0)
    head = seeded_head()
    with torch.no_grad():
        head.final_conv.weight.mul_(5.0)
        map_logits = head(sample.head_inputs)[:, 0]
    untrained = VarianceNetwork(channels_in=4, hidden_channels=8, initial_log_var=1.0).eval()
    output = VarianceNetworkStrategy(head, untrained, loss="mc_logit_noise").predict(sample)
    assert torch.equal(output.maps["log_variance"], torch.full_like(map_logits, output.maps["log_variance"][0, 0, 0]))
    # The head's entropy decreases with |logit|; so must the readout (up to float32 rounding near ln 2).
    order = torch.argsort(map_logits.abs().flatten())
    assert map_logits.abs().flatten().unique().numel() > 1000
    assert (output.primary.flatten().double()[order].diff() <= 1e-6).all()
    assert (output.primary > binary_entropy_from_logits(map_logits)).float().mean() > 0.99  # noise adds uncertainty


def test_laplace_strategy_with_the_real_posterior():
    from modules.laplace.head import LastLayerPosterior

    sample, other = make_sample("s1", seed=0), make_sample("s2", seed=1)
    head = seeded_head()
    mean = torch.cat([head.final_conv.weight.detach().flatten(), head.final_conv.bias.detach()])
    posterior = LastLayerPosterior(head, mean, torch.full_like(mean, 0.05), prior_precision=1.0)
    strategy = LaplaceStrategy(posterior, num_samples=16, seed=0)
    output = strategy.predict(sample)
    assert output.primary_map == "total_entropy"
    assert set(output.maps) == {"mutual_information", "total_entropy", "expected_entropy"}
    assert output.mean_prob.shape == (3, 256, 256)
    assert (output.primary >= 0).all() and output.primary.max() > 0
    assert torch.equal(output.primary, output.maps["total_entropy"])
    torch.testing.assert_close(output.maps["total_entropy"] - output.maps["expected_entropy"],
                               output.maps["mutual_information"], atol=1e-6, rtol=0)
    with torch.no_grad():
        map_prob = torch.sigmoid(head(sample.head_inputs))[:, 0]
    assert (output.mean_prob - map_prob).abs().max() < 0.1
    strategy.predict(other)
    assert torch.equal(strategy.predict(sample).primary, output.primary)
    assert not torch.equal(LaplaceStrategy(posterior, 16, seed=1).predict(sample).primary, output.primary)
    mutual_information = output.maps["mutual_information"]
    assert torch.equal(strategy.predict(sample).maps["mutual_information"], mutual_information)
    assert not torch.equal(LaplaceStrategy(posterior, 16, seed=1).predict(sample).maps["mutual_information"],
                           mutual_information)


def test_registry_names_every_strategy():
    assert set(STRATEGIES) == {"raw_sam", "map_head", "tta", "prompt_perturbation", "laplace", "variance_network"}
    assert all(cls.name == name for name, cls in STRATEGIES.items())


# --------------------------------------------------------------------------- SAM strategies (demo SAM)


@pytest.fixture(scope="module")
def demo_sample(tmp_path_factory):
    """The demo SAM (random weights) and a sample whose cache entry it produced (as stage 3 does)."""
    from modules.sam.registry import load_backbone

    path = save_random_checkpoint("sam", "demo_tiny", tmp_path_factory.mktemp("ckpt") / "demo_tiny.pt", seed=0)
    backbone = load_backbone("sam", "demo_tiny", path, "cpu")
    image = np.random.default_rng(5).integers(0, 256, (*HW, 3), dtype=np.uint8)
    probe = make_sample(image=image, num_sets=2)
    features = round_features(backbone.encode(backbone.preprocess(image)[None]))
    logits, iou = backbone.decode(features, HW, probe.points, probe.labels, None, multimask_output=True)
    chosen = logits[torch.arange(2), iou.argmax(dim=1)]
    sample = make_sample(image=image, num_sets=2, logits=chosen.to(torch.float16).numpy(),
                         features={"image_embed": features["image_embed"][0].numpy()})
    return backbone, sample


def test_sam_strategies_reproduce_the_cache_with_one_sample_and_spread_with_more(demo_sample):
    backbone, sample = demo_sample
    cached = torch.sigmoid(torch.from_numpy(sample.cache_entry.logits.astype(np.float32)))

    clean_only = TTAStrategy(backbone, build_transforms([]), "points", "best_iou", encoder_batch_size=2).predict(sample)
    torch.testing.assert_close(clean_only.mean_prob, cached, atol=2e-3, rtol=0)  # cache logits are float16
    assert (clean_only.maps["std"] == 0).all() and (clean_only.maps["mutual_information"] == 0).all()

    tta = TTAStrategy(backbone, build_transforms(["hflip"]), "points", "best_iou", encoder_batch_size=2).predict(sample)
    assert tta.primary_map == "entropy"
    assert {"entropy", "std", "mutual_information", "expected_entropy"} <= set(tta.maps)
    torch.testing.assert_close(tta.mean_prob, tta.mean_prob.clamp(0, 1))
    assert tta.maps["std"].max() > 0.01 and (tta.maps["mutual_information"] >= 0).all()

    one = PromptPerturbationStrategy(backbone, 1, "points", "best_iou").predict(sample)
    torch.testing.assert_close(one.mean_prob, cached, atol=2e-3, rtol=0)
    perturbed = PromptPerturbationStrategy(backbone, 3, "points_and_box", "best_iou", seed=0).predict(sample)
    assert perturbed.mean_prob.shape == (2, 256, 256) and perturbed.maps["std"].max() > 1e-4
