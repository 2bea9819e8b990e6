"""The validated refinement switch: chosen on validation scores, recorded beside the fusion run, and
honoured by the evaluation's ``refined`` methods (off: SAM's first pass, bit for bit).

The Predictor runs on the small random models of tests/test_no_ground_truth.py (its ``parts``
fixture: the fusion module moved off its identity start, so a refinement does change the mask).
"""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from modules.cache.packed_reader import packed_dataset
from modules.core.config import ConfigError
from modules.core.errors import PipelineError
from modules.evaluation.methods import Predictor, needed_artifacts
from modules.evaluation.samples import LabelledSample
from modules.uncertainty.fusion import (SWITCH_FILE, RefinementSwitch, ValidationScores, choose_refinement_switch,
                                        validate_refinement_switch)
from tests import test_no_ground_truth
from tests.test_no_ground_truth import config
from tests.test_uncertainty import disc_ground_truth

REFINED = ("refined", "refined_constant")
parts = test_no_ground_truth.parts  # the module fixture, shared


def scores(groups, sam, refined, sam_predicted, refined_predicted) -> ValidationScores:
    """One image per row."""
    return ValidationScores(np.array(groups), np.array([f"image{i}" for i in range(len(groups))]),
                            *(np.asarray(v, dtype=np.float64) for v in (sam, refined, sam_predicted, refined_predicted)))


#: Refinement predicted better everywhere but worse in fact: the plain gate would lower IoU.
WORSE = scores(["a", "a", "b", "b"], [0.8, 0.7, 0.9, 0.6], [0.5, 0.6, 0.8, 0.5],
               [0.70, 0.70, 0.80, 0.60], [0.80, 0.75, 0.85, 0.70])
#: Better on every image of group a (predicted gains 0.3 / 0.2); in group b the images with a small
#: predicted gain (0.02) get worse.
MIXED = scores(["a"] * 4 + ["b"] * 4, [0.5, 0.6, 0.5, 0.6, 0.9, 0.7, 0.9, 0.7],
               [0.8, 0.7, 0.8, 0.7, 0.6, 0.7, 0.6, 0.7], [0.6] * 4 + [0.8] * 4,
               [0.9, 0.8, 0.9, 0.8, 0.82, 0.75, 0.82, 0.75])


def test_a_refinement_worse_on_validation_is_switched_off():
    record = choose_refinement_switch(WORSE)
    assert record["enabled"] is False and record["margin"] is None
    assert not any(candidate["qualifies"] for candidate in record["candidates"])
    assert record["mean_iou"]["refined_chosen"] == record["mean_iou"]["raw_sam"]
    assert record["mean_iou"]["raw_sam"] == pytest.approx({"a": 0.75, "b": 0.75, "overall": 0.75})
    assert record["rows"] == 4 and record["rows_per_group"] == {"a": 2, "b": 2}


def test_the_margin_is_the_best_one_that_leaves_no_group_worse():
    record = choose_refinement_switch(MIXED)
    raw, margin_0 = record["mean_iou"]["raw_sam"], record["mean_iou"]["refined_gate_margin_0"]
    assert margin_0["overall"] > raw["overall"] and margin_0["b"] < raw["b"]  # the plain gate lowers group b
    assert record["enabled"] is True and record["margin"] == pytest.approx(0.02)  # keeps exactly group a's rows
    assert record["mean_iou"]["refined_chosen"] == pytest.approx({"a": 0.75, "b": 0.8, "overall": 0.775})
    chosen = next(c for c in record["candidates"] if c["margin"] == record["margin"])
    assert chosen["refined_rows"] == 4 and chosen["gain_interval"][0] > 0
    # A gain that rests on too few images does not hold at the lower end of its interval: off.
    few = scores(["a"] * 3, [0.5, 0.8, 0.8], [0.9, 0.8, 0.8], [0.5] * 3, [0.6, 0.4, 0.4])
    record = choose_refinement_switch(few)
    assert record["mean_iou"]["refined_gate_margin_0"]["overall"] > record["mean_iou"]["raw_sam"]["overall"]
    assert record["enabled"] is False and record["candidates"][0]["gain_interval"][0] == 0


