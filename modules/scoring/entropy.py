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
    ``binary_entropy(sigmoid(z))`` rounds to exactly 0 in float32. Half precision is computed in
    float32, float64 in float64.
    """
    magnitude = logits.to(torch.promote_types(logits.dtype, torch.float32)).abs()  # float64 stays float64
    return F.softplus(-magnitude) + magnitude * torch.sigmoid(-magnitude)

