"""The dense embedding fusion module: what an untrained module does, and that its uncertainty path learns."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from modules.data import demo_scenes
from modules.core.frames import FRAME256
from modules.sam.registry import load_backbone
from modules.sam.prompting import Prompts
from modules.uncertainty.fusion import (UncertaintyFusion, collate_images, gate_by_predicted_iou, image_row_groups,
                                        make_uncertainty_source, refine, refinement_step)
from modules.training.losses import FocalDiceIouLoss
from modules.training.models import VarianceNetwork
from modules.scoring.entropy import binary_entropy_from_logits

CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "demo_backbone" / "demo_tiny.pt"


@pytest.fixture(scope="module")
def scene():
    """The demo backbone, one held-out camouflage scene (where the backbone errs), its features,
    two point prompt sets and the first pass's FRAME256 logits (multimask, best predicted IoU)."""
    backbone = load_backbone("sam", "demo_tiny", CHECKPOINT, "cpu")
    image, mask = demo_scenes.render_scene("camouflage", demo_scenes.scene_seed("backbone_eval", 0, "camouflage", 1))
    features = {name: value[0] for name, value in backbone.encode(backbone.preprocess(image)[None]).items()}
    row, col = np.unravel_index(np.argmax(ndimage.distance_transform_edt(mask)), mask.shape)
    outside = np.argwhere(~ndimage.binary_dilation(mask, iterations=5))[0]
    points = torch.tensor([[[col + 0.5, row + 0.5], [outside[1] + 0.5, outside[0] + 0.5]],
                           [[col + 0.5, row + 0.5], [col + 0.5, row + 0.5]]], dtype=torch.float32)
    labels = torch.tensor([[1, 0], [1, 1]])
    logits, ious = backbone.decode(features, mask.shape, points, labels, multimask_output=True)
    best = ious.argmax(dim=1)
    first_pass = logits[torch.arange(2), best][:, None]
    target = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), (FRAME256, FRAME256),
                                             mode="nearest").expand(2, -1, -1, -1).contiguous()
    return backbone, features, mask.shape, Prompts(points, labels, None), first_pass, target


