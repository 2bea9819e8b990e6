"""The simulated interactive segmentation of stage 7 (``modules/interactive/simulation.py``).

On the small demo project (``fusion_project``): the uncertainty policies receive the ground truth only
through the annotator's labels (replayed labels on an inverted ground truth leave their clicks
unchanged), no policy clicks a pixel twice, and the stage writes every output and resumes after
SIGKILL to the trace of an uninterrupted run. Synthetic units for the unit selection and the settings.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
import torch

from modules.cache.training_index import open_cache
from modules.core.config import ConfigError, load_config
from modules.core.paths import ACTIVE_PROMPTING_DIR, click_trace_path, eval_report_dir
from modules.evaluation.methods import STRATEGY_BUILDERS
from modules.evaluation.runs import Artifacts, RunIds
from modules.evaluation.samples import EvalUnit, LabelledSample, list_eval_units, load_sample
from modules.interactive.click_policies import CLICK_POLICIES, ClickChoice, click_spacing
from modules.interactive.click_metrics import TRACE_COLUMNS
from modules.interactive.simulation import (Annotator, ClickSimulator, Lane, SimulationError, checked_policies,
                                            later_output_policy, simulated_units, simulation_lanes)
from modules.stages.evaluate_uncertainty import KILL_AFTER_CLICK_IMAGES_ENV, fingerprint_sections

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: Cheap stage-7 settings: two images, two scored strategies, three clicks of four policies (random twice).
STAGE_ARGS = ("--set", "evaluation.max_samples=2", "--set", "evaluation.strategies=[raw_sam,map_head]",
              "--set", "evaluation.refinement=false", "--set", "evaluation.qualitative_per_domain=0",
              "--set", "evaluation.bootstrap_samples=20",
              "--set", "evaluation.active_prompting.enabled=true", "--set", "evaluation.active_prompting.max_clicks=3",
              "--set", "evaluation.active_prompting.policies=[oracle,bald,sam_entropy,random]",
              "--set", "evaluation.active_prompting.random_draws=2")


def _unit(safe_id: str, group: str) -> EvalUnit:
    return EvalUnit(safe_id, safe_id, group, "", "", (8, 8))


def test_simulated_units_round_robin_over_groups_in_unit_order():
    units = [_unit("a1", "a"), _unit("a2", "a"), _unit("a3", "a"), _unit("b1", "b"), _unit("c1", "c")]
    assert [u.safe_id for u in simulated_units(units, 3)] == ["a1", "b1", "c1"]
    assert [u.safe_id for u in simulated_units(units, 4)] == ["a1", "a2", "b1", "c1"]
    assert simulated_units(units, 0) == units


def test_bad_settings_name_the_key():
    for override, key in (("evaluation.active_prompting.policies=[bald,psychic]", "policies"),
                          ("evaluation.active_prompting.policies=[bald,bald]", "policies"),
                          ("evaluation.active_prompting.mask_method=sam_oracle", "mask_method")):
        cfg = load_config(None, [override])
        with pytest.raises(SimulationError, match=f"evaluation.active_prompting.{key}"):
            checked_policies(cfg)
    # auto: SAM's single-mask output after the first click, but on the demo model (README, "Simulated clicks")
    assert later_output_policy(load_config(None)) == "best_iou"
    assert later_output_policy(load_config(None, ["sam.model_type=vit_b"])) == "single"
    assert later_output_policy(load_config(None, ["sam.family=sam2", "sam.model_type=hiera_t"])) == "single"
    for setting in ("auto", "single"):
        decoder_posterior = load_config(None, ["laplace.target=sam_decoder", "sam.model_type=vit_b",
                                               f"evaluation.active_prompting.later_output={setting}"])
        with pytest.raises(SimulationError,
                           match=f"evaluation.active_prompting.later_output: '{setting}' .* sam_decoder"):
            later_output_policy(decoder_posterior)
    assert later_output_policy(load_config(None, ["laplace.target=sam_decoder", "sam.model_type=vit_b",
                                                  "evaluation.active_prompting.later_output=as_first"])) == "best_iou"
    assert later_output_policy(load_config(None, ["laplace.target=sam_decoder", "sam.model_type=vit_b",
                                                  "sam.multimask_policy=single"])) == "single"
    with pytest.raises(ConfigError, match="evaluation.active_prompting.random_draws: must be an integer of at least 1"):
        load_config(None, ["evaluation.active_prompting.random_draws=0"])
    for value in ("-1", "far", "nan"):
        with pytest.raises(ConfigError, match="evaluation.active_prompting.min_distance: "):
            load_config(None, [f"evaluation.active_prompting.min_distance={value}"])
    assert load_config(None, ["evaluation.active_prompting.min_distance=12"]).evaluation.active_prompting.min_distance == 12
    defaults = load_config(None)
    assert defaults.evaluation.active_prompting.min_distance == "auto"
    assert list(checked_policies(defaults)) == defaults.evaluation.active_prompting.policies
    assert set(CLICK_POLICIES) - set(checked_policies(defaults)) == {"head_entropy"}  # the one left out by default


def pairwise_gaps(clicks: pd.DataFrame) -> np.ndarray:
    """The distances between every two of the ``x``, ``y`` clicks, in pixels."""
    points = clicks[["x", "y"]].to_numpy(float)
    return np.linalg.norm(points[:, None] - points[None], axis=-1)[np.triu_indices(len(points), 1)]


@dataclass
class ReplayAnnotator(Annotator):
    """Answers with labels recorded from another run (``lane -> labels of clicks 2..``), whatever
    ``truth`` holds; its first click is the recorded one."""

    first: ClickChoice | None = None
    replies: dict[Lane, list[int]] = field(default_factory=dict)

    def first_click(self) -> ClickChoice:
        return self.first

    def label(self, lane: Lane, choice: ClickChoice) -> int:
        return self.replies[lane].pop(0)


def test_uncertainty_policies_read_the_ground_truth_only_through_the_annotator(fusion_project):
    """Rerun with the ground truth inverted but the first run's answers replayed: every policy except
    the oracle clicks the same pixels (so nothing else of the ground truth reaches it), while the IoUs
    (scored against the inverted truth) and the oracle's clicks change. No click is placed twice."""
    torch.set_num_threads(1)
    cfg = fusion_project.load_config("evaluation.active_prompting.max_clicks=3", "evaluation.max_samples=1")
    simulator = ClickSimulator(cfg, Artifacts(cfg, RunIds.resolve("v1"), torch.device("cpu")))
    labelled = load_sample(cfg, open_cache(cfg), list_eval_units(cfg)[0])
    trace = simulator.simulate(labelled, unseen=False)

    assert list(trace.columns) == list(TRACE_COLUMNS)
    policies = list(cfg.evaluation.active_prompting.policies)
    lanes = simulation_lanes(cfg)
    assert len(lanes) == len(policies) + cfg.evaluation.active_prompting.random_draws - 1  # random runs 4 times
    assert len(trace) == len(lanes) * 3 and list(trace["policy"].unique()) == policies
    assert list(trace.drop_duplicates(["policy", "draw"])[["policy", "draw"]].itertuples(index=False)) == \
        [(lane.policy, lane.draw) for lane in lanes]
    height, width = labelled.inputs.original_hw
    spacing = click_spacing("auto", labelled.inputs.record["gaussian_sigma"], (height, width))
    assert spacing == 2 * labelled.inputs.record["gaussian_sigma"] * max(height, width) / 256 > 2
    for policy, rows in trace.groupby(["policy", "draw"]):
        placed = rows[rows["x"] >= 0]
        assert list(rows["clicks"]) == [1, 2, 3]
        assert not placed.duplicated(["x", "y"]).any(), f"{policy} clicked a pixel twice"
        gaps = pairwise_gaps(placed)
        if policy[0] != "oracle":  # the reference protocol's user clicks where its rule says
            assert (gaps >= spacing).all(), f"{policy}: clicks closer than min_distance (auto: {spacing:.1f} px)"
        assert placed["x"].between(0, width - 1).all() and placed["y"].between(0, height - 1).all()
        assert set(placed["label"]) <= {0, 1}
        truth_labels = labelled.ground_truth[placed["y"], placed["x"]].astype(int)
        assert (truth_labels == placed["label"].to_numpy()).all(), f"{policy}: the annotator answered wrongly"

    first = trace.iloc[0]
    replies = {Lane(policy, draw): list(rows["label"].iloc[1:])
               for (policy, draw), rows in trace.groupby(["policy", "draw"], sort=False)}
    inverted = LabelledSample(labelled.inputs, ~labelled.ground_truth)
    replay = ReplayAnnotator(inverted.ground_truth, ClickChoice(int(first["y"]), int(first["x"]), int(first["label"])),
                             replies)
    replayed = simulator.simulate(inverted, unseen=False, annotator=replay)
    click_columns = ["policy", "clicks", "x", "y", "label"]
    uncertain = trace["policy"] != "oracle"
    pd.testing.assert_frame_equal(replayed.loc[uncertain, click_columns], trace.loc[uncertain, click_columns])
    assert not np.allclose(replayed["iou"], trace["iou"])
    oracle = trace["policy"] == "oracle"
    assert not replayed.loc[oracle, ["x", "y"]].iloc[1:].equals(trace.loc[oracle, ["x", "y"]].iloc[1:])


