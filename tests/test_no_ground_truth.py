"""No method but a named oracle reads the ground truth.

One sample goes through the evaluation's ``Predictor`` in-process (every strategy, the refinement
and its ablations; then the other Laplace target and prompt-perturbation label source), on the demo
SAM with random weights and small random models, three times: with its ground truth as is, inverted
and random. Every non-oracle method must give bit-identical probability and uncertainty maps; the
oracle ablations must change (else the test could not fail) and so must the scores (the replaced
ground truth does reach the metrics).
"""

import typing
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from modules.core.config import ConfigError, PromptPerturbationConfig, load_config
from modules.evaluation import methods, reports
from modules.evaluation.methods import ORACLE_BUILDERS, ORACLE_METHODS, Predictor, method_names, needed_artifacts
from modules.evaluation.samples import LabelledSample
from modules.evaluation.scoreboard import Scoreboard
from modules.laplace.decoder import DecoderPosterior, decode_chosen_outputs, final_layer_means
from modules.laplace.head import LastLayerPosterior
from modules.laplace.hypernet import HypernetPosterior
from modules.sam.prompting import PROMPT_MODES, decode_selected, round_features
from modules.sam.registry import load_backbone
from modules.stages.evaluate_uncertainty import fingerprint_sections
from modules.training.models import UncertaintyFusion, VarianceNetwork
from modules.scoring.entropy import binary_entropy
from modules.uncertainty.fusion import RefinementSwitch
from modules.uncertainty.prompt_perturbation import LABEL_SOURCES
from modules.uncertainty.strategies import (ORACLE_STRATEGIES, PromptPerturbationStrategy, StrategyOutput,
                                            UncertaintyError)
from tests.helpers.precompute_fixtures import save_random_checkpoint
from tests.stage_runner import REPO
from tests.test_uncertainty import HW, disc_ground_truth, make_sample, seeded_head

PROMPT_MODE = "points_and_box"
MULTIMASK_POLICY = "best_iou"
EVERY_STRATEGY = "[raw_sam, map_head, tta, prompt_perturbation, laplace, variance_network, prompt_perturbation_oracle]"


def config(*overrides: str):
    """The shipped config with tiny sample counts, every strategy and the prompt-perturbation oracle."""
    return load_config(REPO / "config.yaml", [
        f"evaluation.strategies={EVERY_STRATEGY}", "evaluation.refinement=true",
        "evaluation.tta.transforms=[hflip]", "evaluation.prompt_perturbation.num_samples=3",
        "evaluation.variance_mc_samples=4", "laplace.num_samples=4", f"sam.prompt_mode={PROMPT_MODE}",
        f"sam.multimask_policy={MULTIMASK_POLICY}", "training.device=cpu", *overrides])


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """The demo SAM, a sample whose cache entry it produced (as stage 3 does), and small random models
    in place of the trained artifacts (the fusion module moved off its identity start, so the
    uncertainty maps it fuses change its output)."""
    path = save_random_checkpoint("sam", "demo_tiny", tmp_path_factory.mktemp("ckpt") / "demo_tiny.pt", seed=0)
    backbone = load_backbone("sam", "demo_tiny", path, "cpu")
    image = np.random.default_rng(5).integers(0, 256, (*HW, 3), dtype=np.uint8)
    probe = make_sample(image=image, num_sets=2)
    features = round_features(backbone.encode(backbone.preprocess(image)[None]))
    prompts = PROMPT_MODES[PROMPT_MODE](probe.points, probe.labels, probe.boxes)
    selected = decode_selected(backbone, features, HW, prompts, None, MULTIMASK_POLICY)
    sample = make_sample(image=image, num_sets=2, logits=selected.logits.to(torch.float16).numpy(),
                         features={name: value[0].numpy() for name, value in features.items()})
    sample.cache_entry.branch_index = selected.branch.numpy().astype(np.int8)
    sample.cache_entry.iou_predictions = selected.iou_predictions.numpy()

    head = seeded_head()
    mean = torch.cat([head.final_conv.weight.detach().flatten(), head.final_conv.bias.detach()])
    head_posterior = LastLayerPosterior(head, mean, torch.full_like(mean, 0.05), prior_precision=1.0)
    torch.manual_seed(1)
    variance_network = VarianceNetwork(channels_in=4, hidden_channels=8).eval()
    fusion = UncertaintyFusion(embed_dim=256, hidden_channels=8).eval()
    with torch.no_grad():
        for parameter in fusion.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    _, _, final_layers = decode_chosen_outputs(backbone, sample.features("cpu"), HW, sample.points, sample.labels,
                                               sample.boxes, sample.cache_entry.branch_index, PROMPT_MODE,
                                               MULTIMASK_POLICY)
    decoder_posterior = DecoderPosterior({
        token: HypernetPosterior(weight, bias, torch.full_like(weight, 0.01), torch.full_like(bias, 0.01), 1.0)
        for token, (weight, bias) in final_layer_means(final_layers).items()})
    artifacts = SimpleNamespace(backbone=backbone, head=head, posterior=head_posterior, head_posterior=head_posterior,
                                variance_network=variance_network, fusion=fusion, device=torch.device("cpu"),
                                runs=SimpleNamespace(laplace="v1"), fusion_switch=RefinementSwitch(True, 0.0))
    return sample, artifacts, decoder_posterior


