"""The frozen SAM backbone interface (``Backbone``) and the encode/decode logic all families share.

Frames (all coordinates are pixels, x = column, y = row, origin at the top-left corner):

- ORIGINAL: the image as read, ``H x W``. Prompts (points, boxes) are always given in it.
- INPUT: the encoder input, ``S x S`` with ``S = backbone.image_size``. SAM v1 resizes the
  longest side to ``S`` keeping the aspect ratio and pads bottom/right with zeros; SAM 2
  stretches the image to ``S x S``.
- FRAME256: the project's common frame for logits: the ORIGINAL image stretched to
  ``256 x 256`` (``x256 = x * 256 / W``, ``y256 = y * 256 / H``). Every ``decode`` output and
  every ``mask_input`` is in FRAME256, whatever the family.

On CUDA the encoder and decoder run under bf16 autocast with TF32 enabled; on CPU in float32.
Outputs are always float32. How the encoder runs (reference or fast impl, compiled or not) is set by
``Backbone.configure_encoder`` (``fast_encoder``); how many prompt sets one mask-decoder call takes
by ``Backbone.configure_decoder`` (``sam.decoder_batch``).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modules.core.device import inference_autocast
from modules.core.errors import PipelineError
from modules.core.fileio import cached_file_md5
from modules.core.frames import FRAME256
from modules.sam.fast_encoder import (ENCODER_IMPLS, EncoderRunner, EncoderSettings, EncoderSettingsError, ModuleSwap,
                                      ResolvedEncoder, quantize_linear_weights, set_conv_memory_format)
from modules.sam.prompting import Prompts

if TYPE_CHECKING:
    from modules.sam.preprocessing import SplitPreprocessor

#: Logit written into the padded (outside-the-image) part of SAM v1's low-res mask input. SAM's
#: own low-res predictions there are confident background, so a strongly negative logit keeps a
#: FRAME256 mask input in distribution. It is within SAM 2's clamp range [-32, 32].
MASK_INPUT_PAD_LOGIT = -20.0
#: Prompt sets per mask-decoder call on the CPU under ``sam.decoder_batch: auto``: a larger call's
#: activations outgrow the CPU's caches and each prompt set costs more (benchmarks/README.md,
#: "Mask-decoder calls on the CPU"); a GPU takes them all in one call.
CPU_DECODER_BATCH = 4


class BackboneError(PipelineError, ValueError):
    """A backbone could not be built or loaded, or was given malformed input (one-line message)."""


def resolve_decoder_batch(setting: str | int, device: torch.device) -> int:
    """``sam.decoder_batch`` on ``device`` -> prompt sets per mask-decoder call (0 = all at once):
    ``auto`` is ``CPU_DECODER_BATCH`` on the CPU and 0 elsewhere. One-line error for a bad value."""
    if setting == "auto":
        return CPU_DECODER_BATCH if torch.device(device).type == "cpu" else 0
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise BackboneError(f"sam.decoder_batch: must be 'auto' or an integer of at least 0 (0 = all prompt sets "
                            f"in one call), got {setting!r}")
    return setting


def grad_mode(enable_grad: bool) -> contextlib.AbstractContextManager:
    """``inference_mode`` normally; autograd on when a trainable module feeds the frozen decoder
    (the weights stay frozen, gradients flow to the inputs such as a dense embedding)."""
    return torch.enable_grad() if enable_grad else torch.inference_mode()


#: Files of a Hugging Face model folder that make up the model (config, weights, shard index).
_MODEL_FOLDER_SUFFIXES = (".json", ".safetensors", ".bin")


def checkpoint_md5(path: str | os.PathLike) -> str:
    """MD5 of a checkpoint file, read in chunks and cached per process by (path, size, mtime).

    For a Hugging Face model folder: the MD5 of its ``.json`` / ``.safetensors`` / ``.bin``
    files' names and MD5s, so any changed config or weight file changes it.
    """
    path = Path(path)
    if not path.is_dir():
        return cached_file_md5(path)
    digest = hashlib.md5()
    for member in sorted(path.iterdir()):
        if member.suffix in _MODEL_FOLDER_SUFFIXES and member.is_file():
            digest.update(f"{member.name}:{cached_file_md5(member)}\n".encode())
    return digest.hexdigest()


def bilinear_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """``size_out x size_in`` float64 matrix of 1-D bilinear resampling (align_corners=False)."""
    identity = torch.eye(size_in, dtype=torch.float64).view(1, size_in, size_in, 1)
    resampled = F.interpolate(identity, (size_out, 1), mode="bilinear", align_corners=False)
    return resampled.view(size_in, size_out).T.contiguous()


def checked_hw(original_hw) -> tuple[int, int]:
    """``original_hw`` as two positive ints ``(H, W)``."""
    height, width = (int(v) for v in original_hw)
    if height < 1 or width < 1:
        raise BackboneError(f"original_hw must be two positive ints (H, W), got {original_hw!r}")
    return height, width


# ----------------------------------------------------------------------------------------------
# Decoder outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class DecoderFeatures:
    """The mask decoder's last layer, unrolled, for the selected outputs.

    For prompt set ``p`` and output ``m`` with mask token ``t = token_indices[p, m]``:
    ``logits[p, m] = (W_t @ hyper_hidden[p, m] + b_t) . upscaled_features[p]`` (a dot product
    over the ``C_up`` channels at every pixel), where ``W_t``, ``b_t`` are the weight and bias of
    ``final_layers[t]``, the last ``nn.Linear`` of the hypernetwork MLP of mask token ``t``.

    - ``logits``: ``P x M x 256 x 256`` float32, FRAME256 (unclamped).
    - ``iou_predictions``: ``P x M``.
    - ``upscaled_features``: ``P x C_up x 256 x 256`` float32 in FRAME256 (``C_up = 32``). For
      SAM v1 they are resampled with the same linear map as the logits, so the identity above
      holds exactly in FRAME256.
    - ``hyper_hidden``: ``P x M x D`` the hypernetwork MLP's penultimate activation (``D = 256``).
    - ``token_indices``: ``P x M`` int64, the mask token of each output (0 = single-mask token,
      1..3 = multimask tokens). SAM 2's single-mask output may fall back to a multimask token
      per prompt set (``dynamic_multimask_via_stability``), hence per prompt set.
    - ``final_layers``: for every mask token ``t`` (all of them), the hypernetwork's last
      ``nn.Linear`` (``D -> C_up``); the live, frozen module of the backbone.
    """

    logits: torch.Tensor
    iou_predictions: torch.Tensor
    upscaled_features: torch.Tensor
    hyper_hidden: torch.Tensor
    token_indices: torch.Tensor
    final_layers: tuple[nn.Linear, ...]

    def logits_from_hidden(self, hyper_hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``P x M x 256 x 256`` from a (perturbed) ``P x M x D`` hypernetwork hidden."""
        weights = torch.stack([layer.weight.float() for layer in self.final_layers])  # K x C_up x D
        biases = torch.stack([layer.bias.float() for layer in self.final_layers])  # K x C_up
        tokens = self.token_indices.to(weights.device)
        hyper_in = torch.einsum("pmcd,pmd->pmc", weights[tokens], hyper_hidden.float()) + biases[tokens]
        return torch.einsum("pmc,pchw->pmhw", hyper_in, self.upscaled_features)


