"""How a frozen image encoder runs: ``sam.encoder_impl`` (reference | fast) and ``sam.compile_encoder``.

The fast path changes how the loaded encoder computes, not what: the same checkpoint goes through
the same loader into the same ``segment_anything`` / ``sam2`` modules, and the fast path then

- SAM v1: turns each image-encoder ``Attention`` into ``SdpaRelPosAttention`` in place (same
  parameters, same state dict), which calls ``F.scaled_dot_product_attention`` with the decomposed
  relative-position bias as an additive mask instead of materialising and soft-maxing the
  attention matrix by hand. SAM 2's Hiera and SAM 3's ViT already call scaled-dot-product
  attention, so nothing is swapped there;
- stores the encoder's convolution weights and its input channels-last (the patch embedding and
  the neck: their outputs are permuted to ``B x H x W x C`` anyway);
- with ``compile``: runs the family's whole encode step through ``torch.compile`` with static
  shapes, every batch padded (with zero images) or split to ``sam.encoder_batch_size`` images, so
  one graph serves every call. Compilation happens on the first call of a process.

bf16 is not part of the switch: every CUDA encode already runs under bf16 autocast
(``core.device.inference_autocast``), whichever impl.

``sam.encoder_int8`` (off by default) stores every ``nn.Linear`` weight of the image encoder as int8
with one scale per output channel (``Int8WeightOnlyLinear``, segment-anything-fast's weight-only
scheme: a compiled graph fuses the int8 -> bf16 cast into the matmul, so the weights cross memory at
a quarter of their float32 size). Unlike the impl, it changes the features beyond float tolerance,
so a cache made with it is a different input (stage 3 records it), and it is applied once, at load.

``auto`` (the default of both keys) means the fast impl, compiled, on CUDA and the reference impl,
not compiled, elsewhere.
"""

# ``rel_pos_bias`` and ``SdpaRelPosAttention.forward`` are adapted from segment-anything
# (segment_anything/modeling/image_encoder.py, ``Attention.forward`` and ``add_decomposed_rel_pos``):
# Copyright (c) Meta Platforms, Inc. and affiliates. Licensed under the Apache License, Version 2.0
# (http://www.apache.org/licenses/LICENSE-2.0); distributed on an "AS IS" BASIS, WITHOUT WARRANTIES
# OR CONDITIONS OF ANY KIND. Changes: the bias is returned instead of added to an attention matrix,
# and the attention is computed by scaled_dot_product_attention.

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Union

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn

from modules.core.errors import PipelineError

Features = dict[str, torch.Tensor]


class EncoderSettingsError(PipelineError, ValueError):
    """A bad ``sam.encoder_impl`` / ``sam.compile_encoder`` / batch size given to the loader (one line)."""


# ----------------------------------------------------------------------------------------------
# SAM v1: attention through scaled_dot_product_attention
# ----------------------------------------------------------------------------------------------


