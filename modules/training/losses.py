"""Training losses for the head, the variance network and the refinement (fusion) module.

Shapes: logits, log-variances and targets are ``B x 1 x H x W`` (any matching ``B x ...`` works);
targets are binary masks in {0, 1} (float). Every loss computes in float32 even under autocast and
returns a scalar (mean over the batch).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modules.core.config import ConfigError


def _per_sample_sum(values: torch.Tensor) -> torch.Tensor:
    """``B x ...`` -> ``B``: sum over every non-batch dimension."""
    return values.flatten(1).sum(dim=1)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Per-sample soft Dice loss ``1 - (2 sum(p y) + smooth) / (sum p + sum y + smooth)`` -> ``B``.

    ``p = sigmoid(logits)``. The additive ``smooth`` keeps an empty target with an empty prediction at
    loss 0 instead of 0/0.
    """
    probs = torch.sigmoid(logits.float())
    target = target.float()
    intersection = _per_sample_sum(probs * target)
    total = _per_sample_sum(probs) + _per_sample_sum(target)
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample IoU of the mask ``logits > 0`` with ``target > 0.5`` -> ``B`` (1 when both are empty)."""
    predicted = logits > 0
    truth = target > 0.5
    intersection = _per_sample_sum(predicted & truth).float()
    union = _per_sample_sum(predicted | truth).float()
    return torch.where(union > 0, intersection / union.clamp_min(1.0), torch.ones_like(union))


class BceDiceLoss(nn.Module):
    """``BCE-with-logits (mean over pixels) + dice_lambda * soft Dice (mean over samples)``, as the seed."""

    def __init__(self, dice_lambda: float = 0.5, smooth: float = 1.0) -> None:
        super().__init__()
        self.dice_lambda = dice_lambda
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return bce + self.dice_lambda * soft_dice_loss(logits, target, self.smooth).mean()


# --------------------------------------------------------------------------- variance losses


class McLogitNoiseLoss(nn.Module):
    """Kendall & Gal (2017) learned loss attenuation for a per-pixel Bernoulli output.

    The frozen MAP logit ``z`` is corrupted with Gaussian noise of the predicted variance,
    ``z_t = z + sigma * eps_t`` with ``sigma = exp(0.5 * log_var)`` and ``eps_t ~ N(0, 1)``,
    ``t = 1..T``, and the loss is the negative log of the Monte-Carlo average likelihood,

        loss = -log( (1/T) sum_t p(y | z_t) ) = log T - logsumexp_t log p(y | z_t),

    with ``log p(y | z) = y log sigmoid(z) + (1 - y) log sigmoid(-z)`` (= -BCE), averaged over pixels
    and the batch. As sigma -> 0 it tends to the plain BCE of ``z``.

    ``seed=None`` draws the noise from the global torch generator, which the ``Trainer`` checkpoints,
    so a resumed run draws exactly the same noise; an integer seed gives the loss its own generator
    (reproducible evaluation) whose state is not saved in checkpoints.
    ``detach_logits=True`` stops gradients into ``z``: the variance net is trained on a frozen head.
    """

    def __init__(self, num_samples: int = 16, seed: int | None = None, detach_logits: bool = True) -> None:
        super().__init__()
        if num_samples < 1:
            raise ValueError(f"mc_logit_noise: num_samples must be at least 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.detach_logits = detach_logits
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def forward(self, map_logits: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = map_logits.float()
        if self.detach_logits:
            logits = logits.detach()
        log_var, target = log_var.float(), target.float()
        sigma = torch.exp(0.5 * log_var)
        noise = torch.randn(
            (self.num_samples, *logits.shape), device=logits.device, dtype=logits.dtype,
            generator=self._generator(logits.device),
        )
        return _LogitNoiseNll.apply(logits, sigma, target, noise)


class _LogitNoiseNll(torch.autograd.Function):
    """``mean( log T - logsumexp_t log p(y | z + sigma * eps_t) )`` with its gradient in closed form.

    ``z``, ``sigma``, ``y``: ``B x ...``; ``noise`` (``eps``): ``T x B x ...``; ``y`` binary.
    With ``s = 2y - 1``, ``log p(y | z) = log sigmoid(s z)``, and with ``w_t`` the softmax over t of
    the log-likelihoods, ``d nll / d z = -s sum_t w_t sigmoid(-u_t)`` and ``d nll / d sigma = -s sum_t
    w_t sigmoid(-u_t) eps_t`` (``u_t = s (z + sigma eps_t)``). The forward pass computes both, so
    autograd keeps no ``T x B x ...`` intermediates: the same loss and gradient as the plain
    expression (up to float rounding) in about half the time and a fraction of the memory.
    """

    @staticmethod
    def forward(ctx, logits, sigma, target, noise):
        sign = 2.0 * target - 1.0
        noisy = torch.addcmul(logits.unsqueeze(0), sigma.unsqueeze(0), noise).mul_(sign)  # u_t, T x B x ...
        log_likelihood = F.logsigmoid(noisy)
        log_sum = torch.logsumexp(log_likelihood, dim=0)
        nll = (math.log(noise.shape[0]) - log_sum).mean()
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # w_t sigmoid(-u_t) = exp(ll_t - log_sum) (1 - sigmoid(u_t)), in place in the T x B buffers.
            weights = log_likelihood.sub_(log_sum.unsqueeze(0)).exp_()
            weighted = weights.mul_(torch.sigmoid(noisy).neg_().add_(1.0))
            scale = sign * (-1.0 / logits.numel())
            grad_logits = weighted.sum(dim=0).mul_(scale) if ctx.needs_input_grad[0] else None
            grad_sigma = weighted.mul_(noise).sum(dim=0).mul_(scale) if ctx.needs_input_grad[1] else None
            ctx.save_for_backward(grad_logits, grad_sigma)
        return nll

    @staticmethod
    def backward(ctx, grad_output):
        grad_logits, grad_sigma = ctx.saved_tensors
        return (None if grad_logits is None else grad_logits * grad_output,
                None if grad_sigma is None else grad_sigma * grad_output, None, None)


class GaussianResidualNll(nn.Module):
    """UncertSAM's loss: ``mean( 0.5 * (exp(-s) * (sigmoid(z) - y)^2 + s) )`` with ``s = log_var``.

    A Gaussian NLL of the probability residual (constant dropped). ``z`` is detached by default,
    as for ``McLogitNoiseLoss``.
    """

    def __init__(self, detach_logits: bool = True) -> None:
        super().__init__()
        self.detach_logits = detach_logits

    def forward(self, map_logits: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = map_logits.float()
        if self.detach_logits:
            logits = logits.detach()
        log_var, target = log_var.float(), target.float()
        residual = torch.sigmoid(logits) - target
        return (0.5 * (torch.exp(-log_var) * residual.square() + log_var)).mean()


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "mc_logit_noise": McLogitNoiseLoss,
    "gaussian_residual_nll": GaussianResidualNll,
}


def build_variance_loss(name: str, **cfg) -> nn.Module:
    """``LOSSES[name](**cfg)``; an unknown name is a one-line ``ConfigError`` naming ``variance.loss``."""
    if name not in LOSSES:
        raise ConfigError(f"variance.loss: {name!r} is not one of {', '.join(LOSSES)}")
    return LOSSES[name](**cfg)


# --------------------------------------------------------------------------- refinement loss


def sigmoid_focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Per-sample focal loss (Lin et al. 2017), mean over pixels -> ``B``.

    ``FL = alpha_t (1 - p_t)^gamma BCE`` with ``p_t`` the probability of the true class and
    ``alpha_t = alpha`` on foreground, ``1 - alpha`` on background (``alpha < 0`` disables it).
    """
    logits, target = logits.float(), target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    probs = torch.sigmoid(logits)
    p_true = probs * target + (1.0 - probs) * (1.0 - target)
    loss = bce * (1.0 - p_true).pow(gamma)
    if alpha >= 0:
        loss = loss * (alpha * target + (1.0 - alpha) * (1.0 - target))
    return loss.flatten(1).mean(dim=1)