def mlp_penultimate(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a SAM / SAM 2 ``MLP`` up to (excluding) its last linear layer."""
    activation = getattr(mlp, "act", F.relu)  # SAM v1's MLP hard-codes ReLU, SAM 2's stores it
    for layer in mlp.layers[:-1]:
        x = activation(layer(x))
    return x


def hypernetwork_outputs(mask_decoder: nn.Module, mask_tokens_out: torch.Tensor):
    """``P x K x C`` mask tokens -> penultimate ``P x K x D`` and hypernetwork output ``P x K x C_up``."""
    mlps = mask_decoder.output_hypernetworks_mlps
    hidden = torch.stack([mlp_penultimate(mlps[i], mask_tokens_out[:, i, :]) for i in range(len(mlps))], dim=1)
    hyper_in = torch.stack([mlps[i].layers[-1](hidden[:, i, :]) for i in range(len(mlps))], dim=1)
    return hidden, hyper_in


@dataclass
class SamDecoderPass:
    """All outputs of one step-by-step pass of a ``MaskDecoder`` (every mask token).

    - ``masks``: ``P x K x h x w`` low-res logits in the family's low-res frame (K = 4 tokens:
      token 0 = single-mask output, tokens 1..3 = multimask outputs; h = w = 256).
    - ``iou_predictions``: ``P x K``.
    - ``upscaled_features``: ``P x C_up x h x w``.
    - ``hyper_hidden``: ``P x K x D``.
    """

    masks: torch.Tensor
    iou_predictions: torch.Tensor
    upscaled_features: torch.Tensor
    hyper_hidden: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields in order (``SamDecoderPass(*tensors)`` rebuilds it), without copying them."""
        return self.masks, self.iou_predictions, self.upscaled_features, self.hyper_hidden