def test_strategies_on_a_batch_of_images_equal_one_image_at_a_time(fusion_project):
    """``Strategy.predict_batch`` (the simulation's pass over a batch of images) gives each image what
    ``predict`` gives it alone, bit for bit, over 24 rows: past the 16 where a stacked 1 x 1
    convolution rounds differently on one CPU thread. The stage test below checks a simulated batch's
    traces (its killed run simulated both images in one batch)."""
    torch.set_num_threads(1)
    cfg = fusion_project.load_config()
    artifacts = Artifacts(cfg, RunIds.resolve("v1"), torch.device("cpu"))
    cache = open_cache(cfg)
    samples = [load_sample(cfg, cache, unit).inputs for unit in list_eval_units(cfg)] * 2
    assert sum(sample.num_promptsets for sample in samples) >= 24
    assert cfg.laplace.predictive == "closed_form"  # the Laplace's stacked path (mc runs image by image)
    for name in ("raw_sam", "map_head", "laplace", "variance_network"):
        strategy = STRATEGY_BUILDERS[name].build(cfg, artifacts)
        with torch.inference_mode():
            together = strategy.predict_batch(samples)
            assert len(together) == len(samples)
            for sample, output in zip(samples, together):
                alone = strategy.predict(sample)
                assert torch.equal(output.mean_prob, alone.mean_prob), (name, sample.safe_id)
                assert output.maps.keys() == alone.maps.keys() and output.primary_map == alone.primary_map
                for key, values in alone.maps.items():
                    assert torch.equal(output.maps[key], values), (name, key, sample.safe_id)


