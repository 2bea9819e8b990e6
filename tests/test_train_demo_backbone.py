"""``tools/train_demo_backbone.py``: the phase recipe, its learning-rate restarts, and that one
command with the same seed and threads reproduces its checkpoint bit for bit."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modules.sam.registry import load_backbone

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "train_demo_backbone.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("train_demo_backbone", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def test_phase_parsing_and_its_errors():
    assert tool.Phase.parse("1030,3e-4,20,box=2,mask") == tool.Phase(1030, 3e-4, 20, box_weight=2.0, mask_pass=True)
    assert tool.Phase.parse("900, 6e-4, 30") == tool.Phase(900, 6e-4, 30)
    for bad in ("900,6e-4", "900,fast,30", "900,6e-4,30,masks", "0,6e-4,30", "10,-1,3"):
        with pytest.raises(argparse.ArgumentTypeError, match="--phase"):
            tool.Phase.parse(bad)
    # the help text spells the default recipe so that it parses back to itself
    assert tuple(tool.Phase.parse(tool._phase_text(p)) for p in tool.DEFAULT_RECIPE) == tool.DEFAULT_RECIPE
    assert tool.parse_args([]).phases == tool.DEFAULT_RECIPE


def test_each_phase_restarts_its_own_schedule():
    phases = (tool.Phase(4, 6e-4, 2), tool.Phase(3, 3e-4, 1, mask_pass=True))
    located = [tool.phase_at(phases, step) for step in range(7)]
    assert [(p.mask_pass, i) for p, i in located] == [(False, 0), (False, 1), (False, 2), (False, 3),
                                                       (True, 0), (True, 1), (True, 2)]
    rates = [tool.learning_rate(i, i / p.steps, p.lr, p.warmup) for p, i in located]
    assert rates[:2] == pytest.approx([3e-4, 6e-4])  # warmup to the first peak
    assert rates[3] < rates[2] < 6e-4  # cosine decay
    assert rates[4] == pytest.approx(3e-4)  # the second phase restarts at its own peak
    with pytest.raises(IndexError):
        tool.phase_at(phases, 7)


def _train(output: Path) -> dict:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--seed", "5", "--threads", "1", "--phase", "2,6e-4,1",
         "--phase", "1,3e-4,1,box=2,mask", "--eval-scenes", "0", "--output", str(output)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(output.with_suffix(".json").read_text())


def test_one_command_reproduces_the_checkpoint_bit_for_bit(tmp_path):
    first = _train(tmp_path / "a" / "demo_tiny.pt")
    second = _train(tmp_path / "b" / "demo_tiny.pt")

    assert first["complete"] and first["steps_done"] == first["steps_planned"] == 3
    assert first["phases"] == [
        {"steps": 2, "lr": 6e-4, "warmup": 1, "box_weight": 1.0, "mask_pass": False},
        {"steps": 1, "lr": 3e-4, "warmup": 1, "box_weight": 2.0, "mask_pass": True}]
    assert "mask_prompt_iou" in first["train_metrics_last50"]  # the last phase ran the mask pass
    log = [json.loads(line) for line in (tmp_path / "a" / "demo_tiny.log").read_text().splitlines()]
    assert log[0]["lr"] == pytest.approx(6e-4)

    weights = [torch.load(tmp_path / run / "demo_tiny.pt", map_location="cpu", weights_only=True) for run in "ab"]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    torch.manual_seed(5)  # the script seeds torch with --seed before building the model
    initial = tool.build_demo_tiny().state_dict()
    changed = [k for k in initial if not torch.equal(weights[0][k], initial[k].half())]
    assert "mask_decoder.iou_token.weight" in changed and "image_encoder.patch_embed.proj.weight" in changed

    backbone = load_backbone("sam", "demo_tiny", tmp_path / "a" / "demo_tiny.pt", "cpu")
    assert backbone.model_type == "demo_tiny"