# ----------------------------------------------------------------------------------------------
# Decoder inputs
# ----------------------------------------------------------------------------------------------


def single_image_features(features: dict[str, torch.Tensor], names: tuple[str, ...], device) -> dict:
    """``C x h x w`` or ``1 x C x h x w`` per feature -> ``1 x C x h x w`` float32 on ``device``."""
    missing = [name for name in names if name not in features]
    if missing:
        raise BackboneError(f"decode: features lack {missing}; expected keys {list(names)}")
    prepared = {}
    for name in names:
        tensor = torch.as_tensor(features[name])
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 4 or tensor.shape[0] != 1:
            raise BackboneError(
                f"decode: feature {name!r} must be C x h x w or 1 x C x h x w (one image), "
                f"got shape {tuple(tensor.shape)}"
            )
        tensor = tensor.to(device=device, dtype=torch.float32)
        # encode() returns inference tensors; autograd must not save them for backward.
        prepared[name] = tensor.clone() if tensor.is_inference() and not torch.is_inference_mode_enabled() else tensor
    return prepared


def checked_prompts(
    device: torch.device,
    point_coords,
    point_labels,
    boxes,
    mask_input,
    dense_embedding_override,
    dense_shape: tuple[int, int, int],
) -> Prompts:
    """The decoder's prompt arguments checked and moved to ``device`` (float32, labels int64)."""
    def tensor(value, dtype=torch.float32):
        return None if value is None else torch.as_tensor(value).to(device=device, dtype=dtype)

    point_coords, point_labels = tensor(point_coords), tensor(point_labels, torch.int64)
    boxes, mask_input = tensor(boxes), tensor(mask_input)
    dense_embedding_override = tensor(dense_embedding_override)
    if (point_coords is None) != (point_labels is None):
        raise BackboneError("decode: point_coords and point_labels must be given together")
    sizes = {}
    if point_coords is not None:
        if point_coords.ndim != 3 or point_coords.shape[2] != 2:
            raise BackboneError(f"decode: point_coords must be P x N x 2, got {tuple(point_coords.shape)}")
        if tuple(point_labels.shape) != tuple(point_coords.shape[:2]):
            raise BackboneError(
                f"decode: point_labels must be P x N = {tuple(point_coords.shape[:2])}, "
                f"got {tuple(point_labels.shape)}"
            )
        sizes["point_coords"] = point_coords.shape[0]
    if boxes is not None:
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise BackboneError(f"decode: boxes must be P x 4, got {tuple(boxes.shape)}")
        sizes["boxes"] = boxes.shape[0]
    if mask_input is not None:
        if mask_input.ndim != 4 or tuple(mask_input.shape[1:]) != (1, FRAME256, FRAME256):
            raise BackboneError(f"decode: mask_input must be P x 1 x 256 x 256, got {tuple(mask_input.shape)}")
        sizes["mask_input"] = mask_input.shape[0]
    if dense_embedding_override is not None:
        if dense_embedding_override.ndim != 4 or tuple(dense_embedding_override.shape[1:]) != dense_shape:
            raise BackboneError(
                f"decode: dense_embedding_override must be P x {' x '.join(map(str, dense_shape))}, "
                f"got {tuple(dense_embedding_override.shape)}"
            )
        sizes["dense_embedding_override"] = dense_embedding_override.shape[0]
    if len(set(sizes.values())) > 1:
        raise BackboneError(f"decode: prompt inputs disagree on the number of prompt sets P: {sizes}")
    return Prompts(point_coords, point_labels, boxes, mask_input, dense_embedding_override)