def test_a_policys_trace_does_not_depend_on_the_other_policies_configured(fusion_project):
    """The random policy's generators are seeded by the image, the policy's name and the draw, not by
    places in ``evaluation.active_prompting.policies``: alone or after three others its draws click the
    same pixels, and its first draw is the same with one draw or three. The draws differ."""
    torch.set_num_threads(1)
    traces = []
    labelled = None
    for policies, draws in (("[random]", 3), ("[oracle,bald,sam_entropy,random]", 3), ("[random]", 1)):
        cfg = fusion_project.load_config("evaluation.active_prompting.max_clicks=4",
                                         f"evaluation.active_prompting.policies={policies}",
                                         f"evaluation.active_prompting.random_draws={draws}")
        simulator = ClickSimulator(cfg, Artifacts(cfg, RunIds.resolve("v1"), torch.device("cpu")))
        labelled = labelled or load_sample(cfg, open_cache(cfg), list_eval_units(cfg)[0])
        trace = simulator.simulate(labelled, unseen=False)
        traces.append(trace[trace["policy"] == "random"].reset_index(drop=True))
    alone, among_others, one_draw = traces
    assert alone["draw"].tolist() == [0] * 4 + [1] * 4 + [2] * 4 and (alone["x"] >= 0).sum() == 12
    pd.testing.assert_frame_equal(alone, among_others)
    pd.testing.assert_frame_equal(alone[alone["draw"] == 0], one_draw)
    clicks = [tuple(zip(rows["x"].iloc[1:], rows["y"].iloc[1:])) for _, rows in alone.groupby("draw")]
    assert len(set(clicks)) == 3


