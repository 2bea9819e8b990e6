"""The head's validation guard (``modules/training/guard.py``): a trained head that does not beat raw
SAM on validation is replaced by raw SAM (the identity residual head) or by the fraction of its
correction that does (``head.guard_blends``), on the real packed validation split of the shared
``packed_project``; the guard's json; its config keys."""

from __future__ import annotations

import typing

import numpy as np
import pytest
import torch

from modules.cache.packed_reader import packed_dataset
from modules.core.config import ConfigError, HeadConfig, load_config
from modules.core.fileio import read_json
from modules.core.paths import checkpoint_run_dir
from modules.training.checkpoints import build_head
from modules.training.guard import (GUARD_FILE, GUARD_RULES, TRAINED_BEST_FILE, GroupScore, ValidationScores,
                                    apply_guard, choose_blend)
from modules.training.losses import hard_iou
from modules.training.run_state import BEST_FILE, load_checkpoint_file, save_tensors


def _worse_than_sam(head):
    """``head`` made to predict an empty mask everywhere (the trained weights' stand-in for a bad head)."""
    with torch.no_grad():
        head.final_conv.bias.fill_(-1e3)
    return head


def _assert_same_tensors(state, expected):
    assert set(state) == set(expected)
    assert all(torch.equal(state[name], value) for name, value in expected.items())


def _rows(val):
    batch = val.read_batch(np.arange(len(val)))
    return batch["inputs"], batch["target"]


def test_guard_replaces_a_head_worse_than_sam_by_raw_sam_exactly(packed_project, tmp_path):
    cfg = packed_project.load_config("head.residual=true")
    val = packed_dataset(cfg, "val")
    inputs, target = _rows(val)
    raw_iou = hard_iou(inputs[:, :1], target).double()
    assert raw_iou.mean() > 0  # else an empty-mask head would not be worse
    torch.manual_seed(0)
    worse = _worse_than_sam(build_head(cfg))
    save_tensors(worse.state_dict(), tmp_path / BEST_FILE)

    report = apply_guard(tmp_path, build_head(cfg), val, "overall")

    assert report["kept"] == "raw_sam_identity" and report["trained_head_beats_raw_sam"] is False
    assert report["overall"]["rows"] == len(val)
    assert report["overall"]["raw_sam_iou"] == pytest.approx(float(raw_iou.mean()), abs=1e-9)
    assert report["overall"]["head_iou"] < report["overall"]["raw_sam_iou"]
    groups = val.index["group"].astype(str).to_numpy()
    assert set(report["groups"]) == set(groups)
    for name, score in report["groups"].items():
        assert score["rows"] == int((groups == name).sum())
        assert score["raw_sam_iou"] == pytest.approx(float(raw_iou[torch.from_numpy(groups == name)].mean()), abs=1e-9)
    assert read_json(tmp_path / GUARD_FILE) == report
    guarded = build_head(cfg)
    guarded.load_state_dict(load_checkpoint_file(tmp_path / BEST_FILE))
    with torch.no_grad():
        assert torch.equal(guarded.eval()(inputs), inputs[:, :1])  # SAM's (clipped) logit, bit for bit
    _assert_same_tensors(load_checkpoint_file(tmp_path / TRAINED_BEST_FILE), worse.state_dict())

    # Killed after best.pt was replaced but before the json: the rerun decides again from the trained
    # weights (not from the identity best.pt, which would tie with raw SAM) and writes the same files.
    (tmp_path / GUARD_FILE).unlink()
    assert apply_guard(tmp_path, build_head(cfg), val, "overall") == report
    _assert_same_tensors(load_checkpoint_file(tmp_path / BEST_FILE), guarded.state_dict())


def test_guard_off_and_a_plain_head_keep_the_trained_weights(packed_project, tmp_path):
    for overrides, rule in ((["head.residual=true"], "off"), (["head.residual=false"], "overall")):
        cfg = packed_project.load_config(*overrides)
        torch.manual_seed(0)
        worse = _worse_than_sam(build_head(cfg))
        run_dir = tmp_path / rule
        run_dir.mkdir()
        save_tensors(worse.state_dict(), run_dir / BEST_FILE)
        report = apply_guard(run_dir, build_head(cfg), packed_dataset(cfg, "val"), rule)
        assert report["kept"] == "trained_head"
        assert report["trained_head_beats_raw_sam"] is (rule == "off")
        _assert_same_tensors(load_checkpoint_file(run_dir / BEST_FILE), worse.state_dict())


def _scores(overall_gain, *group_gains):
    groups = {f"g{i}": GroupScore(4, 0.5 + gain, 0.5) for i, gain in enumerate(group_gains)}
    return ValidationScores(GroupScore(4 * len(group_gains), 0.5 + overall_gain, 0.5), groups)


def test_guard_rules_decide_from_overall_and_per_group_gains():
    assert GUARD_RULES["overall"](_scores(0.02, 0.1, -0.05), 0.0) is True
    assert GUARD_RULES["overall"](_scores(0.0, 0.0, 0.0), 0.01) is False  # a tie does not beat raw SAM
    assert GUARD_RULES["every_group"](_scores(0.02, 0.1, -0.05), 0.0) is False
    assert GUARD_RULES["every_group"](_scores(0.02, 0.1, 0.0), 0.0) is True
    assert GUARD_RULES["every_group"](_scores(0.02, 0.1, -0.004), 0.005) is True  # within the tolerance
    assert GUARD_RULES["every_group"](_scores(0.02, 0.1, -0.006), 0.005) is False
    assert GUARD_RULES["off"](_scores(-0.5, -0.5), 0.0) is True
    assert set(typing.get_args(typing.get_type_hints(HeadConfig)["guard"])) == set(GUARD_RULES)