def ground_truths():
    """The sample's ground truth as is, inverted and random."""
    truth = disc_ground_truth()
    return {"as_is": truth, "inverted": ~truth, "random": np.random.default_rng(3).random(HW) < 0.5}


#: Every method with the default Laplace target and label source; then the strategies the other
#: settings change (with the oracle, so that the run can fail too).
SETTINGS = {
    "defaults": (),
    "other_settings": ("laplace.target=sam_decoder", "evaluation.prompt_perturbation.label_source=own_mask",
                       "evaluation.strategies=[prompt_perturbation, laplace, prompt_perturbation_oracle]",
                       "evaluation.refinement=false"),
}


@pytest.mark.parametrize("settings", list(SETTINGS))
def test_only_the_oracles_change_when_the_ground_truth_is_replaced(parts, monkeypatch, settings):
    sample, artifacts, decoder_posterior = parts
    monkeypatch.setattr(methods, "load_decoder_posterior", lambda cfg, run_id, device: decoder_posterior)
    cfg = config(*SETTINGS[settings])
    predictor = Predictor(cfg, artifacts)
    names = method_names(cfg)
    assert any(name in ORACLE_METHODS for name in names) and any(name not in ORACLE_METHODS for name in names)
    if settings == "defaults":
        assert set(ORACLE_METHODS) <= set(names) and len(names) == len(ORACLE_METHODS) + 8

    outputs, rows = {}, {}
    for variant, truth in ground_truths().items():
        labelled = LabelledSample(sample, truth)
        outputs[variant] = predictor.predict(labelled)
        board = Scoreboard(ece_bins=10, device=torch.device("cpu"))
        board.score_sample(labelled, outputs[variant])
        rows[variant] = {row["method"]: row["mae"] for row in board.rows if row["promptset_id"] == 0}
        assert list(outputs[variant]) == names

    reference = outputs["as_is"]
    for variant in ("inverted", "random"):
        for method in names:
            ours, theirs = reference[method], outputs[variant][method]
            same = (np.array_equal(ours.mean_prob.numpy(), theirs.mean_prob.numpy())
                    and ours.maps.keys() == theirs.maps.keys()
                    and all(np.array_equal(ours.maps[name].numpy(), theirs.maps[name].numpy()) for name in ours.maps))
            assert same == (method not in ORACLE_METHODS), f"{method} with the {variant} ground truth"
        # The replaced ground truth reaches the metrics of every method, oracle or not.
        assert all(rows[variant][method] != rows["as_is"][method] for method in names)


