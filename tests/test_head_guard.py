"""The head's validation guard (``modules/training/guard.py``): a trained head that does not beat raw
SAM on validation is replaced by raw SAM (the identity residual head), on the real packed validation
split of the shared ``packed_project``; the guard's json; its config key."""

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
                                    apply_guard)
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


def test_guard_rules_decide_from_overall_and_per_group_gains():
    def scores(overall_gain, *group_gains):
        groups = {f"g{i}": GroupScore(4, 0.5 + gain, 0.5) for i, gain in enumerate(group_gains)}
        return ValidationScores(GroupScore(4 * len(group_gains), 0.5 + overall_gain, 0.5), groups)

    assert GUARD_RULES["overall"](scores(0.02, 0.1, -0.05)) is True
    assert GUARD_RULES["overall"](scores(0.0, 0.0, 0.0)) is False  # a tie does not beat raw SAM
    assert GUARD_RULES["every_group"](scores(0.02, 0.1, -0.05)) is False
    assert GUARD_RULES["every_group"](scores(0.02, 0.1, 0.0)) is True
    assert GUARD_RULES["off"](scores(-0.5, -0.5)) is True
    assert set(typing.get_args(typing.get_type_hints(HeadConfig)["guard"])) == set(GUARD_RULES)


def test_guard_config_key_is_validated(tmp_path):
    (tmp_path / "config.yaml").write_text("head: {guard: sometimes}\n")
    with pytest.raises(ConfigError, match=r"head\.guard") as raised:
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
    _assert_same_tensors(best, trained if report["kept"] == "trained_head" else build_head(cfg).identity_state(trained))
