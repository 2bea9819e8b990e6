"""``tools/train_demo_backbone.py``: the phase recipe, its learning-rate restarts, and that one
command with the same seed and threads reproduces its checkpoint bit for bit."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.core.fileio import file_md5
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
    assert tool.Phase.parse("400,1e-4,20,box=2,mask,clicks=14,frozen") == tool.Phase(
        400, 1e-4, 20, box_weight=2.0, mask_pass=True, click_rounds=14, frozen_encoder=True)
    for bad in ("900,6e-4", "900,fast,30", "900,6e-4,30,masks", "0,6e-4,30", "10,-1,3", "10,1e-4,3,clicks=-1",
                "10,1e-4,3,clicks=many"):
        with pytest.raises(argparse.ArgumentTypeError, match="--phase"):
            tool.Phase.parse(bad)
    # the help text spells the default recipe so that it parses back to itself
    assert tuple(tool.Phase.parse(tool._phase_text(p)) for p in tool.DEFAULT_RECIPE) == tool.DEFAULT_RECIPE
    clicks_phase = tool.Phase(5, 1e-4, 1, click_rounds=3, frozen_encoder=True)
    assert tool.Phase.parse(tool._phase_text(clicks_phase)) == clicks_phase
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


def _train(output: Path, *phases: str, init: Path | None = None) -> dict:
    phases = phases or ("2,6e-4,1", "1,3e-4,1,box=2,mask")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--seed", "5", "--threads", "1", "--eval-scenes", "0", "--output", str(output),
         *[argument for phase in phases for argument in ("--phase", phase)],
         *(["--init", str(init)] if init else [])],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(output.with_suffix(".json").read_text())


def test_one_command_reproduces_the_checkpoint_bit_for_bit(tmp_path):
    first = _train(tmp_path / "a" / "demo_tiny.pt")
    _train(tmp_path / "b" / "demo_tiny.pt")

    assert first["complete"] and first["steps_done"] == first["steps_planned"] == 3
    assert first["phases"] == [
        {"steps": 2, "lr": 6e-4, "warmup": 1, "box_weight": 1.0, "mask_pass": False, "click_rounds": 0,
         "frozen_encoder": False},
        {"steps": 1, "lr": 3e-4, "warmup": 1, "box_weight": 2.0, "mask_pass": True, "click_rounds": 0,
         "frozen_encoder": False}]
    assert first["init"] is None
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


def test_corrective_clicks_land_on_errors_inside_the_image():
    """The click phase's annotator: a uniformly drawn error pixel, or the error oracle's interior of
    the largest error region; never a pixel that is right, nothing when nothing is wrong."""
    truth = np.zeros((40, 50), dtype=bool)
    truth[30:33, 2:5] = True  # missed foreground
    predicted = np.zeros_like(truth)
    predicted[5:25, 10:30] = True  # covered background, the largest error region: interior rows 14-15, columns 19-20
    wrong = predicted != truth
    generator = torch.Generator().manual_seed(0)
    clicks = [tool._corrective_click(predicted, truth, generator) for _ in range(40)]
    assert all(wrong[row, col] for row, col in clicks)
    centre = sum(14 <= row <= 15 and 19 <= col <= 20 for row, col in clicks)
    assert 10 <= centre <= 30  # the oracle's half (a uniform draw hits these 4 of 409 pixels 1% of the time)
    assert len(set(clicks)) > 2  # and the uniform half
    assert tool._corrective_click(truth, truth, generator) is None


def test_corrective_click_inputs_follow_the_ground_truth(tmp_path):
    """Simulated rounds on a real (random-weight) demo_tiny: one click per round and prompt set,
    inside the image's part of the padded frame, labelled by the ground truth there."""
    torch.manual_seed(0)
    model = tool.build_demo_tiny()
    embeddings = torch.randn(2, 256, 64, 64)
    targets = torch.zeros(2, 256, 256)
    targets[0, 40:120, 30:200] = 1
    targets[1, 100:180, 20:90] = 1
    valid_hw = torch.tensor([[256, 210], [190, 256]])
    first = (torch.tensor([[[100.5, 80.5]], [[50.5, 140.5]]]), torch.ones(2, 1))
    coords, labels = tool.corrective_click_inputs(model, embeddings, targets, valid_hw, first, 4,
                                                  torch.Generator().manual_seed(1))
    assert coords.shape == (2, 5, 2) and labels.shape == (2, 5)
    assert torch.equal(coords[:, :1], first[0])
    for index in range(2):
        for (x, y), label in zip(coords[index, 1:].tolist(), labels[index, 1:].tolist()):
            if label == -1:
                continue
            row, col = int(y - 0.5), int(x - 0.5)
            assert row < valid_hw[index, 0] and col < valid_hw[index, 1]
            assert label == targets[index, row, col]


def test_a_click_phase_from_a_checkpoint_trains_the_decoder_only(tmp_path):
    """``--init`` + ``clicks=R,frozen``: the encoder's weights stay those of the start checkpoint,
    the prompt encoder / decoder learn, and the record names the start checkpoint."""
    start = tmp_path / "start" / "demo_tiny.pt"
    start.parent.mkdir()
    torch.manual_seed(0)
    tool.save_checkpoint(tool.build_demo_tiny(), start, {"command": "the start checkpoint", "steps_done": 0})
    record = _train(tmp_path / "tuned" / "demo_tiny.pt", "1,1e-3,1,clicks=3,frozen", init=start)

    assert record["init"]["md5"] == file_md5(start)
    assert record["init"]["record"]["command"] == "the start checkpoint"
    assert record["phases"][0]["click_rounds"] == 3 and record["phases"][0]["frozen_encoder"] is True
    assert "clicks_iou" in record["train_metrics_last50"]
    before, after = (torch.load(path, map_location="cpu", weights_only=True)
                     for path in (start, tmp_path / "tuned" / "demo_tiny.pt"))
    encoder = [k for k in before if k.startswith("image_encoder.")]
    decoder = [k for k in before if k.startswith("mask_decoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