def test_the_switch_is_written_once_per_checkpoint(tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights 1")
    calls = []

    def score():
        calls.append(1)
        return MIXED

    record = validate_refinement_switch(tmp_path, checkpoint, score, {"uncertainty_source": "constant"})
    stored = json.loads((tmp_path / SWITCH_FILE).read_text())
    assert stored == json.loads(json.dumps(record)) and stored["uncertainty_source"] == "constant"
    assert RefinementSwitch.load(tmp_path) == RefinementSwitch(True, pytest.approx(0.02))
    validate_refinement_switch(tmp_path, checkpoint, score, {"uncertainty_source": "constant"})
    assert len(calls) == 1  # same checkpoint and source: kept
    validate_refinement_switch(tmp_path, checkpoint, lambda: WORSE, {"uncertainty_source": "raw_sam_entropy"})
    assert RefinementSwitch.load(tmp_path).gate_margin == math.inf  # another source: recomputed
    checkpoint.write_bytes(b"weights 2")
    validate_refinement_switch(tmp_path, checkpoint, score, {"uncertainty_source": "raw_sam_entropy"})
    assert len(calls) == 2 and RefinementSwitch.load(tmp_path).enabled  # a retrained checkpoint: recomputed


def test_a_missing_or_damaged_switch_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(PipelineError, match=rf"^{tmp_path / SWITCH_FILE}: no validated refinement switch"):
        RefinementSwitch.load(tmp_path)
    (tmp_path / SWITCH_FILE).write_text('{"enabled": tru')
    with pytest.raises(PipelineError, match=r"unreadable refinement switch") as error:
        RefinementSwitch.load(tmp_path)
    assert "\n" not in str(error.value)


def predict(parts, switch: RefinementSwitch, *overrides: str):
    sample, artifacts, _ = parts
    cfg = config("evaluation.strategies=[raw_sam]", "fusion.uncertainty_source=raw_sam_entropy", *overrides)
    predictor = Predictor(cfg, SimpleNamespace(**{**vars(artifacts), "fusion_switch": switch}))
    return predictor.predict(LabelledSample(sample, disc_ground_truth()))


def same(ours, theirs) -> bool:
    return (np.array_equal(ours.mean_prob.numpy(), theirs.mean_prob.numpy()) and ours.maps.keys() == theirs.maps.keys()
            and all(np.array_equal(ours.maps[name].numpy(), theirs.maps[name].numpy()) for name in ours.maps))


def test_refined_methods_honour_the_switch_written_from_validation(parts, tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    validate_refinement_switch(tmp_path, checkpoint, lambda: WORSE, {})
    off = predict(parts, RefinementSwitch.load(tmp_path))
    for method in REFINED:
        assert same(off[method], off["raw_sam"]), method  # switched off: SAM's first pass, bit for bit
    assert not same(off["refined_oracle_mask"], off["raw_sam"])  # the oracle ablation is never gated

    keep_all = predict(parts, RefinementSwitch(True, -math.inf))
    ungated = predict(parts, RefinementSwitch(False, math.inf), "fusion.gate=none")  # the switch unread
    for method in REFINED:
        assert same(keep_all[method], ungated[method]) and not same(keep_all[method], keep_all["raw_sam"]), method


def test_the_gate_key_is_validated_and_the_switch_fingerprinted():
    assert config().fusion.gate == "validated"
    with pytest.raises(ConfigError, match=r"^fusion\.gate: .*not one of") as error:
        config("fusion.gate=always")
    assert "\n" not in str(error.value)
    assert "fusion_switch" in needed_artifacts(config())
    assert "fusion_switch" not in needed_artifacts(config("fusion.gate=predicted_iou"))
    assert "fusion_switch" not in needed_artifacts(config("evaluation.refinement=false"))


def test_fusion_training_records_the_switch_on_every_validation_row(fusion_project):
    cfg = fusion_project.load_config()
    folder = cfg.project_root / "checkpoints" / "fusion" / "run_v1"
    record = json.loads((folder / SWITCH_FILE).read_text())
    val = packed_dataset(cfg, "val")
    assert record["rows"] == len(val) and set(record["rows_per_group"]) == set(val.index["group"])
    assert record["uncertainty_source"] == cfg.fusion.uncertainty_source
    raw, chosen = record["mean_iou"]["raw_sam"], record["mean_iou"]["refined_chosen"]
    assert all(chosen[group] >= raw[group] for group in raw)  # never below raw SAM on validation
    assert record["enabled"] == (chosen["overall"] > raw["overall"])