def test_min_distance_binds_the_uncertainty_policies_not_the_error_oracle(fusion_project):
    """The oracle is the reference protocol's simulated user: its clicks are the same with
    ``min_distance`` auto or 0, while BALD's auto clicks keep two prompt-map sigmas apart."""
    torch.set_num_threads(1)
    traces = {}
    labelled = None
    for spacing in ("auto", "0"):
        cfg = fusion_project.load_config("evaluation.active_prompting.max_clicks=5",
                                         "evaluation.active_prompting.policies=[oracle,bald]",
                                         f"evaluation.active_prompting.min_distance={spacing}")
        simulator = ClickSimulator(cfg, Artifacts(cfg, RunIds.resolve("v1"), torch.device("cpu")))
        labelled = labelled or load_sample(cfg, open_cache(cfg), list_eval_units(cfg)[0])
        traces[spacing] = simulator.simulate(labelled, unseen=False)
    oracle = [trace[trace["policy"] == "oracle"].reset_index(drop=True) for trace in traces.values()]
    pd.testing.assert_frame_equal(*oracle)
    bald = traces["auto"][(traces["auto"]["policy"] == "bald") & (traces["auto"]["x"] >= 0)]
    height, width = labelled.inputs.original_hw
    assert len(bald) == 5
    assert pairwise_gaps(bald).min() >= click_spacing("auto", labelled.inputs.record["gaussian_sigma"], (height, width))