def test_an_untrained_module_is_sams_own_mask_prompt_pass(scene):
    """The fuse conv starts as the identity on the mask embedding: refinement = SAM's decoder with
    the first pass as mask prompt and the single-mask output, whatever the uncertainty map says."""
    backbone, features, hw, prompts, first_pass, _ = scene
    expected, expected_iou = backbone.decode(features, hw, prompts.point_coords, prompts.point_labels,
                                             mask_input=first_pass, multimask_output=False)
    fusion = UncertaintyFusion()
    for uncertainty in (torch.zeros_like(first_pass), torch.rand(first_pass.shape, generator=torch.Generator().manual_seed(0))):
        with torch.inference_mode():
            refined, iou = refine(backbone, fusion, features, hw, prompts, first_pass, uncertainty)
        assert refined.shape == (2, 1, FRAME256, FRAME256) and iou.shape == (2, 1)
        torch.testing.assert_close(refined, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(iou, expected_iou, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        multimask, _ = refine(backbone, fusion, features, hw, prompts, first_pass, uncertainty, multimask_policy="best_iou")
    assert not torch.allclose(multimask, expected, atol=1e-3)  # the policy does pick another output


def test_training_steps_open_the_uncertainty_path_and_lower_the_loss(scene):
    backbone, features, hw, prompts, first_pass, target = scene
    uncertainty = ((first_pass.sigmoid() - 0.5).abs() < 0.4).float()
    other_uncertainty = 1.0 - uncertainty
    fusion = UncertaintyFusion()
    optimizer = torch.optim.Adam(fusion.parameters(), lr=1e-3)
    loss_fn = FocalDiceIouLoss(focal_weight=20.0)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        refined, iou = refine(backbone, fusion, features, hw, prompts, first_pass, uncertainty, enable_grad=True)
        loss = loss_fn(refined, target, iou[:, 0])
        loss.backward()
        assert fusion.fuse.weight.grad[:, 256:].abs().sum() > 0  # the uncertainty half gets a gradient
        assert all(p.grad is None or p.grad.isfinite().all() for p in fusion.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad or p.grad is None for p in backbone.model.parameters())  # SAM stays frozen
    with torch.inference_mode():
        with_map, _ = refine(backbone, fusion, features, hw, prompts, first_pass, uncertainty)
        with_other, _ = refine(backbone, fusion, features, hw, prompts, first_pass, other_uncertainty)
    assert (with_map - with_other).abs().max() > 1e-3  # the trained module reads the map


def test_gate_keeps_the_first_pass_unless_the_refined_mask_is_predicted_better(scene):
    """The refinement gate reads only the decoder's predicted IoUs (never the ground truth)."""
    backbone, features, hw, prompts, first_pass, _ = scene
    with torch.inference_mode():
        first_logits, first_ious = backbone.decode(features, hw, prompts.point_coords, prompts.point_labels,
                                                   multimask_output=True)
        refined, refined_iou = refine(backbone, UncertaintyFusion(), features, hw, prompts, first_pass,
                                      torch.zeros_like(first_pass))
    first_pass_iou = first_ious.max(dim=1).values
    refined, refined_iou, first = refined[:, 0], refined_iou[:, 0], first_pass[:, 0]
    for threshold in (first_pass_iou, refined_iou - 1e-3, refined_iou + 1e-3):
        gated = gate_by_predicted_iou(refined, refined_iou, first, threshold)
        for p in range(refined.shape[0]):
            expected = refined[p] if refined_iou[p] > threshold[p] else first[p]
            assert torch.equal(gated[p], expected)
    assert torch.equal(gate_by_predicted_iou(refined, refined_iou, first, refined_iou - 1e-3), refined)
    assert torch.equal(gate_by_predicted_iou(refined, refined_iou, first, refined_iou), first)  # a tie keeps SAM
    # A margin: the refined mask must beat the first pass's predicted IoU by more; inf keeps every first pass.
    assert torch.equal(gate_by_predicted_iou(refined, refined_iou, first, refined_iou - 1e-3, margin=1e-2), first)
    assert torch.equal(gate_by_predicted_iou(refined, refined_iou, first, refined_iou - 2e-2, margin=1e-2), refined)
    assert torch.equal(gate_by_predicted_iou(refined, refined_iou, first, refined_iou - 10, margin=math.inf), first)


def test_batched_refinement_step_equals_one_pass_per_row(scene):
    """Fusion training decodes all rows of an image in one call: the same refined masks (and loss)
    as one refinement pass per row."""
    backbone, features, hw, prompts, first_pass, target = scene
    torch.manual_seed(0)
    fusion = UncertaintyFusion()
    torch.nn.init.normal_(fusion.fuse.weight, std=0.05)  # off the identity start, so the map matters
    inputs = torch.cat([first_pass, torch.rand(2, 2, FRAME256, FRAME256)], dim=1)
    image = {"features": features, "point_coords": prompts.point_coords, "point_labels": prompts.point_labels,
             "box": torch.zeros(2, 4), "original_hw": torch.tensor(hw)}
    batch = collate_images([{"inputs": inputs, "target": target, **image},
                            {"inputs": inputs[1:], "target": target[1:], **{k: v[1:] if k in ("point_coords", "point_labels", "box") else v
                                                                             for k, v in image.items()}}])
    assert [item["rows"] for item in batch["images"]] == [2, 1]
    source = make_uncertainty_source("raw_sam_entropy")
    loss_fn = FocalDiceIouLoss()
    fusion.eval()
    loss, (logits, batch_target) = refinement_step(backbone, "points", "single", source, loss_fn)(fusion, batch)
    uncertainty = source(batch["inputs"])[:, None]
    per_row = [refine(backbone, fusion, features, hw, Prompts(prompts.point_coords[r:r + 1], prompts.point_labels[r:r + 1], None),
                      batch["inputs"][i:i + 1, 0:1], uncertainty[i:i + 1]) for i, r in enumerate((0, 1, 1))]
    expected = torch.cat([refined for refined, _ in per_row])
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(batch_target, torch.cat([target, target[1:]]))
    expected_loss = loss_fn(expected, batch_target, torch.cat([iou for _, iou in per_row])[:, 0])
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-4)


def test_image_row_groups_keep_whole_images_up_to_the_row_budget():
    row_images = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    assert image_row_groups(row_images) == [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9]]
    kept = image_row_groups(row_images, max_rows=6, seed=1)
    assert sum(map(len, kept)) <= 6 and kept == sorted(kept)
    assert all(group in [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9]] for group in kept)
    assert kept == image_row_groups(row_images, max_rows=6, seed=1)  # seeded
    assert {tuple(map(tuple, image_row_groups(row_images, max_rows=6, seed=s))) for s in range(8)} != {tuple(map(tuple, kept))}
    assert image_row_groups(row_images, max_rows=1, seed=0) in ([[0, 1, 2]], [[3, 4]], [[5, 6, 7, 8]], [[9]])


def test_the_variance_network_source_reads_the_map_its_loss_ranks_errors_by():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16) * 6.0

    def head(inputs):
        return inputs[:, :1]  # raw SAM's logit, as the guarded identity head

    variance_network = VarianceNetwork(channels_in=4, hidden_channels=4).eval()
    with torch.no_grad():
        variance_network.final_conv.weight.normal_(0.0, 0.5)
        log_var = variance_network(VarianceNetwork.build_inputs(x, head(x)))[:, 0]
    residual = make_uncertainty_source("variance_network", head=head, variance_network=variance_network,
                                       variance_loss="gaussian_residual_nll")(x)
    torch.testing.assert_close(residual, ((log_var + 5.0) / 10.0).clamp(0, 1))
    noise = make_uncertainty_source("variance_network", head=head, variance_network=variance_network,
                                    variance_loss="mc_logit_noise")(x)
    probit = x[:, 0] / torch.sqrt(1.0 + math.pi * torch.exp(log_var) / 8.0)
    torch.testing.assert_close(noise, binary_entropy_from_logits(probit) / math.log(2.0))
    assert 0.0 <= noise.min() and noise.max() <= 1.0
