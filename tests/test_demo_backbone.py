"""The shipped demo backbone: loads through the registry and meets its quality bar on held-out scenes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from modules.data import demo_scenes
from modules.sam.registry import build_sam_model, load_backbone

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "assets" / "demo_backbone" / "demo_tiny.pt"
# The first plain scenes of purpose "backbone_eval" (never used in training). Fewer are not a
# measurement: a few scenes fail outright while most score above 0.9, so the mean box IoU of
# the first 8 scenes is 0.75 and of the first 50 is 0.87 (see tools/eval_demo_backbone.py).
SCENES = 50


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("sam", "demo_tiny", CHECKPOINT, "cpu")


def test_checkpoint_is_a_small_float16_state_dict_of_demo_tiny():
    assert CHECKPOINT.stat().st_size <= 20 * 2**20
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    expected = build_sam_model("sam", "demo_tiny").state_dict()
    assert set(state) == set(expected)
    assert all(state[k].shape == expected[k].shape for k in expected)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    record = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    assert record["complete"] is True and record["steps_done"] > 0 and "train_demo_backbone.py" in record["command"]


def test_loads_like_every_backbone(backbone):
    assert (backbone.family, backbone.model_type, backbone.image_size) == ("sam", "demo_tiny", 256)
    image, _ = demo_scenes.render_scene("plain", demo_scenes.scene_seed("backbone_eval", 0, "plain", 0))
    features = backbone.encode(backbone.preprocess(image)[None])
    assert features["image_embed"].shape == (1, 256, 64, 64)  # like the real SAM: nothing special-cases it


def _iou(logits: torch.Tensor, mask: np.ndarray) -> float:
    """FRAME256 ``256 x 256`` logits vs the ``H x W`` mask, at the original resolution."""
    predicted = F.interpolate(logits[None, None], mask.shape, mode="bilinear", align_corners=False)[0, 0] > 0
    truth = torch.from_numpy(mask)
    return float((predicted & truth).sum() / (predicted | truth).sum().clamp(min=1))


@pytest.fixture(scope="module")
def plain_scene_ious(backbone):
    """Mean-able IoUs on fixed held-out plain scenes: one point at the deepest interior pixel
    (multimask, best predicted IoU), the tight box (single-mask output), and the point with the
    ground truth as mask prompt (+-10 logits, as the pipeline's oracle ablation)."""
    point_ious, box_ious, oracle_ious = [], [], []
    for index in range(SCENES):
        image, mask = demo_scenes.render_scene("plain", demo_scenes.scene_seed("backbone_eval", 0, "plain", index))
        features = backbone.encode(backbone.preprocess(image)[None])
        row, col = np.unravel_index(np.argmax(ndimage.distance_transform_edt(mask)), mask.shape)
        logits, iou_predictions = backbone.decode(features, mask.shape, torch.tensor([[[float(col), float(row)]]]),
                                                  torch.ones(1, 1), multimask_output=True)
        point_ious.append(_iou(logits[0, iou_predictions[0].argmax()], mask))
        rows, cols = np.nonzero(mask)
        box = torch.tensor([[cols.min(), rows.min(), cols.max(), rows.max()]], dtype=torch.float32)
        logits, _ = backbone.decode(features, mask.shape, boxes=box, multimask_output=False)
        box_ious.append(_iou(logits[0, 0], mask))
        truth = F.interpolate(torch.from_numpy(mask).float()[None, None], (256, 256), mode="nearest") > 0.5
        oracle = backbone.mask_embedding(torch.where(truth, 10.0, -10.0), mask.shape)
        logits, iou_predictions = backbone.decode(features, mask.shape, torch.tensor([[[float(col), float(row)]]]),
                                                  torch.ones(1, 1), multimask_output=True,
                                                  dense_embedding_override=oracle)
        oracle_ious.append(_iou(logits[0, iou_predictions[0].argmax()], mask))
    return np.array(point_ious), np.array(box_ious), np.array(oracle_ious)


def test_plain_scenes_meet_the_one_point_bar(plain_scene_ious):
    point_ious, _, _ = plain_scene_ious
    assert point_ious.mean() >= 0.75, f"one-point IoU on plain scenes: {np.round(point_ious, 3).tolist()}"


def test_plain_scenes_meet_the_box_bar(plain_scene_ious):
    _, box_ious, _ = plain_scene_ious
    assert box_ious.mean() >= 0.85, f"box IoU on plain scenes: {np.round(box_ious, 3).tolist()}"


def test_a_ground_truth_mask_prompt_helps(plain_scene_ious):
    """The mask-prompt path is trained (SAM's iterative pass): the oracle ablation of the
    pipeline's refinement and the fusion module work through it."""
    point_ious, _, oracle_ious = plain_scene_ious
    assert oracle_ious.mean() >= point_ious.mean() + 0.03, (point_ious.mean(), oracle_ious.mean())


def test_the_quality_tools_oracle_clicks_start_from_the_one_point_result(backbone, plain_scene_ious):
    """``oracle_click_iou`` (the quality table's click column) with one click is the one-point
    result; more clicks decode every click so far, so they change the mask."""
    spec = importlib.util.spec_from_file_location("eval_demo_backbone", REPO / "tools" / "eval_demo_backbone.py")
    quality_tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality_tool)
    point_ious, _, _ = plain_scene_ious
    changed = 0
    for index in range(3):
        image, mask = demo_scenes.render_scene("plain", demo_scenes.scene_seed("backbone_eval", 0, "plain", index))
        features = backbone.encode(backbone.preprocess(image)[None])
        assert quality_tool.oracle_click_iou(backbone, features, mask, clicks=1) == pytest.approx(point_ious[index])
        changed += quality_tool.oracle_click_iou(backbone, features, mask, clicks=3) != pytest.approx(point_ious[index])
    assert changed >= 1


def test_quality_tool_reports_the_bar_and_the_outright_failures(tmp_path):
    """``tools/eval_demo_backbone.py`` end to end on two plain scenes: the table, the per-scene
    line and the verdict (the shipped figures come from this tool with 100 scenes per group)."""
    report = tmp_path / "quality.md"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval_demo_backbone.py"), "--scenes-per-group", "2",
         "--threads", "1", "--report", str(report)],
        capture_output=True, text=True, timeout=300)
    table = report.read_text()
    assert result.stdout.strip() == table.strip()
    assert result.returncode in (0, 1)  # 1 = bar not met, which two scenes may well be
    assert "| plain |" in table and "| thin |" in table and "| 5 oracle clicks |" in table
    assert "plain, box (single) per scene: median" in table and "of 2 scenes below 0.5" in table
    verdict = "**met**" if result.returncode == 0 else "**NOT met**"
    assert verdict in table