# ----------------------------------------------------------------------------------------------
# The interface
# ----------------------------------------------------------------------------------------------


class Backbone(abc.ABC):
    """A frozen SAM-family model behind one interface (see the module docstring for frames).

    ``decode`` and ``decode_features`` are written once here; a family supplies its encoder, its
    frame changes and the small steps that differ (the ``_``-prefixed abstract methods).

    Attributes:
        family, model_type: the registry key.
        checkpoint_path: ``Path`` of the loaded checkpoint; ``checkpoint_md5``: its MD5.
        device: ``torch.device`` the model lives on.
        image_size: encoder input side ``S`` (1024 for SAM / SAM 2, 256 for ``demo_tiny``).
        feature_names: keys of the dict ``encode`` returns (and ``decode`` expects).
        preprocessor: a small picklable callable doing ``preprocess`` (ship it to DataLoader
            workers instead of the backbone).
        model: the underlying ``nn.Module`` (frozen, eval mode).
        encoder_settings: how ``encode`` runs (``ResolvedEncoder``; see ``configure_encoder``).
        encoder_int8: the image encoder's linear weights have been made int8 (``sam.encoder_int8``).
        decoder_batch: prompt sets per mask-decoder call, 0 = all at once (see ``configure_decoder``).
    """

    family: ClassVar[str]
    feature_names: ClassVar[tuple[str, ...]]
    #: The attribute of ``model`` holding the image encoder (channels-last and the swaps apply to it).
    image_encoder_attr: ClassVar[str] = "image_encoder"
    #: Module classes the fast impl swaps for their scaled-dot-product-attention twins.
    attention_swaps: ClassVar[tuple[ModuleSwap, ...]] = ()

    def __init__(self, model: nn.Module, model_type: str, checkpoint_path: Path, device: torch.device,
                 preprocessor: SplitPreprocessor) -> None:
        self.model = model
        self.model_type = model_type
        self.checkpoint_path = Path(checkpoint_path)
        self.checkpoint_md5 = checkpoint_md5(checkpoint_path)
        self.device = device
        self.preprocessor = preprocessor
        self.image_size = preprocessor.image_size
        self.encoder_int8 = False  # the image encoder's linear weights are int8 (configure_encoder)
        self.configure_encoder(EncoderSettings())
        self.configure_decoder("auto")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(family={self.family!r}, model_type={self.model_type!r}, "
                f"checkpoint={str(self.checkpoint_path)!r}, device={str(self.device)!r}, "
                f"encoder={self.encoder_settings.describe()!r})")

    # -- what a family implements ----------------------------------------------------------------

    @property
    @abc.abstractmethod
    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``name -> (C, h, w)`` of ``encode``'s outputs, from the architecture (no probe encode)."""

    @abc.abstractmethod
    def _encode_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The family's encode step on checked images: ``B x 3 x S x S`` -> ``name -> B x C x h x w``
        float32 (called by ``encode`` inside inference mode and autocast; may be compiled)."""

    @abc.abstractmethod
    def to_frame256(self, low_res: torch.Tensor, original_hw) -> torch.Tensor:
        """``... x 256 x 256`` maps in the family's low-res frame -> ``... x 256 x 256`` FRAME256."""

    @abc.abstractmethod
    def from_frame256(self, logits: torch.Tensor, original_hw,
                      pad_value: float = MASK_INPUT_PAD_LOGIT) -> torch.Tensor:
        """``P x C x 256 x 256`` FRAME256 maps -> ``P x C x 256 x 256`` in the family's low-res frame."""

    @abc.abstractmethod
    def _prompt_encoder(self) -> nn.Module:
        """The model's ``PromptEncoder``."""

    @abc.abstractmethod
    def _mask_decoder(self) -> nn.Module:
        """The model's ``MaskDecoder``."""

    @abc.abstractmethod
    def _encoder_prompts(self, original_hw: tuple[int, int], prompts: Prompts):
        """``(points, boxes)`` arguments of the prompt encoder, in the INPUT frame."""

    @abc.abstractmethod
    def _run_mask_decoder(self, features: dict[str, torch.Tensor], sparse: torch.Tensor, dense: torch.Tensor,
                          multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The library's ``MaskDecoder`` forward -> low-res logits ``P x M x 256 x 256``, IoUs ``P x M``."""

    @abc.abstractmethod
    def _decoder_pass(self, features: dict[str, torch.Tensor], sparse: torch.Tensor,
                      dense: torch.Tensor) -> SamDecoderPass:
        """The ``MaskDecoder`` unrolled step by step, every mask token kept."""


    # -- shared --------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``B x 3 x S x S`` preprocessed images -> ``name -> B x C x h x w`` float32 features
        (``feature_names``), by the configured encoder path (``configure_encoder``)."""
        images = self._check_images(images)
        with torch.inference_mode(), inference_autocast(self.device):
            return self.encoder_runner(images)

    def configure_encoder(self, settings: EncoderSettings) -> ResolvedEncoder:
        """Run ``encode`` the way ``settings`` ask on this device, switching the loaded encoder in
        place (``fast_encoder``: attention swaps, channels-last, ``torch.compile``); the weights are
        untouched, so it can be switched back, except by ``int8`` (``sam.encoder_int8``), which
        replaces the encoder's linear layers once and for good. Returns the resolved settings (also kept as
        ``encoder_settings``)."""
        resolved = settings.resolve(self.device)
        impl = ENCODER_IMPLS[resolved.impl]
        encoder = getattr(self.model, self.image_encoder_attr)
        if self.encoder_int8 and not resolved.int8:
            raise EncoderSettingsError("sam.encoder_int8: this encoder's weights are int8 already; "
                                       "load the checkpoint again for float weights")
        if resolved.int8 and not self.encoder_int8:
            quantize_linear_weights(encoder)
            self.encoder_int8 = True
        for swap in self.attention_swaps:
            swap.apply(encoder, fast=impl.sdpa_attention)
        set_conv_memory_format(encoder, impl.channels_last)
        self.encoder_settings = resolved
        self.encoder_runner = EncoderRunner(self._encode_batch, impl.channels_last, resolved.static_batch,
                                            resolved.compiled)
        return resolved

    def configure_decoder(self, decoder_batch: str | int) -> int:
        """Split ``decode``'s and ``decode_features``' prompt sets into mask-decoder calls of at most this
        many (``sam.decoder_batch``, resolved by ``resolve_decoder_batch``; 0 = one call). Each prompt
        set's result is the same function either way; on the CPU its last float bits may depend on the
        call's size, as on any batch size."""
        self.decoder_batch = resolve_decoder_batch(decoder_batch, self.device)
        return self.decoder_batch

    def _decoder_calls(self, step: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
                       sparse: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``step(sparse, dense)`` (a mask-decoder step returning per-prompt-set tensors) over the ``P``
        prompt sets in calls of at most ``decoder_batch``, its outputs concatenated in prompt-set order."""
        num_sets = sparse.shape[0]
        size = self.decoder_batch or num_sets
        if num_sets <= size:
            return step(sparse, dense)
        parts = [step(sparse[start:start + size], dense[start:start + size]) for start in range(0, num_sets, size)]
        return tuple(torch.cat(outputs) for outputs in zip(*parts))

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """``H x W x 3`` uint8 RGB -> ``3 x S x S`` float32 encoder input (CPU, pure)."""
        return self.preprocessor(image)

    def input_size(self, original_hw) -> tuple[int, int]:
        """``(h, w)`` of the resized image inside the ``S x S`` input, before any padding."""
        return self.preprocessor.input_size(original_hw)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise BackboneError(
                f"encode expects B x {' x '.join(map(str, expected))} preprocessed images, "
                f"got {tuple(images.shape)}"
            )
        return images.to(device=self.device, dtype=torch.float32)

    def mask_embedding(self, logits: torch.Tensor, original_hw) -> torch.Tensor:
        """The prompt encoder's dense embedding of a mask input, ``P x 256 x 64 x 64`` float32.

        ``logits``: ``P x 1 x 256 x 256`` in FRAME256 (as ``decode``'s ``mask_input``). No
        gradient (the prompt encoder is frozen); the result may feed a trainable module whose
        output goes back in as ``decode(..., dense_embedding_override=...)``.
        """
        logits = torch.as_tensor(logits).to(device=self.device, dtype=torch.float32)
        if logits.ndim != 4 or tuple(logits.shape[1:]) != (1, FRAME256, FRAME256):
            raise BackboneError(f"mask_embedding: logits must be P x 1 x 256 x 256, got {tuple(logits.shape)}")
        with torch.no_grad():
            model_frame = self.from_frame256(logits, original_hw)
            with inference_autocast(self.device):
                embedding = self._prompt_encoder()._embed_masks(model_frame)
        return embedding.float()

    def _prepare_inputs(self, features, original_hw, point_coords, point_labels, boxes, mask_input,
                        dense_embedding_override) -> tuple[tuple[int, int], dict[str, torch.Tensor], Prompts]:
        """Checked ``(original_hw, features of one image on the device, prompts)`` for a decoder call."""
        original_hw = checked_hw(original_hw)
        features = single_image_features(features, self.feature_names, self.device)
        prompts = checked_prompts(self.device, point_coords, point_labels, boxes, mask_input,
                                  dense_embedding_override, tuple(features["image_embed"].shape[1:]))
        return original_hw, features, prompts

    def _prompt_embeddings(self, original_hw, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse ``P x T x 256`` and dense ``P x 256 x 64 x 64`` prompt embeddings."""
        points, boxes = self._encoder_prompts(original_hw, prompts)
        masks = None if prompts.mask_input is None else self.from_frame256(prompts.mask_input, original_hw)
        sparse, dense = self._prompt_encoder()(points=points, boxes=boxes, masks=masks)
        if prompts.dense_embedding_override is not None:
            dense = prompts.dense_embedding_override
        return sparse, dense

    def _logits_to_frame256(self, low_res: torch.Tensor, original_hw, enable_grad: bool) -> torch.Tensor:
        """``decode``'s last step: the low-res logits in FRAME256 (float32, outside autocast)."""
        with grad_mode(enable_grad):
            return self.to_frame256(low_res.float(), original_hw)

    def _output_tokens(self, unrolled: SamDecoderPass, multimask_output: bool) -> torch.Tensor:
        """``P x M`` int64: the mask tokens ``MaskDecoder.forward`` outputs: 1..3 (M = 3) or 0 (M = 1)."""
        num_sets, device = unrolled.masks.shape[0], unrolled.masks.device
        if multimask_output:
            return torch.arange(1, self._mask_decoder().num_mask_tokens, device=device).expand(num_sets, -1).clone()
        return torch.zeros(num_sets, 1, dtype=torch.int64, device=device)

    def decode(
        self,
        features: dict[str, torch.Tensor],
        original_hw: tuple[int, int],
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        dense_embedding_override: torch.Tensor | None = None,
        enable_grad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All P prompt sets of one image through the prompt encoder and mask decoder (in calls of at
        most ``decoder_batch`` prompt sets, ``configure_decoder``).

        Args:
            features: the ``encode`` output for one image (``1 x C x h x w`` or ``C x h x w`` each),
                e.g. ``{"image_embed": 1 x 256 x 64 x 64}`` for SAM v1.
            original_hw: ``(H, W)`` of the ORIGINAL image.
            point_coords: ``P x N x 2`` (x, y) ORIGINAL pixels; point_labels: ``P x N``
                (1 positive, 0 negative, -1 padding).
            boxes: ``P x 4`` (x0, y0, x1, y1) ORIGINAL pixels.
            mask_input: ``P x 1 x 256 x 256`` logits in FRAME256.
            multimask_output: 3 outputs (tokens 1..3) if True, else the single-mask token 0 (SAM 2
                may replace an unstable single-mask output by its best multimask output).
            dense_embedding_override: ``P x 256 x 64 x 64`` replaces the prompt encoder's dense
                embeddings (mask input or no-mask embedding).
            enable_grad: run with autograd (frozen weights) so that gradients reach a trainable
                ``dense_embedding_override``; default ``inference_mode``.

        Returns:
            ``logits``: ``P x M x 256 x 256`` float32 in FRAME256 (M = 3 or 1) and
            ``iou_predictions``: ``P x M`` float32.
        """
        with grad_mode(enable_grad):
            original_hw, features, prompts = self._prepare_inputs(
                features, original_hw, point_coords, point_labels, boxes, mask_input, dense_embedding_override)
        with grad_mode(enable_grad), inference_autocast(self.device):
            sparse, dense = self._prompt_embeddings(original_hw, prompts)
            low_res, iou_predictions = self._decoder_calls(
                lambda rows, dense_rows: self._run_mask_decoder(features, rows, dense_rows, multimask_output),
                sparse, dense)
        return self._logits_to_frame256(low_res, original_hw, enable_grad), iou_predictions.float()

    def decode_features(
        self,
        features: dict[str, torch.Tensor],
        original_hw: tuple[int, int],
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        dense_embedding_override: torch.Tensor | None = None,
    ) -> DecoderFeatures:
        """``decode`` unrolled step by step, also returning the decoder's last-layer inputs.

        Same arguments as ``decode`` (no autograd; calls of at most ``decoder_batch`` prompt sets, as
        there); see ``DecoderFeatures`` for the outputs. The logits are unclamped and agree with
        ``decode`` up to float rounding.
        """
        original_hw, features, prompts = self._prepare_inputs(
            features, original_hw, point_coords, point_labels, boxes, mask_input, dense_embedding_override)
        with torch.inference_mode(), inference_autocast(self.device):
            sparse, dense = self._prompt_embeddings(original_hw, prompts)
            unrolled = SamDecoderPass(*self._decoder_calls(
                lambda rows, dense_rows: self._decoder_pass(features, rows, dense_rows).tensors(),
                sparse, dense))
            token_indices = self._output_tokens(unrolled, multimask_output)
        rows = torch.arange(token_indices.shape[0], device=token_indices.device)[:, None]
        with torch.inference_mode():  # the frame change in float32, outside autocast
            logits = self.to_frame256(unrolled.masks[rows, token_indices].float(), original_hw)
            upscaled = self.to_frame256(unrolled.upscaled_features.float(), original_hw)
        return DecoderFeatures(
            logits=logits,
            iou_predictions=unrolled.iou_predictions[rows, token_indices].float(),
            upscaled_features=upscaled,
            hyper_hidden=unrolled.hyper_hidden[rows, token_indices].float(),
            token_indices=token_indices,
            final_layers=tuple(mlp.layers[-1] for mlp in self._mask_decoder().output_hypernetworks_mlps),
        )