def rel_pos_bias(query: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                 q_size: tuple[int, int], k_size: tuple[int, int]) -> torch.Tensor:
    """SAM's decomposed relative-position term as an additive attention mask.

    ``query``: ``B x heads x (q_h * q_w) x C`` (unscaled, as upstream uses it); ``rel_pos_h``,
    ``rel_pos_w``: ``(2 * size - 1) x C``. Returns ``B x heads x (q_h * q_w) x (k_h * k_w)`` in
    ``query``'s dtype: ``bias[.., (y, x), (y', x')] = q . R_h[y, y'] + q . R_w[x, x']``, the
    two einsums of upstream ``add_decomposed_rel_pos``.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    rel_h_table = get_rel_pos(q_h, k_h, rel_pos_h)  # q_h x k_h x C
    rel_w_table = get_rel_pos(q_w, k_w, rel_pos_w)  # q_w x k_w x C
    batch, heads, _, dim = query.shape
    grid_query = query.reshape(batch, heads, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, rel_h_table)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, rel_w_table)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # B x heads x q_h x q_w x k_h x k_w
    return bias.reshape(batch, heads, q_h * q_w, k_h * k_w).to(query.dtype)


class SdpaRelPosAttention(Attention):
    """``segment_anything``'s image-encoder ``Attention`` with its forward on scaled-dot-product attention.

    Replaces the body of upstream ``Attention.forward`` from ``attn = (q * self.scale) @
    k.transpose(-2, -1)`` to ``attn @ v``: the matrix product, ``add_decomposed_rel_pos`` and the
    softmax. Upstream writes a ``(B * heads) x N x N`` attention matrix (N = 4096 tokens in the
    global layers of ViT-H) and reads it back three times; ``F.scaled_dot_product_attention``
    runs a fused kernel that takes the relative-position term as an additive mask
    (``rel_pos_bias``), as segment-anything-fast does. Same parameters and state-dict keys: a
    loaded ``Attention`` becomes one by a class change (``ModuleSwap``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x H x W x dim`` tokens (a window or the whole map) -> ``B x H x W x dim``."""
        batch, height, width, _ = x.shape
        qkv = self.qkv(x).reshape(batch, height * width, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # B x heads x HW x head_dim each
        bias = None
        if self.use_rel_pos:
            bias = rel_pos_bias(query, self.rel_pos_h, self.rel_pos_w, (height, width), (height, width))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, height, width, -1))


@dataclass(frozen=True)
class ModuleSwap:
    """A module class of the reference encoder and its fast twin (same parameters, other forward)."""

    reference: type[nn.Module]
    fast: type[nn.Module]

    def apply(self, encoder: nn.Module, fast: bool) -> int:
        """Give every matching submodule of ``encoder`` the fast (or back the reference) class, in
        place; returns how many changed."""
        source, target = (self.reference, self.fast) if fast else (self.fast, self.reference)
        changed = 0
        for module in encoder.modules():
            if type(module) is source:
                module.__class__ = target
                changed += 1
        return changed


SAM_V1_SDPA_ATTENTION = ModuleSwap(Attention, SdpaRelPosAttention)


class Int8WeightOnlyLinear(nn.Module):
    """An ``nn.Linear`` whose weight is stored as int8, symmetric per output channel.

    ``weight_int8``: ``out x in`` int8 with ``weight ~ weight_int8 * scale[:, None]``, ``scale = max
    |weight row| / 127`` (a zero row keeps scale 1); ``forward`` computes ``(x @ weight_int8^T) *
    scale + bias`` in ``x``'s dtype (bf16 under CUDA autocast), ``... x in`` -> ``... x out``.
    """

    def __init__(self, weight_int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight_int8.shape[1], weight_int8.shape[0]
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8WeightOnlyLinear":
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        weight_int8 = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().float()
        return cls(weight_int8, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight_int8.to(x.dtype))
        out = out * self.scale.to(out.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def quantize_linear_weights(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` by its ``Int8WeightOnlyLinear``, in place (on the
    layer's device); returns how many were replaced."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8WeightOnlyLinear.from_linear(child).to(child.weight.device))
                replaced += 1
    return replaced


def set_conv_memory_format(encoder: nn.Module, channels_last: bool) -> None:
    """Store the 2-D convolution weights of ``encoder`` channels-last (or back contiguous)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in encoder.modules():
        if isinstance(module, nn.Conv2d):
            module.to(memory_format=memory_format)


# ----------------------------------------------------------------------------------------------
# The settings and their resolution
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderImpl:
    """What one ``sam.encoder_impl`` does to the loaded encoder."""

    sdpa_attention: bool  # apply the family's ``ModuleSwap``s (hand-written attention -> SDPA)
    channels_last: bool  # conv weights and encoder input channels-last
    compile_by_default: bool  # ``sam.compile_encoder: auto`` compiles it on CUDA


#: ``sam.encoder_impl`` -> what it does (``auto`` resolves to one of these per device).
ENCODER_IMPLS: dict[str, EncoderImpl] = {
    "reference": EncoderImpl(sdpa_attention=False, channels_last=False, compile_by_default=False),
    "fast": EncoderImpl(sdpa_attention=True, channels_last=True, compile_by_default=True),
}
#: The impl ``auto`` resolves to, per ``torch.device.type``; any other type gets ``reference``.
AUTO_IMPL_BY_DEVICE: dict[str, str] = {"cuda": "fast"}
#: Device types on which ``sam.compile_encoder: auto`` compiles (a CPU pays minutes of inductor
#: compilation for little gain on the demo's short runs).
AUTO_COMPILE_DEVICES = ("cuda",)


@dataclass(frozen=True)
class EncoderSettings:
    """The config's ``sam.encoder_impl``, ``sam.compile_encoder``, ``sam.encoder_batch_size`` and
    ``sam.encoder_int8``."""

    impl: str = "auto"
    compile: Union[bool, str] = "auto"
    batch_size: int = 4
    int8: bool = False

    def resolve(self, device: torch.device) -> ResolvedEncoder:
        """The concrete impl and compile flag on ``device`` (one-line error naming the key at fault)."""
        impl = AUTO_IMPL_BY_DEVICE.get(device.type, "reference") if self.impl == "auto" else self.impl
        if impl not in ENCODER_IMPLS:
            raise EncoderSettingsError(f"sam.encoder_impl: unknown encoder impl {self.impl!r}; "
                                       f"expected 'auto' or one of {sorted(ENCODER_IMPLS)}")
        if self.compile == "auto":
            compiled = ENCODER_IMPLS[impl].compile_by_default and device.type in AUTO_COMPILE_DEVICES
        elif isinstance(self.compile, bool):
            compiled = self.compile
        else:
            raise EncoderSettingsError(f"sam.compile_encoder: expected 'auto', true or false, got {self.compile!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise EncoderSettingsError(f"sam.encoder_batch_size: must be an integer of at least 1, got {self.batch_size!r}")
        if not isinstance(self.int8, bool):
            raise EncoderSettingsError(f"sam.encoder_int8: expected true or false, got {self.int8!r}")
        return ResolvedEncoder(impl, compiled, self.batch_size if compiled else None, self.int8)


@dataclass(frozen=True)
class ResolvedEncoder:
    """``impl``: a key of ``ENCODER_IMPLS``; ``compiled``: run through ``torch.compile``;
    ``static_batch``: the batch every compiled call is padded or split to (None when not compiled);
    ``int8``: the encoder's linear weights are int8 (``Int8WeightOnlyLinear``)."""

    impl: str
    compiled: bool
    static_batch: int | None
    int8: bool = False

    def describe(self) -> str:
        compiled = f", compiled at batch {self.static_batch}" if self.compiled else ""
        return f"{self.impl}{compiled}{', int8 weights' if self.int8 else ''}"


# ----------------------------------------------------------------------------------------------
# Running an encode step
# ----------------------------------------------------------------------------------------------


class EncoderRunner:
    """Runs a family's encode step (``B x 3 x S x S`` -> ``name -> B x C x h x w``) as resolved.

    ``channels_last``: the images are handed over channels-last. ``static_batch``: the step is
    always called on that many images: a batch is split into chunks of it and the last chunk
    padded with zero images, whose outputs are dropped (every image is encoded independently, so
    padding does not change the others). ``compiled``: the step runs through ``torch.compile``
    (``dynamic=False``: with a static batch, one graph for every call).
    """

    def __init__(self, encode_batch: Callable[[torch.Tensor], Features], channels_last: bool,
                 static_batch: int | None, compiled: bool) -> None:
        self.eager_step = encode_batch
        self.channels_last = channels_last
        self.static_batch = static_batch
        self.step = torch.compile(encode_batch, dynamic=False) if compiled else encode_batch
        self._eager = False

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Run uncompiled and unpadded inside the block (e.g. to count FLOP with a dispatch mode)."""
        previous, self._eager = self._eager, True
        try:
            yield
        finally:
            self._eager = previous

    def _prepared(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def __call__(self, images: torch.Tensor) -> Features:
        if self._eager:
            return self.eager_step(self._prepared(images))
        if self.static_batch is None:
            return self.step(self._prepared(images))
        size = self.static_batch
        chunks = []
        for start in range(0, images.shape[0], size):
            chunk = images[start:start + size]
            count = chunk.shape[0]
            if count < size:
                chunk = F.pad(chunk, (0, 0, 0, 0, 0, 0, 0, size - count))
            outputs = self.step(self._prepared(chunk))
            chunks.append({name: value[:count] for name, value in outputs.items()})
        if len(chunks) == 1:
            return chunks[0]
        return {name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]}
