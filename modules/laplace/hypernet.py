"""The hypernetwork last layer of SAM's mask decoder as a Laplace target: ``z = (W h + b) . u(pixel)``.

``W: K x J`` and ``b: K`` are the last ``nn.Linear`` of a mask token's hypernetwork MLP, ``h: J`` that
MLP's penultimate activation and ``u: K x H x W`` the upscaled decoder features. The per-pixel feature
``[vec(outer(u, h)), u]`` is too wide to materialise, so the Bernoulli GGN diagonal is computed in
its factorised closed form (``hypernet_ggn_diagonal``). ``laplace.decoder`` keys one such posterior
per mask token.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, NamedTuple

import torch

from modules.laplace.posterior import DiagonalLastLayerPosterior, LaplacePosteriorError

def hypernet_ggn_diagonal(
    upscaled: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factorised Bernoulli GGN diagonal of a hypernetwork last Linear, summed over prompts and pixels.

    upscaled: ``P x K x H x W`` per-pixel embedding ``u``; tokens: ``P x J`` hypernetwork input ``h``;
    logits: ``P x H x W`` MAP logits ``z = (W h + b) . u``.
    Returns ``(diag_W: K x J, diag_b: K)`` with ``diag_W[k, j] = sum_{p, pix} s u_k^2 h_j^2`` and
    ``diag_b[k] = sum_{p, pix} s u_k^2``, ``s = sigmoid(z) (1 - sigmoid(z))``. Cost O(P K H W + P K J)
    instead of materialising the ``K*J``-wide per-pixel feature.
    """
    curvature = torch.sigmoid(logits) * torch.sigmoid(-logits)
    weighted_u2 = torch.einsum("pkhw,phw->pk", upscaled.square(), curvature)  # P x K
    return weighted_u2.T @ tokens.square(), weighted_u2.sum(dim=0)


class HypernetInputs(NamedTuple):
    """Inputs of the hypernetwork last layer: ``upscaled: P x K x H x W`` (the per-pixel embedding ``u``)
    and ``tokens: P x J`` (the hypernetwork MLP's last hidden activation ``h``) for ``P`` prompt sets."""

    upscaled: torch.Tensor
    tokens: torch.Tensor