def test_choose_blend_keeps_the_passing_weight_with_the_best_validation_iou():
    candidates = {0.0: _scores(0.0, 0.0, 0.0), 0.3: _scores(0.01, 0.03, -0.001), 0.6: _scores(0.02, 0.05, -0.004),
                  1.0: _scores(0.03, 0.09, -0.03)}
    assert choose_blend(candidates, "every_group", 0.005) == 0.6
    assert choose_blend(candidates, "every_group", 0.0) == 0.0  # every weight costs a group: raw SAM
    assert choose_blend(candidates, "overall", 0.0) == 1.0
    tie = {0.2: _scores(0.01, 0.01), 0.4: _scores(0.01, 0.01)}
    assert choose_blend(tie, "overall", 0.0) == 0.2  # the smaller correction on a tie


def test_blended_state_interpolates_between_raw_sam_and_the_trained_head(packed_project):
    cfg = packed_project.load_config("head.residual=true")
    inputs, _ = _rows(packed_dataset(cfg, "val"))
    torch.manual_seed(0)
    head = build_head(cfg)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0.0, 0.3)
    trained = {name: value.clone() for name, value in head.state_dict().items()}
    _assert_same_tensors(head.blended_state(trained, 1.0), trained)
    _assert_same_tensors(head.blended_state(trained, 0.0), head.identity_state(trained))
    with torch.no_grad():
        sam, trained_out = inputs[:, :1], head.eval()(inputs)
        head.load_state_dict(head.blended_state(trained, 0.25))
        assert torch.allclose(head(inputs), sam + 0.25 * (trained_out - sam), atol=1e-4)
        head.load_state_dict(head.blended_state(trained, 0.0))
        assert torch.equal(head(inputs), sam)
    with pytest.raises(ValueError, match="blend weight"):
        head.blended_state(trained, 1.5)


def test_guard_scores_every_blend_as_its_head_would_and_keeps_the_chosen_one(packed_project, tmp_path):
    """A correction that is one constant (the last layer's bias ``c``) blended at ``w`` predicts ``SAM
    logit + w c > 0``: the guard's score of each weight equals that mask's IoU computed here, and the
    kept ``best.pt`` is the chosen weight's head."""
    cfg = packed_project.load_config("head.residual=true")
    val = packed_dataset(cfg, "val")
    inputs, target = _rows(val)
    torch.manual_seed(0)
    head = build_head(cfg)
    with torch.no_grad():
        head.final_conv.bias.fill_(4.0)  # grows every mask; at some fraction it may help, in full it may hurt
    save_tensors(head.state_dict(), tmp_path / BEST_FILE)
    blends = [0.0, 0.25, 0.5, 1.0]

    report = apply_guard(tmp_path, build_head(cfg), val, "every_group", blends=blends, group_tolerance=0.005)

    group_names = val.index["group"].astype(str).to_numpy()
    raw_rows = hard_iou(inputs[:, :1], target).double().numpy()
    by_weight = {row["weight"]: row for row in report["blends"]}
    assert sorted(by_weight) == blends
    candidates = {}
    for weight in blends:
        head_rows = hard_iou(inputs[:, :1] + weight * 4.0, target).double().numpy()
        group_scores = {name: GroupScore(int((group_names == name).sum()), float(head_rows[group_names == name].mean()),
                                         float(raw_rows[group_names == name].mean()))
                        for name in sorted(set(group_names))}
        candidates[weight] = ValidationScores(GroupScore(len(val), float(head_rows.mean()), float(raw_rows.mean())),
                                              group_scores)
        assert by_weight[weight]["head_iou"] == pytest.approx(float(head_rows.mean()), abs=1e-9)
        for name, score in group_scores.items():
            assert by_weight[weight]["group_gains"][name] == pytest.approx(score.gain, abs=1e-9)
    chosen = choose_blend(candidates, "every_group", 0.005)
    assert report["blend"] == chosen
    assert report["kept"] == {0.0: "raw_sam_identity", 1.0: "trained_head"}.get(chosen, "blended_head")
    _assert_same_tensors(load_checkpoint_file(tmp_path / BEST_FILE), build_head(cfg).blended_state(head.state_dict(), chosen))
    assert report["trained_head_beats_raw_sam"] is GUARD_RULES["every_group"](candidates[1.0], 0.005)


@pytest.mark.parametrize("text, key", [("head: {guard: sometimes}\n", r"head\.guard"),
                                       ("head: {guard_blends: [0.0, 1.5]}\n", r"head\.guard_blends\[1\]"),
                                       ("head: {guard_blends: []}\n", r"head\.guard_blends"),
                                       ("head: {guard_group_tolerance: -0.1}\n", r"head\.guard_group_tolerance")])
def test_guard_config_keys_are_validated(tmp_path, text, key):
    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=key) as raised:
        load_config(tmp_path / "config.yaml")
    assert "\n" not in str(raised.value)


def test_stage_writes_the_guard_json_and_a_best_pt_that_follows_it(trained_project):
    cfg = trained_project.load_config()
    run_dir = checkpoint_run_dir(cfg.project_root, "head", "v1")
    report = read_json(run_dir / GUARD_FILE)
    assert report["rule"] == cfg.head.guard
    assert report["overall"]["rows"] == len(packed_dataset(cfg, "val"))
    best = load_checkpoint_file(run_dir / BEST_FILE)
    trained = load_checkpoint_file(run_dir / TRAINED_BEST_FILE)
    assert report["blend"] in [0.0, 1.0, *cfg.head.guard_blends]
    _assert_same_tensors(best, trained if report["blend"] == 1.0 else build_head(cfg).blended_state(trained, report["blend"]))