def test_own_mask_reads_the_first_pass_and_original_reads_only_the_prompt(parts):
    sample, artifacts, _ = parts

    def predict(label_source, cache_logits):
        sample.cache_entry.logits = cache_logits
        strategy = PromptPerturbationStrategy(artifacts.backbone, 3, PROMPT_MODE, MULTIMASK_POLICY, seed=0,
                                              label_source=label_source)
        return strategy.predict(sample).mean_prob.numpy()

    cached = sample.cache_entry.logits
    flipped = (-cached.astype(np.float32)).astype(np.float16)
    try:
        assert np.array_equal(predict("original", cached), predict("original", flipped))
        own, own_flipped = predict("own_mask", cached), predict("own_mask", flipped)
        assert not np.array_equal(own, own_flipped)
        relabelled = PromptPerturbationStrategy(artifacts.backbone, 3, PROMPT_MODE, MULTIMASK_POLICY, seed=0)
        sample.cache_entry.logits = cached
        assert np.array_equal(own, relabelled.predict_relabelled(sample, cached > 0).mean_prob.numpy())
    finally:
        sample.cache_entry.logits = cached


def test_label_source_is_validated_and_fingerprinted():
    default = config()
    assert default.evaluation.prompt_perturbation.label_source == "original"
    choices = typing.get_args(typing.get_type_hints(PromptPerturbationConfig)["label_source"])
    assert choices == LABEL_SOURCES  # the config accepts exactly the sources the strategy implements
    for bad in ("oracle_gt", "ground_truth"):
        with pytest.raises(ConfigError, match=r"^evaluation\.prompt_perturbation\.label_source: .*not one of") as error:
            config(f"evaluation.prompt_perturbation.label_source={bad}")
        assert "\n" not in str(error.value)

    def fingerprint(cfg):
        return {name: cfg.section(name) for name in fingerprint_sections(cfg)}

    own_mask = config("evaluation.prompt_perturbation.label_source=own_mask")
    assert fingerprint(own_mask) != fingerprint(default) and fingerprint(config()) == fingerprint(default)


def test_oracle_methods_are_named_so_and_only_run_when_listed():
    assert ORACLE_METHODS and all("oracle" in name for name in ORACLE_METHODS)
    assert set(ORACLE_STRATEGIES) == set(ORACLE_BUILDERS) <= set(ORACLE_METHODS)
    assert all(cls.name == name for name, cls in ORACLE_STRATEGIES.items())
    default = load_config(REPO / "config.yaml")
    assert not set(ORACLE_METHODS) & set(default.evaluation.strategies)
    everything = config()
    assert all("oracle" not in name for name in method_names(everything) if name not in ORACLE_METHODS)
    assert "sam_checkpoint" in needed_artifacts(config("evaluation.strategies=[prompt_perturbation_oracle]",
                                                       "evaluation.refinement=false"))


def test_the_summary_names_the_oracle_ablations_as_such():
    sample = make_sample()
    names = ["raw_sam", "prompt_perturbation_oracle", "prompt_perturbation"]
    board = Scoreboard(ece_bins=10, device=torch.device("cpu"))
    prob = torch.from_numpy(np.random.default_rng(0).random((sample.num_promptsets, 256, 256), np.float32))
    board.score_sample(LabelledSample(sample, disc_ground_truth()),
                       {name: StrategyOutput(prob, {"entropy": binary_entropy(prob)}, "entropy") for name in names})
    summary = reports.summary_frame(board, names, [])
    text = reports.summary_markdown(summary, summary.iloc[0:0], "", names, 1, len(board.rows), 10)
    oracle_lines = [line for line in text.splitlines() if line.startswith("Oracle ablations")]
    assert len(oracle_lines) == 1 and oracle_lines[0].endswith(": prompt_perturbation_oracle.")


def test_a_ground_truth_of_another_size_is_refused():
    with pytest.raises(UncertaintyError, match="s1: ground-truth mask"):
        LabelledSample(make_sample(), np.zeros((10, 10), bool))