IOU_REGRESSION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": lambda predicted, actual: (predicted - actual).abs(),
    "mse": lambda predicted, actual: (predicted - actual).square(),
}


class FocalDiceIouLoss(nn.Module):
    """SAM-style refinement loss: ``focal_weight * focal + dice_weight * dice + iou_weight * IoU regression``.

    The IoU head is regressed (L1 or MSE, ``iou_loss``) onto the actual IoU of ``logits > 0`` with
    the target, which is computed without gradient. ``forward`` returns the total; ``terms`` returns
    every part (for logging).
    """

    def __init__(
        self,
        focal_weight: float = 20.0,
        dice_weight: float = 1.0,
        iou_weight: float = 1.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        iou_loss: str = "l1",
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        if iou_loss not in IOU_REGRESSION_LOSSES:
            raise ConfigError(f"iou_loss: {iou_loss!r} is not one of {', '.join(IOU_REGRESSION_LOSSES)}")
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.iou_weight = iou_weight
        self.alpha = alpha
        self.gamma = gamma
        self.iou_loss = iou_loss
        self.smooth = smooth

    def terms(self, logits: torch.Tensor, target: torch.Tensor, predicted_iou: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits``/``target`` ``B x 1 x H x W``, ``predicted_iou`` ``B`` or ``B x 1`` -> dict of scalars."""
        batch = logits.shape[0]
        predicted_iou = predicted_iou.float().reshape(batch)
        with torch.no_grad():
            actual_iou = hard_iou(logits, target)
        focal = sigmoid_focal_loss(logits, target, self.alpha, self.gamma).mean()
        dice = soft_dice_loss(logits, target, self.smooth).mean()
        iou = IOU_REGRESSION_LOSSES[self.iou_loss](predicted_iou, actual_iou).mean()
        total = self.focal_weight * focal + self.dice_weight * dice + self.iou_weight * iou
        return {"loss": total, "focal": focal, "dice": dice, "iou": iou}

    def forward(self, logits: torch.Tensor, target: torch.Tensor, predicted_iou: torch.Tensor) -> torch.Tensor:
        return self.terms(logits, target, predicted_iou)["loss"]
