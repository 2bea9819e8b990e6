"""Shapes and wiring of the trainable networks; loss values against hand-computed cases; gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modules.core.config import ConfigError, load_config
from modules.core.errors import PipelineError
from modules.core.paths import checkpoint_run_dir
from modules.training.losses import (
    LOSSES,
    BceDiceLoss,
    FocalDiceIouLoss,
    GaussianResidualNll,
    McLogitNoiseLoss,
    build_variance_loss,
    hard_iou,
)
from modules.training.checkpoints import (build_fusion, build_head, build_variance_network, load_trained_head,
                                          load_trained_variance_network)
from modules.training.run_state import BEST_FILE, save_tensors
from modules.training.models import FINAL_LAYER_NAME, PromptAwareHead, UncertaintyFusion, VarianceNetwork, soft_clamp


def _head_inputs(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


# --------------------------------------------------------------------------- models


def test_head_maps_b_3_256_256_to_b_1_256_256():
    torch.manual_seed(0)
    head = PromptAwareHead()
    logits = head(_head_inputs(2, 256))
    assert logits.shape == (2, 1, 256, 256)
    final = getattr(head, FINAL_LAYER_NAME)
    assert isinstance(final, torch.nn.Conv2d) and final.kernel_size == (1, 1) and final.out_channels == 1


def test_head_forward_is_final_conv_of_features():
    torch.manual_seed(0)
    head = PromptAwareHead(hidden_channels=16)
    x = _head_inputs(3, 32)
    features = head.features(x)
    assert features.shape == (3, 16, 32, 32)
    assert torch.equal(head.final_conv(features), head(x))


def test_head_with_image_embedding_uses_it():
    torch.manual_seed(0)
    head = PromptAwareHead(use_image_embedding=True, embedding_channels=256, embedding_proj_channels=8)
    x = _head_inputs(2, 64)
    embedding = torch.randn(2, 256, 16, 16)
    logits = head(x, embedding)
    assert logits.shape == (2, 1, 64, 64)
    assert head.conv1.in_channels == 3 + 8
    assert not torch.allclose(logits, head(x, torch.zeros_like(embedding)))
    with pytest.raises(ValueError, match="image_embedding"):
        head(x)
    with pytest.raises(ValueError, match="image_embedding"):
        PromptAwareHead()(x, embedding)


@pytest.mark.parametrize("use_image_embedding", [False, True])
def test_untrained_residual_head_is_raw_sam(use_image_embedding):
    torch.manual_seed(0)
    head = PromptAwareHead(hidden_channels=8, use_image_embedding=use_image_embedding, residual=True)
    x = _head_inputs(2, 32) * 10
    embedding = torch.randn(2, 256, 8, 8) if use_image_embedding else None
    assert head.final_conv.in_channels == 9
    assert torch.equal(head(x, embedding), x[:, :1])
    features = head.features(x, embedding)
    assert torch.equal(features[:, -1:], x[:, :1])
    assert torch.equal(head.final_conv(features), head(x, embedding))


def test_residual_head_learns_a_correction_to_sam():
    torch.manual_seed(0)
    head = PromptAwareHead(hidden_channels=8, residual=True)
    x = _head_inputs(4, 16)
    target = (x[:, 1:2] > 0).float()  # the prompt map, not SAM's logit, says where the object is
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    start = F.binary_cross_entropy_with_logits(head(x), target).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(head(x), target)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * start
    assert head.conv1.weight.grad is not None and head.conv1.weight.grad.abs().sum() > 0


def test_config_builds_the_residual_head_by_default_and_the_seed_head_on_request(tmp_path):
    (tmp_path / "config.yaml").write_text("head: {hidden_channels: 4}\n")
    residual = build_head(load_config(tmp_path / "config.yaml"))
    assert residual.final_conv.in_channels == 5 and residual.residual
    assert build_head(load_config(tmp_path / "config.yaml", ["head.residual=false"])).final_conv.in_channels == 4


def test_head_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"B x 3 x H x W"):
        PromptAwareHead()(torch.zeros(1, 4, 8, 8))


def test_variance_network_shape_start_value_and_range():
    torch.manual_seed(0)
    net = VarianceNetwork(channels_in=4, hidden_channels=8, log_var_clamp=(-5.0, 5.0), initial_log_var=-2.0)
    head_inputs, map_logits = _head_inputs(2, 32), torch.randn(2, 1, 32, 32)
    log_var = net(VarianceNetwork.build_inputs(head_inputs, map_logits))
    assert log_var.shape == (2, 1, 32, 32)
    torch.testing.assert_close(log_var, torch.full_like(log_var, -2.0), atol=1e-5, rtol=0)
    with torch.no_grad():
        net.final_conv.weight.fill_(100.0)
    extreme = net(VarianceNetwork.build_inputs(head_inputs * 100, map_logits))
    assert extreme.min() >= -5.0 and extreme.max() <= 5.0


def test_soft_clamp_keeps_gradient_when_saturated():
    raw = torch.tensor([-8.0, 0.0, 8.0], requires_grad=True)
    clamped = soft_clamp(raw, -5.0, 5.0)
    clamped.sum().backward()
    assert torch.all(clamped.abs() < 5.0)
    assert torch.all(raw.grad > 0)
    assert raw.grad[1] == pytest.approx(1.0)
    torch.testing.assert_close(clamped[1], torch.tensor(0.0))


def test_models_are_built_from_their_config_sections(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("head: {hidden_channels: 8}\nvariance: {hidden_channels: 6, log_var_min: -3, log_var_max: 4}\n"
                      "fusion: {hidden_channels: 12}\n")
    cfg = load_config(config)
    head, variance, fusion = build_head(cfg), build_variance_network(cfg), build_fusion(cfg)
    assert isinstance(head, PromptAwareHead) and head.final_conv.in_channels == 8 + 1  # + SAM's logit (residual)
    assert isinstance(variance, VarianceNetwork) and variance.conv1.in_channels == cfg.head.channels_in + 1
    assert variance.conv1.out_channels == 6
    assert isinstance(fusion, UncertaintyFusion) and fusion.uncertainty_downscaling[3].out_channels == 12
    # A misspelt width is refused when the config is loaded, naming the key, before any model is built.
    config.write_text("head: {hiden_channels: 8}\n")
    with pytest.raises(ConfigError, match="head.hiden_channels"):
        load_config(config)


# --------------------------------------------------------------------------- BCE + Dice


def test_bce_dice_matches_hand_computation():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]], [[[1.0, -2.0], [0.5, 0.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]], [[[0.0, 0.0], [1.0, 0.0]]]])
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    bce_terms, dices = [], []
    for sample_logits, sample_target in zip(logits.flatten(1).tolist(), target.flatten(1).tolist()):
        probs = [sig(v) for v in sample_logits]
        bce_terms += [-(y * math.log(p) + (1 - y) * math.log(1 - p)) for p, y in zip(probs, sample_target)]
        overlap = sum(p * y for p, y in zip(probs, sample_target))
        dices.append(1 - (2 * overlap + 1.0) / (sum(probs) + sum(sample_target) + 1.0))
    expected = sum(bce_terms) / len(bce_terms) + 0.5 * sum(dices) / len(dices)
    assert BceDiceLoss(dice_lambda=0.5)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_bce_dice_gradient_reaches_logits():
    logits = torch.randn(2, 1, 8, 8, requires_grad=True)
    BceDiceLoss(0.5)(logits, (torch.rand(2, 1, 8, 8) > 0.5).float()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


# --------------------------------------------------------------------------- variance losses


def test_mc_loss_with_vanishing_sigma_equals_bce():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8) * 3
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    log_var = torch.full_like(logits, -40.0)  # sigma = exp(-20)
    loss = McLogitNoiseLoss(num_samples=8, seed=1)(logits, log_var, target)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, target), atol=1e-6, rtol=0)


def test_mc_loss_equals_naive_monte_carlo_average_with_same_noise():
    logits = torch.tensor([[[[-3.0, 0.5], [2.0, 4.0]]]])
    log_var = torch.tensor([[[[1.0, 0.0], [-1.0, 2.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    samples = 64
    loss = McLogitNoiseLoss(num_samples=samples, seed=5)(logits, log_var, target)
    noise = torch.randn((samples, *logits.shape), generator=torch.Generator().manual_seed(5))
    noisy = logits + torch.exp(0.5 * log_var) * noise
    likelihood = torch.where(target.bool(), torch.sigmoid(noisy), 1 - torch.sigmoid(noisy)).double()
    expected = -torch.log(likelihood.mean(dim=0)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mc_loss_gradients_equal_autograd_of_the_plain_expression():
    # The loss computes its gradients in closed form; autograd of the textbook expression with the
    # same noise must agree for the log-variance and, when not detached, for the logits.
    torch.manual_seed(2)
    logits = (torch.randn(2, 1, 6, 6) * 3).requires_grad_(True)
    log_var = torch.randn(2, 1, 6, 6).requires_grad_(True)
    target = (torch.rand(2, 1, 6, 6) > 0.5).float()
    McLogitNoiseLoss(num_samples=16, seed=4, detach_logits=False)(logits, log_var, target).backward()
    plain_logits, plain_log_var = logits.detach().clone().requires_grad_(True), log_var.detach().clone().requires_grad_(True)
    noise = torch.randn((16, *logits.shape), generator=torch.Generator().manual_seed(4))
    noisy = plain_logits + torch.exp(0.5 * plain_log_var) * noise
    log_likelihood = -F.binary_cross_entropy_with_logits(noisy, target.expand_as(noisy), reduction="none")
    (math.log(16) - torch.logsumexp(log_likelihood, dim=0)).mean().backward()
    torch.testing.assert_close(log_var.grad, plain_log_var.grad, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(logits.grad, plain_logits.grad, rtol=1e-4, atol=1e-9)
    assert log_var.grad.abs().max() > 1e-4


def test_mc_loss_at_zero_logit_is_log_two_for_any_sigma():
    # sigmoid(sigma * eps) averages to 1/2 by symmetry of eps, whatever sigma is.
    logits = torch.zeros(1, 1, 4, 4)
    target = torch.ones(1, 1, 4, 4)
    for log_var in (-2.0, 0.0, 2.0):
        loss = McLogitNoiseLoss(num_samples=20000, seed=0)(logits, torch.full_like(logits, log_var), target)
        assert loss.item() == pytest.approx(math.log(2.0), abs=0.01)


def test_mc_loss_attenuates_wrong_pixels_and_penalises_right_ones():
    target = torch.ones(1, 1, 1, 2)
    logits = torch.tensor([[[[-5.0, 5.0]]]])  # first pixel wrong, second right
    log_var = torch.zeros(1, 1, 1, 2, requires_grad=True)
    logits_leaf = logits.clone().requires_grad_(True)
    McLogitNoiseLoss(num_samples=4000, seed=0)(logits_leaf, log_var, target).backward()
    assert log_var.grad[0, 0, 0, 0] < 0  # more variance lowers the loss where the head is wrong
    assert log_var.grad[0, 0, 0, 1] > 0  # and raises it where the head is right
    assert logits_leaf.grad is None  # the MAP head is frozen


def test_mc_loss_seeded_is_reproducible_and_unseeded_uses_global_rng():
    logits, log_var = torch.randn(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    target = (logits > 0).float()
    assert McLogitNoiseLoss(8, seed=3)(logits, log_var, target) == McLogitNoiseLoss(8, seed=3)(logits, log_var, target)
    torch.manual_seed(11)
    first = McLogitNoiseLoss(8)(logits, log_var, target)
    torch.manual_seed(11)
    assert McLogitNoiseLoss(8)(logits, log_var, target) == first


def test_gaussian_residual_nll_formula_and_optimum():
    logits = torch.zeros(1, 1, 1, 2)  # sigmoid = 0.5
    target = torch.tensor([[[[1.0, 1.0]]]])
    log_var = torch.tensor([[[[0.0, math.log(0.25)]]]])
    # pixel 1: 0.5 * (1 * 0.25 + 0) = 0.125; pixel 2: 0.5 * (4 * 0.25 + log 0.25)
    expected = (0.125 + 0.5 * (1.0 + math.log(0.25))) / 2
    assert GaussianResidualNll()(logits, log_var, target).item() == pytest.approx(expected, rel=1e-6)
    # d/ds vanishes at s = log(residual^2) = log(0.25): the second pixel is at the optimum.
    log_var = log_var.clone().requires_grad_(True)
    GaussianResidualNll()(logits, log_var, target).backward()
    assert log_var.grad[0, 0, 0, 1].item() == pytest.approx(0.0, abs=1e-7)
    assert log_var.grad[0, 0, 0, 0].item() > 0


def test_variance_loss_registry():
    assert set(LOSSES) == {"mc_logit_noise", "gaussian_residual_nll"}
    assert isinstance(build_variance_loss("mc_logit_noise", num_samples=4), McLogitNoiseLoss)
    with pytest.raises(ConfigError, match="variance.loss"):
        build_variance_loss("laplace")


def test_variance_network_learns_through_mc_loss():
    torch.manual_seed(0)
    net = VarianceNetwork(channels_in=4, hidden_channels=4)
    map_logits = torch.randn(2, 1, 8, 8)
    log_var = net(VarianceNetwork.build_inputs(torch.randn(2, 3, 8, 8), map_logits))
    loss = McLogitNoiseLoss(num_samples=4, seed=0)(map_logits, log_var, torch.ones(2, 1, 8, 8))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.final_conv.parameters())


def test_a_variance_run_loads_only_under_the_loss_it_was_trained_with(tmp_path):
    cfg = load_config(None, [f"data.project_root={tmp_path}"])
    run_dir = checkpoint_run_dir(tmp_path, "variance", "v1")
    run_dir.mkdir(parents=True)
    save_tensors(build_variance_network(cfg).state_dict(), run_dir / BEST_FILE)
    assert isinstance(load_trained_variance_network(cfg, "v1"), VarianceNetwork)  # no recorded config: not checked
    (run_dir / "config.resolved.yaml").write_text(f"variance:\n  loss: {cfg.variance.loss}\n")
    assert isinstance(load_trained_variance_network(cfg, "v1"), VarianceNetwork)
    other = next(name for name in LOSSES if name != cfg.variance.loss)
    (run_dir / "config.resolved.yaml").write_text(f"variance:\n  loss: {other}\n")
    with pytest.raises(PipelineError, match=f"config.resolved.yaml: .*variance.loss={other} but this config"):
        load_trained_variance_network(cfg, "v1")
    assert isinstance(load_trained_variance_network(load_config(None, [f"data.project_root={tmp_path}",
                                                                       f"variance.loss={other}"]), "v1"),
                      VarianceNetwork)


# --------------------------------------------------------------------------- focal + dice + IoU


def test_hard_iou_counts_and_empty_case():
    logits = torch.tensor([[[[2.0, -2.0], [2.0, 2.0]]], [[[-1.0, -1.0], [-1.0, -1.0]]]])
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(hard_iou(logits, target), torch.tensor([0.25, 1.0]))


@pytest.mark.parametrize("iou_loss, expected_iou_term", [("l1", 0.5), ("mse", 0.25)])
def test_focal_dice_iou_loss_terms(iou_loss, expected_iou_term):
    logits = torch.tensor([[[[2.0, -2.0], [2.0, 2.0]]]], requires_grad=True)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    predicted_iou = torch.tensor([0.75], requires_grad=True)  # actual IoU is 1 / 4
    loss_fn = FocalDiceIouLoss(focal_weight=20.0, alpha=0.25, gamma=2.0, iou_loss=iou_loss)
    terms = loss_fn.terms(logits, target, predicted_iou)

    p2, pm2 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))  # sigmoid(2), sigmoid(-2)
    # (logit, target): (2,1) right, (-2,1) wrong, (2,0) wrong, (2,0) wrong
    right_fg = 0.25 * (1 - p2) ** 2 * -math.log(p2)
    wrong_fg = 0.25 * (1 - pm2) ** 2 * -math.log(pm2)
    wrong_bg = 0.75 * p2**2 * -math.log(1 - p2)
    focal = (right_fg + wrong_fg + 2 * wrong_bg) / 4
    dice = 1 - (2 * (p2 + pm2) + 1) / ((3 * p2 + pm2) + 2 + 1)
    assert terms["focal"].item() == pytest.approx(focal, rel=1e-5)
    assert terms["dice"].item() == pytest.approx(dice, rel=1e-5)
    assert terms["iou"].item() == pytest.approx(expected_iou_term, rel=1e-6)
    total = loss_fn(logits, target, predicted_iou)
    assert total.item() == pytest.approx(20 * focal + dice + expected_iou_term, rel=1e-5)
    total.backward()
    assert logits.grad.abs().sum() > 0 and predicted_iou.grad.item() > 0


def test_focal_dice_iou_loss_rejects_unknown_iou_loss():
    with pytest.raises(ConfigError, match="iou_loss"):
        FocalDiceIouLoss(iou_loss="huber")


def test_checkpoint_of_another_head_design_is_one_line_naming_it(tmp_path):
    (tmp_path / "config.yaml").write_text("head: {hidden_channels: 4}\n")
    seed_head = build_head(load_config(tmp_path / "config.yaml", ["head.residual=false"]))
    run_dir = checkpoint_run_dir(tmp_path, "head", "v1")
    run_dir.mkdir(parents=True)
    save_tensors(seed_head.state_dict(), run_dir / BEST_FILE)
    cfg = load_config(tmp_path / "config.yaml", ["head.residual=true", f"data.project_root={tmp_path}"])
    with pytest.raises(PipelineError) as raised:
        load_trained_head(cfg, "v1")
    message = str(raised.value)
    assert "\n" not in message and str(run_dir / BEST_FILE) in message and "head.*" in message
