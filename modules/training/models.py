"""The small trainable networks that sit on top of frozen, cached SAM outputs.

All tensors are in the 256 x 256 "logit frame": SAM's low-resolution logits are upsampled/downsampled
to H x W = 256 x 256 (any H x W works; the networks are fully convolutional), and the prompt maps
are rendered in that same frame.

- ``PromptAwareHead``: the BALD-SAM corrective head. Input ``B x 3 x H x W`` = (SAM logits clipped to
  [-clip, clip], positive prompt map in [0, 1], negative prompt map in [0, 1]); output refined
  logits ``B x 1 x H x W``. Its last layer is the 1x1 conv ``final_conv`` on which the last-layer
  Laplace approximation is fitted. With ``residual=True`` the SAM logit is also an input of
  ``final_conv`` (weight 1, every other weight 0 at initialisation): an untrained head is raw SAM.
- ``VarianceNetwork``: a heteroscedastic (aleatoric) branch trained on a frozen MAP head. Input
  ``B x 4 x H x W`` = the head's three input channels plus the MAP head's logit; output the
  per-pixel log-variance of that logit, ``B x 1 x H x W``.
- ``UncertaintyFusion``: embeds an uncertainty map at SAM's dense-prompt resolution and fuses it
  with the mask embedding (``uncertainty.fusion`` runs the refinement pass around it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

FINAL_LAYER_NAME = "final_conv"


class PromptAwareHead(nn.Module):
    """Conv(3x3)+ReLU, Conv(3x3)+ReLU, Conv(1x1) -> one logit per pixel (the BALD-SAM seed head).

    With ``residual=True``, ``features`` appends the input's channel 0 (the clipped SAM logit) to the
    hidden features, so ``final_conv`` sees ``hidden + 1`` channels and the head computes
    ``a * sam_logit + w . hidden + b``. It starts at ``a = 1, w = 0, b = 0``, i.e. exactly raw SAM,
    and training learns a correction; the last-layer Laplace posterior then also covers ``a``, the
    trust in SAM's own logit.

    With ``use_image_embedding=True`` the cached SAM image embedding ``B x embedding_channels x
    h x w`` (``256 x 64 x 64`` for SAM v1) is reduced by a 1x1 conv to ``embedding_proj_channels``,
    upsampled bilinearly to the input's H x W and concatenated to the input channels before the
    first conv.
    """

    def __init__(
        self,
        channels_in: int = 3,
        hidden_channels: int = 16,
        use_image_embedding: bool = False,
        embedding_channels: int = 256,
        embedding_proj_channels: int = 8,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.channels_in = channels_in
        self.hidden_channels = hidden_channels
        self.use_image_embedding = use_image_embedding
        self.residual = residual
        first_in = channels_in
        if use_image_embedding:
            self.embedding_proj = nn.Conv2d(embedding_channels, embedding_proj_channels, kernel_size=1)
            first_in += embedding_proj_channels
        self.conv1 = nn.Conv2d(first_in, hidden_channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1)
        self.final_conv = nn.Conv2d(hidden_channels + int(residual), 1, kernel_size=1)
        if residual:
            with torch.no_grad():
                self.final_conv.weight.copy_(self._identity_weight())
                self.final_conv.bias.zero_()

    def _identity_weight(self) -> torch.Tensor:
        """``final_conv``'s ``1 x (hidden + 1) x 1 x 1`` weight of raw SAM: 1 on the SAM logit, 0 elsewhere."""
        weight = torch.zeros_like(self.final_conv.weight)
        weight[0, self.hidden_channels] = 1.0
        return weight

    def identity_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (a state dict of this head) with ``final_conv`` set to raw SAM (``a = 1, w = 0,
        b = 0``): the head then outputs the clipped SAM logit exactly, whatever its hidden layers
        hold (kept, so a last-layer Laplace posterior still sees the trained features)."""
        return self.blended_state(state, 0.0)

    def blended_state(self, state: dict[str, torch.Tensor], weight: float) -> dict[str, torch.Tensor]:
        """``state`` with only a fraction ``weight`` in [0, 1] of its learned correction: ``final_conv``
        becomes ``weight * trained + (1 - weight) * identity``, so the head outputs ``sam_logit +
        weight * (trained_output - sam_logit)``; ``weight`` 0 is raw SAM exactly (``identity_state``),
        1 the trained head exactly. Still one last layer over the same features (Laplace-ready)."""
        if not self.residual:
            raise ValueError("head: only a residual head (head.residual) can be made raw SAM or blended with it")
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"head: a blend weight must lie in [0, 1], got {weight}")
        trained_weight = state[f"{FINAL_LAYER_NAME}.weight"]
        identity_weight = self._identity_weight().to(trained_weight)
        blended = dict(state)
        blended[f"{FINAL_LAYER_NAME}.weight"] = weight * trained_weight + (1.0 - weight) * identity_weight
        blended[f"{FINAL_LAYER_NAME}.bias"] = weight * state[f"{FINAL_LAYER_NAME}.bias"]
        return blended

    def features(self, x: torch.Tensor, image_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Everything before ``final_conv``: ``B x channels_in x H x W`` -> ``B x F x H x W``, with
        ``F = hidden`` (+ 1: the SAM logit channel, last, when ``residual``)."""
        if x.ndim != 4 or x.shape[1] != self.channels_in:
            raise ValueError(f"head input: expected B x {self.channels_in} x H x W, got {tuple(x.shape)}")
        if self.use_image_embedding and image_embedding is None:
            raise ValueError("head: use_image_embedding=True but no image_embedding was passed")
        if not self.use_image_embedding and image_embedding is not None:
            raise ValueError("head: an image_embedding was passed but use_image_embedding=False")
        sam_logit = x[:, :1]
        if self.use_image_embedding:
            projected = self.embedding_proj(image_embedding.to(x.dtype))
            projected = F.interpolate(projected, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, projected], dim=1)
        hidden = F.relu(self.conv2(F.relu(self.conv1(x))))
        return torch.cat([hidden, sam_logit], dim=1) if self.residual else hidden

    def forward(self, x: torch.Tensor, image_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """``B x channels_in x H x W`` (+ optional ``B x E x h x w`` embedding) -> logits ``B x 1 x H x W``."""
        return self.final_conv(self.features(x, image_embedding))


def soft_clamp(values: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Smoothly squash ``values`` into (low, high): ``centre + half * tanh((v - centre) / half)``.

    Unlike a hard clamp, the gradient never becomes exactly zero, so a variance network whose output
    saturates can still learn its way back; the slope is 1 at the centre of the range.
    """
    centre = 0.5 * (low + high)
    half = 0.5 * (high - low)
    return centre + half * torch.tanh((values - centre) / half)


class VarianceNetwork(nn.Module):
    """Per-pixel log-variance of the MAP head's logit (heteroscedastic / aleatoric uncertainty).

    Input ``B x channels_in x H x W``: the head's input channels followed by the frozen MAP head's
    logit (see ``build_inputs``). Output ``B x 1 x H x W`` log-variance ``s`` (of the logit, in
    logit units squared), soft-clamped into ``log_var_clamp`` (default (-5, 5), as UncertSAM's hard
    clamp). The final conv starts at zero weight with its bias set so that every pixel starts at
    ``initial_log_var``: training begins from a homoscedastic model.
    """

    def __init__(
        self,
        channels_in: int = 4,
        hidden_channels: int = 16,
        log_var_clamp: tuple[float, float] = (-5.0, 5.0),
        initial_log_var: float = 0.0,
    ) -> None:
        super().__init__()
        low, high = float(log_var_clamp[0]), float(log_var_clamp[1])
        if not low < initial_log_var < high:
            raise ValueError(f"variance network: initial_log_var {initial_log_var} outside log_var_clamp {log_var_clamp}")
        self.channels_in = channels_in
        self.log_var_min = low
        self.log_var_max = high
        self.conv1 = nn.Conv2d(channels_in, hidden_channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden_channels, hidden_channels, kernel_size=3, padding=1)
        self.final_conv = nn.Conv2d(hidden_channels, 1, kernel_size=1)
        centre, half = 0.5 * (low + high), 0.5 * (high - low)
        with torch.no_grad():
            self.final_conv.weight.zero_()
            self.final_conv.bias.fill_(centre + half * float(torch.atanh(torch.tensor((initial_log_var - centre) / half))))

    @staticmethod
    def build_inputs(head_inputs: torch.Tensor, map_logits: torch.Tensor) -> torch.Tensor:
        """Concatenate ``B x C x H x W`` head inputs and ``B x 1 x H x W`` MAP logits -> ``B x (C+1) x H x W``."""
        return torch.cat([head_inputs, map_logits.to(head_inputs.dtype)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x channels_in x H x W`` -> log-variance ``B x 1 x H x W`` in (log_var_min, log_var_max)."""
        if x.ndim != 4 or x.shape[1] != self.channels_in:
            raise ValueError(f"variance network input: expected B x {self.channels_in} x H x W, got {tuple(x.shape)}")
        hidden = F.relu(self.conv2(F.relu(self.conv1(x))))
        return soft_clamp(self.final_conv(hidden), self.log_var_min, self.log_var_max)


class UncertaintyFusion(nn.Module):
    """``forward(mask_embedding P x E x 64 x 64, uncertainty P x 1 x 256 x 256) -> P x E x 64 x 64``.

    ``uncertainty`` is in the model's low-res mask frame (``Backbone.from_frame256`` with padding 0).
    """

    def __init__(self, embed_dim: int = 256, hidden_channels: int = 16):
        super().__init__()
        quarter = max(1, hidden_channels // 4)
        self.uncertainty_downscaling = nn.Sequential(
            nn.Conv2d(1, quarter, kernel_size=2, stride=2),
            LayerNorm2d(quarter),
            nn.GELU(),
            nn.Conv2d(quarter, hidden_channels, kernel_size=2, stride=2),
            LayerNorm2d(hidden_channels),
            nn.GELU(),
            nn.Conv2d(hidden_channels, embed_dim, kernel_size=1),
        )
        self.fuse = nn.Conv2d(2 * embed_dim, embed_dim, kernel_size=1)
        with torch.no_grad():
            self.fuse.weight.zero_()
            self.fuse.weight[:, :embed_dim, 0, 0] = torch.eye(embed_dim)
            self.fuse.bias.zero_()

    def forward(self, mask_embedding: torch.Tensor, uncertainty: torch.Tensor) -> torch.Tensor:
        uncertainty_embedding = self.uncertainty_downscaling(uncertainty)
        return self.fuse(torch.cat([mask_embedding, uncertainty_embedding], dim=1))
