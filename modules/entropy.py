"""Bernoulli entropies in nats, shared by every module that turns probabilities into uncertainty."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def binary_entropy(probability: torch.Tensor) -> torch.Tensor:
    """Entropy of Bernoulli(p) in nats, elementwise.

    Safe for every input: ``p`` is clamped to [0, 1] (float rounding can leave it a hair outside) and
    ``xlogy`` gives ``0 * log 0 = 0``, so the entropy is exactly 0 at 0 and 1 and never NaN.
    """
    probability = probability.clamp(0.0, 1.0)
    return -(torch.special.xlogy(probability, probability) + torch.special.xlogy(1.0 - probability, 1.0 - probability))


def binary_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of Bernoulli(sigmoid(z)) in nats: ``softplus(-|z|) + |z| * sigmoid(-|z|)``.

    The entropy is symmetric in ``z``; evaluating it at ``-|z|`` avoids the cancellation of
    ``softplus(z) - z * sigmoid(z)`` for large positive ``z``. Preferred where logits exist: it keeps
    the tiny entropies of confident pixels (``|z| = 20`` gives about 4e-8 nats) that
    ``binary_entropy(sigmoid(z))`` rounds to exactly 0 in float32.
    """
    magnitude = logits.float().abs()
    return F.softplus(-magnitude) + magnitude * torch.sigmoid(-magnitude)


#: Below this |x|, ``kl_excess`` uses its Taylor series (the closed form cancels to ~2 eps / |x|).
_KL_SERIES_BELOW = 0.05


def kl_excess(x: torch.Tensor) -> torch.Tensor:
    """``(1 + x) log(1 + x) - x`` for ``x >= -1``, accurate to float rounding also for tiny ``|x|``.

    With ``p = q + e``: ``KL(Bern(p) || Bern(q)) = q * kl_excess(e / q) + (1 - q) * kl_excess(-e / (1 - q))``,
    which stays accurate when ``p`` and ``q`` agree to many digits (there the direct formula's
    first-order terms cancel and leave rounding noise). For ``|x| < 0.05`` the series
    ``sum_{n>=2} (-1)^n x^n / (n (n - 1))`` up to ``x^7`` is used (relative error < 1e-9).
    """
    x = x.clamp_min(-1.0)
    direct = torch.where(x > -1.0, (1.0 + x) * torch.log1p(x), torch.zeros_like(x)) - x  # limit 1 at x = -1
    series = x.square() * (1 / 2 + x * (-1 / 6 + x * (1 / 12 + x * (-1 / 20 + x * (1 / 30 - x / 42)))))
    return torch.where(x.abs() < _KL_SERIES_BELOW, series, direct)


def sigmoid_shift(logits: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``sigmoid(logits + shift) - sigmoid(logits)`` with full relative precision for small ``shift``:
    ``sigmoid(z + d) * sigmoid(-z) * (1 - exp(-d))`` (exact identity, no cancellation)."""
    return torch.sigmoid(logits + shift) * torch.sigmoid(-logits) * -torch.expm1(-shift)