class HypernetPosterior(DiagonalLastLayerPosterior):
    """Diagonal posterior over the hypernetwork's last Linear, ``z = (W h + b) . u(pixel)``.

    Flattened weights are ``[vec(W) (row-major, K*J), b (K)]``. Logit variance
    ``v = sum_{k,j} var(W_kj) u_k^2 h_j^2 + sum_k var(b_k) u_k^2``. Inputs are ``HypernetInputs``;
    outputs are ``P x H x W`` (``S x P x H x W`` for samples).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        weight_variance: torch.Tensor,
        bias_variance: torch.Tensor,
        prior_precision: float,
    ):
        if (
            weight.ndim != 2
            or tuple(bias.shape) != (weight.shape[0],)
            or weight_variance.shape != weight.shape
            or bias_variance.shape != bias.shape
        ):
            raise LaplacePosteriorError(
                f"hypernet posterior: need W (K x J), b (K) and variances of the same shapes, got "
                f"{tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(weight_variance.shape)}, {tuple(bias_variance.shape)}"
            )
        self.out_features, self.in_features = weight.shape
        self.weight_mean = torch.cat([weight.detach().reshape(-1), bias.detach()]).float()
        self.weight_variance = (
            torch.cat([weight_variance.detach().reshape(-1), bias_variance.detach()])
            .float()
            .to(self.weight_mean.device)
        )
        self.prior_precision = float(prior_precision)

    @classmethod
    def from_ggn(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor,
        ggn_weight: torch.Tensor,
        ggn_bias: torch.Tensor,
        prior_precision: float,
    ) -> "HypernetPosterior":
        """Posterior variances ``1 / (GGN diagonal + prior precision)`` (the laplace-torch diag posterior, T = 1)."""
        if prior_precision <= 0:
            raise LaplacePosteriorError(
                f"laplace.prior_precision_grid: prior precision must be positive, got {prior_precision}"
            )
        return cls(
            weight,
            bias,
            1.0 / (ggn_weight + prior_precision),
            1.0 / (ggn_bias + prior_precision),
            prior_precision,
        )

    def _split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``... x (K*J + K)`` -> (``... x K x J``, ``... x K``)."""
        count = self.out_features * self.in_features
        weight = flat[..., :count].reshape(*flat.shape[:-1], self.out_features, self.in_features)
        return weight, flat[..., count:]

    def prepare(self, inputs: HypernetInputs) -> HypernetInputs:
        upscaled = inputs.upscaled.to(device=self.device, dtype=torch.float32)
        tokens = inputs.tokens.to(device=self.device, dtype=torch.float32)
        if (
            upscaled.ndim != 4
            or tokens.ndim != 2
            or upscaled.shape[:2] != (tokens.shape[0], self.out_features)
            or tokens.shape[1] != self.in_features
        ):
            raise LaplacePosteriorError(
                f"hypernet inputs: need upscaled P x {self.out_features} x H x W and tokens P x {self.in_features}, "
                f"got {tuple(upscaled.shape)} and {tuple(tokens.shape)}"
            )
        return HypernetInputs(upscaled, tokens)

    def logit_moments(self, prepared: HypernetInputs) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self._split(self.weight_mean)
        weight_var, bias_var = self._split(self.weight_variance)
        with torch.autocast(device_type=self.device.type, enabled=False):
            hyper = prepared.tokens @ weight.T + bias  # P x K
            logit_mean = torch.einsum("pkhw,pk->phw", prepared.upscaled, hyper)
            per_channel_var = prepared.tokens.square() @ weight_var.T + bias_var  # P x K
            logit_var = torch.einsum("pkhw,pk->phw", prepared.upscaled.square(), per_channel_var)
        return logit_mean, logit_var

    def logits_for_weights(self, prepared: HypernetInputs, weights: torch.Tensor) -> torch.Tensor:
        weight, bias = self._split(weights)  # S x K x J, S x K
        with torch.autocast(device_type=self.device.type, enabled=False):
            hyper = torch.einsum("skj,pj->spk", weight, prepared.tokens) + bias[:, None, :]
            return torch.einsum("spk,pkhw->sphw", hyper, prepared.upscaled)

    def state_dict(self) -> dict[str, torch.Tensor | float]:
        """Tensors and the prior precision only (loadable with ``torch.load(weights_only=True)``)."""
        weight, bias = self._split(self.weight_mean)
        weight_var, bias_var = self._split(self.weight_variance)
        return {
            "weight": weight,
            "bias": bias,
            "weight_variance": weight_var,
            "bias_variance": bias_var,
            "prior_precision": self.prior_precision,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "HypernetPosterior":
        return cls(
            state["weight"],
            state["bias"],
            state["weight_variance"],
            state["bias_variance"],
            state["prior_precision"],
        )


def hypernet_ggn_from_batches(
    weight: torch.Tensor, bias: torch.Tensor, batches: Iterable[HypernetInputs]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum the factorised GGN diagonal over training batches at the MAP ``(W: K x J, b: K)``.

    Returns ``(ggn_weight: K x J, ggn_bias: K, n_pixels)``; targets are not needed (the GGN of the
    Bernoulli likelihood does not depend on them).
    """
    ggn_weight = torch.zeros_like(weight, dtype=torch.float32)
    ggn_bias = torch.zeros_like(bias, dtype=torch.float32)
    n_pixels = 0
    with torch.no_grad():
        for inputs in batches:
            upscaled = inputs.upscaled.to(device=weight.device, dtype=torch.float32)
            tokens = inputs.tokens.to(device=weight.device, dtype=torch.float32)
            logits = torch.einsum("pkhw,pk->phw", upscaled, tokens @ weight.float().T + bias.float())
            batch_weight, batch_bias = hypernet_ggn_diagonal(upscaled, tokens, logits)
            ggn_weight += batch_weight
            ggn_bias += batch_bias
            n_pixels += logits.numel()
    return ggn_weight, ggn_bias, n_pixels