class RecordingSimulator(ClickSimulator):
    """Keeps every decoder call's mask prompt and SAM logits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []
        self.outputs_kept = []  # per call, the decoder outputs each prompt set chose from

    def decode(self, sample, features, record, mask_input=None, multimask_policy=None):
        state = super().decode(sample, features, record, mask_input, multimask_policy)
        self.calls.append((record, mask_input, torch.from_numpy(state.cache_entry.logits).float()))
        self.outputs_kept.append(state.cache_entry.iou_predictions.shape[1])
        return state


def test_each_round_gives_sam_its_own_last_logits_as_mask_prompt(fusion_project):
    """``mask_prompt: previous``: round 1 decodes the clicks alone, every later round the clicks and,
    per policy, SAM's own logits of the round before, which change what the decoder returns (so the
    prompt reaches it); ``none`` decodes clicks alone in every round."""
    torch.set_num_threads(1)
    overrides = ("evaluation.active_prompting.max_clicks=3", "evaluation.active_prompting.policies=[oracle,random]",
                 "evaluation.active_prompting.random_draws=1")
    labelled = None
    for mask_prompt in ("previous", "none"):
        cfg = fusion_project.load_config(*overrides, f"evaluation.active_prompting.mask_prompt={mask_prompt}")
        simulator = RecordingSimulator(cfg, Artifacts(cfg, RunIds.resolve("v1"), torch.device("cpu")))
        labelled = labelled or load_sample(cfg, open_cache(cfg), list_eval_units(cfg)[0])
        simulator.simulate(labelled, unseen=False)
        assert len(simulator.calls) == 3 and simulator.calls[0][1] is None
        if mask_prompt == "none":
            assert all(mask_input is None for _, mask_input, _ in simulator.calls)
            continue
        calls, features = list(simulator.calls), simulator.start(labelled, unseen=False).features
        for (_, _, before), (record, mask_input, after) in zip(calls, calls[1:]):
            assert mask_input.shape == (2, 1, 256, 256) and torch.equal(mask_input[:, 0], before)
            without = simulator.decode(labelled.inputs, features, record, multimask_policy=simulator.later_policy)
            assert not torch.equal(torch.from_numpy(without.cache_entry.logits).float(), after)


def test_later_rounds_keep_sams_single_mask_output(fusion_project):
    """``later_output: single``: the first interaction keeps stage 3's output (the best of SAM's three
    multimask outputs), every later round SAM's single-mask output, the same logits as decoding the
    round's clicks with ``sam.multimask_policy: single``; prompt perturbation decodes its jittered
    clicks likewise. ``as_first`` keeps the multimask outputs in every round."""
    torch.set_num_threads(1)
    overrides = ("evaluation.active_prompting.max_clicks=3", "evaluation.active_prompting.random_draws=1",
                 "evaluation.active_prompting.policies=[oracle,prompt_perturbation,random]")
    labelled = None
    for later_output, expected in (("single", [3, 1, 1]), ("as_first", [3, 3, 3])):
        cfg = fusion_project.load_config(*overrides, f"evaluation.active_prompting.later_output={later_output}")
        assert cfg.sam.multimask_policy == "best_iou"
        simulator = RecordingSimulator(cfg, Artifacts(cfg, RunIds.resolve("v1"), torch.device("cpu")))
        labelled = labelled or load_sample(cfg, open_cache(cfg), list_eval_units(cfg)[0])
        trace = simulator.simulate(labelled, unseen=False)
        assert simulator.outputs_kept == expected
        later_perturbation = simulator.later_strategies["prompt_perturbation"]
        assert later_perturbation.multimask_policy == ("single" if later_output == "single" else "best_iou")
        assert simulator.strategies["prompt_perturbation"].multimask_policy == "best_iou"
        if later_output == "as_first":
            assert simulator.later_strategies is simulator.strategies
            continue
        record, _, logits = simulator.calls[-1]
        features = simulator.start(labelled, unseen=False).features
        single = simulator.decode(labelled.inputs, features, record, multimask_policy="single")
        assert torch.equal(torch.from_numpy(single.cache_entry.logits).float(), logits)
        best = simulator.decode(labelled.inputs, features, record)
        assert not torch.equal(torch.from_numpy(best.cache_entry.logits).float(), logits)
        assert len(trace) == 3 * 3 and (trace["clicks"] == 3).sum() == 3


def test_stage_writes_the_traces_and_resumes_after_sigkill(fusion_project):
    """Killed after its first image's trace (both images simulated in one batch, ``batch_images``
    default 4), a rerun simulates only the second; each trace file holds exactly what simulating that
    image directly gives (the uninterrupted result)."""
    folder = eval_report_dir(fusion_project.root, "clicks_killed")
    result = fusion_project.run("evaluate_uncertainty.py", "--name", "clicks_killed", *STAGE_ARGS,
                                env={**ONE_THREAD, KILL_AFTER_CLICK_IMAGES_ENV: "1"}, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert len(list((folder / ACTIVE_PROMPTING_DIR / "units").glob("*.csv"))) == 1
    resumed = fusion_project.run("evaluate_uncertainty.py", "--name", "clicks_killed", *STAGE_ARGS, env=ONE_THREAD)
    assert "click simulation: 2 samples (1 done before)" in resumed.stdout
    for name in ("clicks.csv", "noc.csv", "stop_signal.csv", "clicks_iou.png"):  # the report folder's click files
        assert (folder / name).stat().st_size > 0, name
    assert "clicks_iou.png" in (folder / "summary.md").read_text()

    torch.set_num_threads(1)
    cfg = fusion_project.load_config(*(value for value in STAGE_ARGS if value != "--set"))
    simulator = ClickSimulator(cfg, Artifacts(cfg, RunIds.resolve("v1"), torch.device("cpu")))
    cache = open_cache(cfg)
    units = simulated_units(list_eval_units(cfg), 2)
    assert len(units) == 2
    for unit in units:
        direct = simulator.simulate(load_sample(cfg, cache, unit), unseen=False)
        assert len(direct) == (3 + 2) * 3 and direct["iou"].between(0, 1).all()
        assert direct["predicted_iou"].notna().all()
        assert click_trace_path(folder, unit.safe_id).read_text() == direct.to_csv(index=False)


def test_fingerprint_covers_the_simulation_settings():
    """A changed ``evaluation.active_prompting`` value is a changed stage-7 input (its trace files are
    never reused for other settings)."""

    def fingerprint(*overrides):
        cfg = load_config(None, list(overrides))
        return {key: cfg.section(key) for key in fingerprint_sections(cfg)}

    assert fingerprint() != fingerprint("evaluation.active_prompting.max_clicks=5")
    assert fingerprint() != fingerprint("evaluation.active_prompting.policies=[oracle]")
    assert fingerprint() != fingerprint("evaluation.active_prompting.mask_prompt=previous")
    assert fingerprint() != fingerprint("evaluation.active_prompting.random_draws=1")


def test_a_box_without_clicks_is_a_prompt_set_of_padding_points():
    """``start: box`` decodes the box before any click: a prompt set with no points at all."""
    from modules.data.promptset import clicked_promptset, clicked_record, promptset_tensors

    record = clicked_record("s", "s", (40, 60), [clicked_promptset([], [], (5, 6, 30, 20), 40, 60),
                                                  clicked_promptset([(3, 4)], [1], (5, 6, 30, 20), 40, 60, 1)], 8.0, 3)
    points, labels, _, boxes = promptset_tensors(record)
    assert labels.tolist() == [[-1, -1, -1], [1, -1, -1]] and points[1, 0].tolist() == [3.0, 4.0]
    assert boxes[0].tolist() == [5.0, 6.0, 30.0, 20.0]
