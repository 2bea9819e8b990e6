"""Frozen SAM backbones behind one interface: SAM v1, SAM 2 / 2.1 and the tiny demo SAM.

Every model is built from a registry entry ``(family, model_type) -> builder`` with random
weights and then loaded from a checkpoint file by the one function ``load_backbone``; there is
no other loading path (the demo model is loaded exactly like ``vit_b``).

Frames (all coordinates are pixels, x = column, y = row, origin at the top-left corner):

- ORIGINAL: the image as read, ``H x W``. Prompts (points, boxes) are always given in it.
- INPUT: the encoder input, ``S x S`` with ``S = backbone.image_size``. SAM v1 resizes the
  longest side to ``S`` keeping the aspect ratio and pads bottom/right with zeros; SAM 2
  stretches the image to ``S x S``.
- FRAME256: the project's common frame for logits: the ORIGINAL image stretched to
  ``256 x 256`` (``x256 = x * 256 / W``, ``y256 = y * 256 / H``). Every ``decode`` output and
  every ``mask_input`` is in FRAME256, whatever the family.

On CUDA the encoder and decoder run under bf16 autocast with TF32 enabled; on CPU in float32.
Outputs are always float32.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modules.core.fileio import cached_file_md5
from modules.core.device import enable_tf32, inference_autocast, resolve_device
from modules.core.errors import PipelineError, error_line
from modules.core.frames import FRAME256

#: Logit written into the padded (outside-the-image) part of SAM v1's low-res mask input. SAM's
#: own low-res predictions there are confident background, so a strongly negative logit keeps a
#: FRAME256 mask input in distribution. It is within SAM 2's clamp range [-32, 32].
MASK_INPUT_PAD_LOGIT = -20.0
#: ``SAM2Transforms`` normalisation (pixels scaled to [0, 1] first).
SAM2_PIXEL_MEAN = (0.485, 0.456, 0.406)
SAM2_PIXEL_STD = (0.229, 0.224, 0.225)


class BackboneError(PipelineError, ValueError):
    """A backbone could not be built or loaded, or was given malformed input (one-line message)."""


def _grad_mode(enable_grad: bool) -> contextlib.AbstractContextManager:
    """``inference_mode`` normally; autograd on when a trainable module feeds the frozen decoder
    (the weights stay frozen, gradients flow to the inputs such as a dense embedding)."""
    return torch.enable_grad() if enable_grad else torch.inference_mode()


def checkpoint_md5(path: str | os.PathLike) -> str:
    """MD5 of a checkpoint file, read in chunks and cached per process by (path, size, mtime)."""
    return cached_file_md5(path)


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", None)
        raise BackboneError(f"preprocess expects an H x W x 3 uint8 array, got shape {shape}")
    if image.dtype != np.uint8:
        raise BackboneError(f"preprocess expects an H x W x 3 uint8 array, got dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise BackboneError(f"preprocess got an empty image of shape {image.shape}")


def _original_hw(original_hw) -> tuple[int, int]:
    height, width = (int(v) for v in original_hw)
    if height < 1 or width < 1:
        raise BackboneError(f"original_hw must be two positive ints (H, W), got {original_hw!r}")
    return height, width


# ----------------------------------------------------------------------------------------------
# Preprocessing (CPU, pure, picklable: safe to ship to DataLoader workers)
# ----------------------------------------------------------------------------------------------


class _SplitPreprocessor:
    """A preprocessing split in two halves, so that only uint8 pixels cross process boundaries:
    ``prepare`` (CPU, picklable, runs in DataLoader workers) and ``finish`` (float work, on the
    device that encodes). Calling the preprocessor runs both on the CPU. The halves are the
    operations of the library's own preprocessing in its order, so any device gives its encoder
    input up to that device's arithmetic (on an H200: SAM v1 bit-identical, SAM 2 within 1.2e-6)."""

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, prepared: list[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
        """``prepare`` outputs (on any device) -> ``B x 3 x S x S`` float32 encoder input on ``device``."""
        return torch.stack([self._finish_one(pixels.to(device, non_blocking=True)) for pixels in prepared])

    def _finish_one(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """``H x W x 3`` uint8 RGB -> ``3 x S x S`` float32 encoder input (CPU)."""
        return self.finish([self.prepare(image)])[0]


@dataclass(frozen=True)
class SamPreprocessor(_SplitPreprocessor):
    """SAM v1 preprocessing, exactly as ``SamPredictor.set_image`` + ``Sam.preprocess``.

    ``ResizeLongestSide(image_size)`` (PIL bilinear resize of the uint8 image), per-channel
    normalisation with ``pixel_mean`` / ``pixel_std`` (0-255 scale), then zero padding at the
    bottom and right to ``image_size x image_size``.
    """

    image_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]

    def input_size(self, original_hw) -> tuple[int, int]:
        """``(h, w)`` of the resized image inside the padded ``S x S`` input."""
        from segment_anything.utils.transforms import ResizeLongestSide

        height, width = _original_hw(original_hw)
        return ResizeLongestSide.get_preprocess_shape(height, width, self.image_size)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """``H x W x 3`` uint8 RGB -> ``3 x h x w`` uint8 resized (``input_size``), not padded."""
        from segment_anything.utils.transforms import ResizeLongestSide

        _check_image(image)
        resized = ResizeLongestSide(self.image_size).apply_image(np.ascontiguousarray(image))
        return torch.from_numpy(resized).permute(2, 0, 1).contiguous()

    def _finish_one(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.pixel_mean, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.pixel_std, device=pixels.device).view(3, 1, 1)
        pixels = (pixels.float() - mean) / std
        pad_h = self.image_size - pixels.shape[1]
        pad_w = self.image_size - pixels.shape[2]
        return F.pad(pixels, (0, pad_w, 0, pad_h)).contiguous()


@dataclass(frozen=True)
class Sam2Preprocessor(_SplitPreprocessor):
    """SAM 2 preprocessing, exactly as ``SAM2ImagePredictor`` (``SAM2Transforms``).

    ``ToTensor`` (uint8 -> [0, 1]), ``Resize((S, S))`` on the float tensor (bilinear, antialias
    as torchvision's default for tensors), then normalisation with ``pixel_mean`` / ``pixel_std``
    (0-1 scale). No aspect preservation and no padding. The resize works on floats, so
    ``prepare`` hands over the original-size uint8 image.
    """

    image_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]

    def input_size(self, original_hw) -> tuple[int, int]:
        """The whole ``S x S`` input is image (SAM 2 stretches, it does not pad)."""
        _original_hw(original_hw)
        return (self.image_size, self.image_size)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """``H x W x 3`` uint8 RGB -> ``3 x H x W`` uint8 (the resize happens in ``finish``)."""
        _check_image(image)
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous()

    def _finish_one(self, pixels: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import Normalize, Resize

        pixels = pixels.float().div(255)  # what ToTensor does with a uint8 array
        pixels = Resize((self.image_size, self.image_size))(pixels)
        pixels = Normalize(self.pixel_mean, self.pixel_std)(pixels)
        return pixels.float().contiguous()


# ----------------------------------------------------------------------------------------------
# FRAME256 <-> SAM v1's low-res frame (the padded S x S input frame at 256 x 256)
# ----------------------------------------------------------------------------------------------


def _bilinear_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """``size_out x size_in`` matrix of 1-D bilinear resampling (align_corners=False)."""
    identity = torch.eye(size_in, dtype=torch.float64).view(1, size_in, size_in, 1)
    resampled = F.interpolate(identity, (size_out, 1), mode="bilinear", align_corners=False)
    return resampled.view(size_in, size_out).T.contiguous()


def _sam_lowres_to_frame256_matrix(low_res: int, image_size: int, valid: int) -> torch.Tensor:
    """1-D map of ``Sam.postprocess_masks`` followed by a resize to FRAME256, as a matrix.

    SAM upsamples the ``low_res`` logits to ``image_size``, crops the first ``valid`` pixels
    (the unpadded image) and resizes to the original size; we resize to 256 instead. Bilinear
    resampling is separable and linear, so the composition is one ``256 x low_res`` matrix.
    """
    up = _bilinear_matrix(low_res, image_size)[:valid]
    return (_bilinear_matrix(valid, FRAME256) @ up).float()


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


def _mlp_penultimate(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a SAM / SAM 2 ``MLP`` up to (excluding) its last linear layer."""
    activation = getattr(mlp, "act", F.relu)  # SAM v1's MLP hard-codes ReLU, SAM 2's stores it
    for layer in mlp.layers[:-1]:
        x = activation(layer(x))
    return x


def _hypernetwork_outputs(mask_decoder: nn.Module, mask_tokens_out: torch.Tensor):
    """``P x K x C`` mask tokens -> penultimate ``P x K x D`` and hypernetwork output ``P x K x C_up``."""
    mlps = mask_decoder.output_hypernetworks_mlps
    hidden = torch.stack([_mlp_penultimate(mlps[i], mask_tokens_out[:, i, :]) for i in range(len(mlps))], dim=1)
    hyper_in = torch.stack([mlps[i].layers[-1](hidden[:, i, :]) for i in range(len(mlps))], dim=1)
    return hidden, hyper_in


@dataclass
class SamDecoderPass:
    """All outputs of one step-by-step pass of SAM v1's ``MaskDecoder`` (every mask token).

    - ``masks``: ``P x K x h x w`` low-res logits in the padded INPUT frame (K = 4 tokens:
      token 0 = single-mask output, tokens 1..3 = multimask outputs; h = w = 256 for SAM).
    - ``iou_predictions``: ``P x K``.
    - ``upscaled_features``: ``P x C_up x h x w``.
    - ``hyper_hidden``: ``P x K x D``.
    """

    masks: torch.Tensor
    iou_predictions: torch.Tensor
    upscaled_features: torch.Tensor
    hyper_hidden: torch.Tensor


def sam_mask_decoder_pass(
    mask_decoder: nn.Module,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_embeddings: torch.Tensor,
    dense_embeddings: torch.Tensor,
) -> SamDecoderPass:
    """SAM v1 ``MaskDecoder.predict_masks`` unrolled, keeping the last layer's inputs.

    Args:
        mask_decoder: a ``segment_anything`` ``MaskDecoder``.
        image_embeddings: ``1 x C x h' x w'`` (shared by all prompt sets) or ``P x C x h' x w'``
            (one per prompt set, as in training on several images at once).
        image_pe: ``1 x C x h' x w'`` dense positional encoding.
        sparse_embeddings: ``P x T x C``.
        dense_embeddings: ``P x C x h' x w'``.

    Differentiable (no ``no_grad`` inside); the trainer of the demo model uses it.
    """
    num_sets = sparse_embeddings.shape[0]
    output_tokens = torch.cat([mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(num_sets, -1, -1)
    tokens = torch.cat((output_tokens, sparse_embeddings), dim=1)
    src = image_embeddings + dense_embeddings
    if src.shape[0] != num_sets:
        src = src.expand(num_sets, -1, -1, -1)
    pos_src = image_pe.expand(num_sets, -1, -1, -1)
    batch, channels, height, width = src.shape

    hidden_states, src = mask_decoder.transformer(src, pos_src, tokens)
    iou_token_out = hidden_states[:, 0, :]
    mask_tokens_out = hidden_states[:, 1 : 1 + mask_decoder.num_mask_tokens, :]

    src = src.transpose(1, 2).reshape(batch, channels, height, width)
    upscaled = mask_decoder.output_upscaling(src)
    hyper_hidden, hyper_in = _hypernetwork_outputs(mask_decoder, mask_tokens_out)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
    iou_pred = mask_decoder.iou_prediction_head(iou_token_out)
    return SamDecoderPass(masks, iou_pred, upscaled, hyper_hidden)


# ----------------------------------------------------------------------------------------------
# Backbones
# ----------------------------------------------------------------------------------------------


def _as_single_image_features(features: dict[str, torch.Tensor], names: tuple[str, ...], device) -> dict:
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


@dataclass
class _Prompts:
    """Prompts validated and moved to the model's device (ORIGINAL frame, float32)."""

    num_sets: int
    point_coords: torch.Tensor | None
    point_labels: torch.Tensor | None
    boxes: torch.Tensor | None
    mask_input: torch.Tensor | None
    dense_embedding_override: torch.Tensor | None


def _prepare_prompts(
    device: torch.device,
    point_coords,
    point_labels,
    boxes,
    mask_input,
    dense_embedding_override,
    dense_shape: tuple[int, int, int],
) -> _Prompts:
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
    num_sets = next(iter(sizes.values())) if sizes else 1
    return _Prompts(num_sets, point_coords, point_labels, boxes, mask_input, dense_embedding_override)


class Backbone:
    """Common interface of a frozen SAM-family model (see the module docstring for frames).

    Attributes:
        family, model_type: the registry key.
        checkpoint_path: ``Path`` of the loaded checkpoint; ``checkpoint_md5``: its MD5.
        device: ``torch.device`` the model lives on.
        image_size: encoder input side ``S`` (1024 for SAM / SAM 2, 256 for ``demo_tiny``).
        feature_names: keys of the dict ``encode`` returns (and ``decode`` expects).
        preprocessor: a small picklable callable doing ``preprocess`` (ship it to DataLoader
            workers instead of the backbone).
        model: the underlying ``nn.Module`` (frozen, eval mode).
    """

    family: ClassVar[str]
    feature_names: ClassVar[tuple[str, ...]]

    def __init__(self, model: nn.Module, model_type: str, checkpoint_path: Path, device: torch.device,
                 preprocessor: SamPreprocessor | Sam2Preprocessor) -> None:
        self.model = model
        self.model_type = model_type
        self.checkpoint_path = Path(checkpoint_path)
        self.checkpoint_md5 = checkpoint_md5(checkpoint_path)
        self.device = device
        self.preprocessor = preprocessor
        self.image_size = preprocessor.image_size

    def _prepare_inputs(self, features, original_hw, point_coords, point_labels, boxes, mask_input,
                        dense_embedding_override):
        """Checked ``(original_hw, features of one image on the device, prompts)`` for a decoder call."""
        original_hw = _original_hw(original_hw)
        features = _as_single_image_features(features, self.feature_names, self.device)
        prompts = _prepare_prompts(self.device, point_coords, point_labels, boxes, mask_input,
                                   dense_embedding_override, tuple(features["image_embed"].shape[1:]))
        return original_hw, features, prompts

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(family={self.family!r}, model_type={self.model_type!r}, "
                f"checkpoint={str(self.checkpoint_path)!r}, device={str(self.device)!r})")

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

    def _prompt_encoder(self) -> nn.Module:
        raise NotImplementedError

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

    # Subclasses implement: encode, decode, decode_features, to_frame256, from_frame256.


class SamBackbone(Backbone):
    """SAM v1 (``vit_b`` / ``vit_l`` / ``vit_h``) and the tiny demo SAM (``demo_tiny``)."""

    family = "sam"
    feature_names = ("image_embed",)

    def __init__(self, model: nn.Module, model_type: str, checkpoint_path: Path, device: torch.device) -> None:
        preprocessor = SamPreprocessor(
            image_size=int(model.image_encoder.img_size),
            pixel_mean=tuple(float(v) for v in model.pixel_mean.flatten().tolist()),
            pixel_std=tuple(float(v) for v in model.pixel_std.flatten().tolist()),
        )
        super().__init__(model, model_type, checkpoint_path, device, preprocessor)
        self.low_res_size = 4 * int(model.prompt_encoder.image_embedding_size[0])
        self._frame_matrices: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _prompt_encoder(self) -> nn.Module:
        return self.model.prompt_encoder

    @property
    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``name -> (C, h, w)`` of ``encode``'s outputs, from the architecture (no probe encode)."""
        encoder = self.model.prompt_encoder
        return {"image_embed": (int(encoder.embed_dim), *map(int, encoder.image_embedding_size))}

    # -- encoder -------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``B x 3 x S x S`` preprocessed images -> ``{"image_embed": B x 256 x 64 x 64}`` float32."""
        images = self._check_images(images)
        with torch.inference_mode(), inference_autocast(self.device):
            embeddings = self.model.image_encoder(images)
        return {"image_embed": embeddings.float()}

    # -- frames --------------------------------------------------------------------------------

    def _matrices(self, original_hw) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column maps low-res padded frame -> FRAME256, ``256 x low_res`` each."""
        input_h, input_w = self.input_size(original_hw)
        key = (input_h, input_w)
        if key not in self._frame_matrices:
            # Normal tensors even when first asked for under inference_mode: a later trainable
            # pass (fusion training) must be able to save them for backward.
            with torch.inference_mode(False):
                rows = _sam_lowres_to_frame256_matrix(self.low_res_size, self.image_size, input_h)
                cols = _sam_lowres_to_frame256_matrix(self.low_res_size, self.image_size, input_w)
            self._frame_matrices[key] = (rows, cols)
        return self._frame_matrices[key]

    def to_frame256(self, low_res: torch.Tensor, original_hw) -> torch.Tensor:
        """``... x 256 x 256`` maps in SAM's low-res padded frame -> ``... x 256 x 256`` FRAME256.

        ``Sam.postprocess_masks`` with 256 x 256 in place of the original size: upsample to
        ``S``, crop the valid ``input_size``, resize to 256 x 256 (both bilinear,
        align_corners=False). Bilinear resampling is separable and linear, so this is done
        exactly as two small matrix products (rows, columns), and applies to logits and to
        decoder features alike.
        """
        rows, cols = self._matrices(original_hw)
        rows, cols = rows.to(low_res.device), cols.to(low_res.device)
        return torch.einsum("oh,...hw,pw->...op", rows, low_res.float(), cols)

    def from_frame256(self, logits: torch.Tensor, original_hw,
                      pad_value: float = MASK_INPUT_PAD_LOGIT) -> torch.Tensor:
        """``P x C x 256 x 256`` FRAME256 maps -> ``P x C x 256 x 256`` in SAM's low-res padded frame.

        The inverse of ``to_frame256`` up to resampling: the map is resized bilinearly to the
        valid part of the low-res padded frame (``input_size * 256 / S``, rounded) and the
        padding is filled with ``pad_value``; the default ``MASK_INPUT_PAD_LOGIT`` is confident
        background, as SAM's own low-res predictions are there (use 0 for maps that are not
        logits, e.g. an uncertainty map).
        """
        input_h, input_w = self.input_size(original_hw)
        scale = self.low_res_size / self.image_size
        valid_h = max(1, int(input_h * scale + 0.5))
        valid_w = max(1, int(input_w * scale + 0.5))
        resized = F.interpolate(logits.float(), (valid_h, valid_w), mode="bilinear", align_corners=False)
        pad = (0, self.low_res_size - valid_w, 0, self.low_res_size - valid_h)
        return F.pad(resized, pad, value=float(pad_value))

    # -- decoder -------------------------------------------------------------------------------

    def _prompt_embeddings(self, original_hw, prompts: _Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse ``P x T x 256`` and dense ``P x 256 x 64 x 64`` prompt embeddings."""
        height, width = original_hw
        input_h, input_w = self.input_size(original_hw)
        scale = torch.tensor([input_w / width, input_h / height], device=self.device)
        points = None
        if prompts.point_coords is not None:
            points = (prompts.point_coords * scale, prompts.point_labels)
        boxes = None
        if prompts.boxes is not None:
            boxes = (prompts.boxes.reshape(-1, 2, 2) * scale).reshape(-1, 4)
        masks = None
        if prompts.mask_input is not None:
            masks = self.from_frame256(prompts.mask_input, original_hw)
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=masks)
        if prompts.dense_embedding_override is not None:
            dense = prompts.dense_embedding_override
        return sparse, dense

    def _prepare(self, features, original_hw, point_coords, point_labels, boxes, mask_input,
                 dense_embedding_override):
        original_hw, features, prompts = self._prepare_inputs(features, original_hw, point_coords, point_labels,
                                                              boxes, mask_input, dense_embedding_override)
        return original_hw, features["image_embed"], prompts

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
        """All P prompt sets of one image through the prompt encoder and mask decoder at once.

        Args:
            features: ``{"image_embed": 1 x 256 x 64 x 64 or 256 x 64 x 64}`` from ``encode``.
            original_hw: ``(H, W)`` of the ORIGINAL image.
            point_coords: ``P x N x 2`` (x, y) ORIGINAL pixels; point_labels: ``P x N``
                (1 positive, 0 negative, -1 padding).
            boxes: ``P x 4`` (x0, y0, x1, y1) ORIGINAL pixels.
            mask_input: ``P x 1 x 256 x 256`` logits in FRAME256.
            multimask_output: 3 outputs (tokens 1..3) if True, else the single-mask token 0.
            dense_embedding_override: ``P x 256 x 64 x 64`` replaces the prompt encoder's dense
                embeddings (mask input or no-mask embedding).
            enable_grad: run with autograd (frozen weights) so that gradients reach a trainable
                ``dense_embedding_override``; default ``inference_mode``.

        Returns:
            ``logits``: ``P x M x 256 x 256`` float32 in FRAME256 (M = 3 or 1) and
            ``iou_predictions``: ``P x M`` float32.
        """
        with _grad_mode(enable_grad):
            original_hw, embed, prompts = self._prepare(features, original_hw, point_coords, point_labels,
                                                        boxes, mask_input, dense_embedding_override)
        with _grad_mode(enable_grad), inference_autocast(self.device):
            sparse, dense = self._prompt_embeddings(original_hw, prompts)
            low_res, iou_predictions = self.model.mask_decoder(
                image_embeddings=embed,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        with _grad_mode(enable_grad):  # the frame change in float32, outside autocast
            logits = self.to_frame256(low_res.float(), original_hw)
        return logits, iou_predictions.float()

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

        Same arguments as ``decode``; see ``DecoderFeatures`` for the outputs. The logits agree
        with ``decode`` up to float rounding.
        """
        original_hw, embed, prompts = self._prepare(features, original_hw, point_coords, point_labels,
                                                    boxes, mask_input, dense_embedding_override)
        decoder = self.model.mask_decoder
        selected = list(range(1, decoder.num_mask_tokens)) if multimask_output else [0]
        with torch.inference_mode(), inference_autocast(self.device):
            sparse, dense = self._prompt_embeddings(original_hw, prompts)
            unrolled = sam_mask_decoder_pass(decoder, embed, self.model.prompt_encoder.get_dense_pe(),
                                             sparse, dense)
        with torch.inference_mode():  # the frame change in float32, outside autocast
            logits = self.to_frame256(unrolled.masks[:, selected].float(), original_hw)
            upscaled = self.to_frame256(unrolled.upscaled_features.float(), original_hw)
        return DecoderFeatures(
            logits=logits.float(),
            iou_predictions=unrolled.iou_predictions[:, selected].float(),
            upscaled_features=upscaled.float(),
            hyper_hidden=unrolled.hyper_hidden[:, selected].float(),
            token_indices=torch.tensor(selected, device=self.device).expand(prompts.num_sets, -1).clone(),
            final_layers=tuple(mlp.layers[-1] for mlp in decoder.output_hypernetworks_mlps),
        )


class Sam2Backbone(Backbone):
    """SAM 2 and SAM 2.1 (Hiera ``t`` / ``s`` / ``b+`` / ``l``), as ``SAM2ImagePredictor`` runs them."""

    family = "sam2"
    feature_names = ("image_embed", "high_res_feat0", "high_res_feat1")
    #: Clamp of SAM 2's low-res logits (``SAM2ImagePredictor._predict``; safe in float16).
    logit_clamp = 32.0

    def __init__(self, model: nn.Module, model_type: str, checkpoint_path: Path, device: torch.device) -> None:
        if not model.use_high_res_features_in_sam:
            raise BackboneError(f"sam2/{model_type}: configs without high-resolution features are not supported")
        preprocessor = Sam2Preprocessor(int(model.image_size), SAM2_PIXEL_MEAN, SAM2_PIXEL_STD)
        super().__init__(model, model_type, checkpoint_path, device, preprocessor)
        self.low_res_size = 4 * int(model.sam_image_embedding_size)
        if self.low_res_size != FRAME256:
            raise BackboneError(f"sam2/{model_type}: low-res masks are {self.low_res_size} px, expected {FRAME256}")

    def _prompt_encoder(self) -> nn.Module:
        return self.model.sam_prompt_encoder

    @property
    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``name -> (C, h, w)`` of ``encode``'s outputs, from the architecture (no probe encode):
        the high-resolution maps are the decoder's ``conv_s0`` / ``conv_s1`` inputs at 4x / 2x."""
        side = int(self.model.sam_image_embedding_size)
        decoder = self.model.sam_mask_decoder
        return {"image_embed": (int(self.model.sam_prompt_encoder.embed_dim), side, side),
                "high_res_feat0": (int(decoder.conv_s0.out_channels), 4 * side, 4 * side),
                "high_res_feat1": (int(decoder.conv_s1.out_channels), 2 * side, 2 * side)}

    # -- encoder -------------------------------------------------------------------------------

    def encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``B x 3 x S x S`` -> ``image_embed`` B x 256 x 64 x 64, ``high_res_feat0`` B x 32 x
        256 x 256, ``high_res_feat1`` B x 64 x 128 x 128 (float32), as ``set_image_batch``
        prepares them (the decoder's ``conv_s0`` / ``conv_s1`` applied, ``no_mem_embed`` added to
        the lowest-resolution map)."""
        images = self._check_images(images)
        batch = images.shape[0]
        with torch.inference_mode(), inference_autocast(self.device):
            backbone_out = self.model.forward_image(images)
            _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
            if self.model.directly_add_no_mem_embed:
                vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
            maps = [feat.permute(1, 2, 0).reshape(batch, -1, *size) for feat, size in zip(vision_feats, feat_sizes)]
        return {"image_embed": maps[-1].float(), "high_res_feat0": maps[0].float(), "high_res_feat1": maps[1].float()}

    # -- frames --------------------------------------------------------------------------------

    def to_frame256(self, low_res: torch.Tensor, original_hw) -> torch.Tensor:
        """SAM 2 stretches the image to ``S x S`` without padding: its low-res frame is FRAME256."""
        _original_hw(original_hw)
        return low_res.float()

    def from_frame256(self, logits: torch.Tensor, original_hw,
                      pad_value: float = MASK_INPUT_PAD_LOGIT) -> torch.Tensor:
        """FRAME256 maps are SAM 2's low-res frame as they are (nothing to pad: ``pad_value`` unused)."""
        _original_hw(original_hw)
        return logits.float()

    # -- decoder -------------------------------------------------------------------------------

    def _prompt_embeddings(self, original_hw, prompts: _Prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse ``P x T x 256`` and dense ``P x 256 x 64 x 64``; boxes become two points with
        labels 2 and 3 placed before the clicks, as ``SAM2ImagePredictor._predict`` does."""
        height, width = original_hw
        size = torch.tensor([width, height], dtype=torch.float32, device=self.device)
        concat_points = None
        if prompts.point_coords is not None:
            concat_points = (prompts.point_coords / size * self.image_size, prompts.point_labels)
        if prompts.boxes is not None:
            box_coords = prompts.boxes.reshape(-1, 2, 2) / size * self.image_size
            box_labels = torch.tensor([[2, 3]], dtype=torch.int64, device=self.device).repeat(box_coords.shape[0], 1)
            if concat_points is not None:
                concat_points = (torch.cat([box_coords, concat_points[0]], dim=1),
                                 torch.cat([box_labels, concat_points[1]], dim=1))
            else:
                concat_points = (box_coords, box_labels)
        masks = None if prompts.mask_input is None else self.from_frame256(prompts.mask_input, original_hw)
        sparse, dense = self.model.sam_prompt_encoder(points=concat_points, boxes=None, masks=masks)
        if prompts.dense_embedding_override is not None:
            dense = prompts.dense_embedding_override
        return sparse, dense

    def _prepare(self, features, original_hw, point_coords, point_labels, boxes, mask_input,
                 dense_embedding_override):
        original_hw, features, prompts = self._prepare_inputs(features, original_hw, point_coords, point_labels,
                                                              boxes, mask_input, dense_embedding_override)
        high_res = [features["high_res_feat0"], features["high_res_feat1"]]
        return original_hw, features["image_embed"], high_res, prompts

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
        """All P prompt sets of one image through the prompt encoder and mask decoder at once.

        Same arguments (``enable_grad`` included) and outputs as ``SamBackbone.decode``;
        ``features`` holds the three maps
        of ``encode`` for one image. With ``multimask_output=False`` SAM 2 may replace an
        unstable single-mask output by its best multimask output (per prompt set). Logits are
        clamped to [-32, 32] like the predictor's low-res logits.
        """
        with _grad_mode(enable_grad):
            original_hw, embed, high_res, prompts = self._prepare(
                features, original_hw, point_coords, point_labels, boxes, mask_input, dense_embedding_override)
        with _grad_mode(enable_grad), inference_autocast(self.device):
            sparse, dense = self._prompt_embeddings(original_hw, prompts)
            low_res, iou_predictions, _, _ = self.model.sam_mask_decoder(
                image_embeddings=embed,
                image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
                repeat_image=True,
                high_res_features=high_res,
            )
        logits = torch.clamp(low_res.float(), -self.logit_clamp, self.logit_clamp)
        return self.to_frame256(logits, original_hw), iou_predictions.float()

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
        """SAM 2's ``MaskDecoder.predict_masks`` + output selection unrolled step by step.

        Same arguments as ``decode``; see ``DecoderFeatures``. ``logits`` are unclamped
        (``clamp(logits, -32, 32)`` equals ``decode``'s up to float rounding).
        """
        original_hw, embed, high_res, prompts = self._prepare(
            features, original_hw, point_coords, point_labels, boxes, mask_input, dense_embedding_override)
        decoder = self.model.sam_mask_decoder
        with torch.inference_mode(), inference_autocast(self.device):
            sparse, dense = self._prompt_embeddings(original_hw, prompts)
            num_sets = sparse.shape[0]
            first = 1 if decoder.pred_obj_scores else 0  # the object-score token comes first
            leading = [decoder.obj_score_token.weight] if decoder.pred_obj_scores else []
            output_tokens = torch.cat(leading + [decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
            tokens = torch.cat((output_tokens.unsqueeze(0).expand(num_sets, -1, -1), sparse), dim=1)
            src = embed.expand(num_sets, -1, -1, -1) + dense
            pos_src = self.model.sam_prompt_encoder.get_dense_pe().expand(num_sets, -1, -1, -1)
            batch, channels, height, width = src.shape
            hidden_states, src = decoder.transformer(src, pos_src, tokens)
            iou_token_out = hidden_states[:, first, :]
            mask_tokens_out = hidden_states[:, first + 1 : first + 1 + decoder.num_mask_tokens, :]
            src = src.transpose(1, 2).reshape(batch, channels, height, width)
            deconv1, norm1, act1, deconv2, act2 = decoder.output_upscaling
            upscaled = act1(norm1(deconv1(src) + high_res[1]))
            upscaled = act2(deconv2(upscaled) + high_res[0])
            hyper_hidden, hyper_in = _hypernetwork_outputs(decoder, mask_tokens_out)
            b, c, h, w = upscaled.shape
            masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w).float()
            iou_pred = decoder.iou_prediction_head(iou_token_out).float()
            token_indices = self._select_tokens(decoder, masks, iou_pred, multimask_output)
        rows = torch.arange(num_sets, device=masks.device)[:, None]
        return DecoderFeatures(
            logits=self.to_frame256(masks[rows, token_indices], original_hw),
            iou_predictions=iou_pred[rows, token_indices],
            upscaled_features=upscaled.float(),
            hyper_hidden=hyper_hidden[rows, token_indices].float(),
            token_indices=token_indices,
            final_layers=tuple(mlp.layers[-1] for mlp in decoder.output_hypernetworks_mlps),
        )

    @staticmethod
    def _select_tokens(decoder: nn.Module, masks: torch.Tensor, iou_pred: torch.Tensor,
                       multimask_output: bool) -> torch.Tensor:
        """``P x M`` mask-token indices that ``MaskDecoder.forward`` outputs (M = 3 or 1)."""
        num_sets = masks.shape[0]
        if multimask_output:
            return torch.arange(1, decoder.num_mask_tokens, device=masks.device).expand(num_sets, -1).clone()
        single = torch.zeros(num_sets, 1, dtype=torch.int64, device=masks.device)
        if not (decoder.dynamic_multimask_via_stability and not decoder.training):
            return single
        # _dynamic_multimask_via_stability: fall back to the best multimask token when unstable.
        best_multimask = (iou_pred[:, 1:].argmax(dim=-1) + 1)[:, None]
        is_stable = decoder._get_stability_scores(masks[:, 0:1]) >= decoder.dynamic_multimask_stability_thresh
        return torch.where(is_stable, single, best_multimask)


# ----------------------------------------------------------------------------------------------
# Builders (random init) and the registry
# ----------------------------------------------------------------------------------------------

#: The tiny demo SAM: SAM's own blocks at 256 px input with 4 px patches, so the image embedding
#: is 256 x 64 x 64 and the low-res masks 256 x 256 exactly like the real SAM.
DEMO_TINY_ARCH: dict = {
    "image_size": 256,
    "patch_size": 4,
    "encoder_embed_dim": 96,
    "encoder_depth": 4,
    "encoder_num_heads": 3,
    # Windowed attention only (16 x 16 tokens = 64 px windows): on the 2-core CPU the demo is
    # trained on, one global layer over the 64 x 64 tokens costs about a third of the encoder,
    # and with relative position tables about ten windowed blocks. The decoder's two-way
    # attention is global, so prompts still see the whole image.
    "encoder_window_size": 16,
    "encoder_global_attn_indexes": (),
    "encoder_use_rel_pos": True,
    "prompt_embed_dim": 256,
    "decoder_depth": 2,
    "decoder_mlp_dim": 1024,
    "decoder_num_heads": 8,
    "decoder_attention_downsample_rate": 4,  # SAM uses 2; halves the cross-attention cost
}


def build_demo_tiny() -> nn.Module:
    """The ``demo_tiny`` SAM with random weights (about 4 M parameters)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    arch = DEMO_TINY_ARCH
    embedding_side = arch["image_size"] // arch["patch_size"]
    model = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch["encoder_depth"],
            embed_dim=arch["encoder_embed_dim"],
            img_size=arch["image_size"],
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=arch["encoder_num_heads"],
            patch_size=arch["patch_size"],
            qkv_bias=True,
            use_rel_pos=arch["encoder_use_rel_pos"],
            global_attn_indexes=arch["encoder_global_attn_indexes"],
            window_size=arch["encoder_window_size"],
            out_chans=arch["prompt_embed_dim"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch["prompt_embed_dim"],
            image_embedding_size=(embedding_side, embedding_side),
            input_image_size=(arch["image_size"], arch["image_size"]),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=arch["decoder_depth"],
                embedding_dim=arch["prompt_embed_dim"],
                mlp_dim=arch["decoder_mlp_dim"],
                num_heads=arch["decoder_num_heads"],
                attention_downsample_rate=arch["decoder_attention_downsample_rate"],
            ),
            transformer_dim=arch["prompt_embed_dim"],
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return model


def _sam_v1_builder(model_type: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from segment_anything import sam_model_registry

        return sam_model_registry[model_type](checkpoint=None)

    return build


def _sam2_builder(config_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from sam2.build_sam import build_sam2

        return build_sam2(config_name, ckpt_path=None, device="cpu")

    return build


_SAM2_SIZES = ("t", "s", "b+", "l")

#: ``(family, model_type) -> (builder of the random-init nn.Module, Backbone class)``.
BACKBONE_REGISTRY: dict[tuple[str, str], tuple[Callable[[], nn.Module], type[Backbone]]] = {
    ("sam", "vit_b"): (_sam_v1_builder("vit_b"), SamBackbone),
    ("sam", "vit_l"): (_sam_v1_builder("vit_l"), SamBackbone),
    ("sam", "vit_h"): (_sam_v1_builder("vit_h"), SamBackbone),
    ("sam", "demo_tiny"): (build_demo_tiny, SamBackbone),
    **{("sam2", f"hiera_{size}"): (_sam2_builder(f"configs/sam2.1/sam2.1_hiera_{size}.yaml"), Sam2Backbone)
       for size in _SAM2_SIZES},
    **{("sam2", f"sam2.0_hiera_{size}"): (_sam2_builder(f"configs/sam2/sam2_hiera_{size}.yaml"), Sam2Backbone)
       for size in _SAM2_SIZES},
}


def registered_backbones() -> list[tuple[str, str]]:
    """All registered ``(family, model_type)`` keys."""
    return list(BACKBONE_REGISTRY)


def build_model(family: str, model_type: str) -> nn.Module:
    """The random-init ``nn.Module`` of a registered backbone (on CPU, float32, train mode)."""
    key = (family, model_type)
    if key not in BACKBONE_REGISTRY:
        families = sorted({f for f, _ in BACKBONE_REGISTRY})
        if family not in families:
            raise BackboneError(f"unknown backbone family {family!r}; valid families: {families}")
        types_ = [t for f, t in BACKBONE_REGISTRY if f == family]
        raise BackboneError(f"unknown {family} model_type {model_type!r}; valid model types: {types_}")
    builder, _ = BACKBONE_REGISTRY[key]
    return builder()


def _read_state_dict(path: Path, model_type: str) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt / non-tensor files
        reason = error_line(error)
        raise BackboneError(f"{path}: cannot read checkpoint for model type {model_type!r}: {reason}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BackboneError(
            f"{path}: not a state dict (expected a dict of tensors or {{'model': state_dict}}) "
            f"for model type {model_type!r}"
        )
    return loaded


def _check_state_dict(model: nn.Module, state_dict: dict, path: Path, model_type: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (first {missing[0]!r})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]!r})")
        raise BackboneError(f"{path}: checkpoint does not match model type {model_type!r}: {', '.join(detail)}")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise BackboneError(
                f"{path}: checkpoint does not match model type {model_type!r}: {key!r} has shape "
                f"{tuple(state_dict[key].shape)}, the model expects {tuple(tensor.shape)}"
            )


def load_backbone(family: str, model_type: str, checkpoint: str | os.PathLike,
                  device: str | torch.device = "auto") -> Backbone:
    """Build ``(family, model_type)`` with random init and load ``checkpoint`` strictly.

    The checkpoint is read with ``torch.load(weights_only=True)`` and may be a raw state dict or
    ``{"model": state_dict}`` (SAM 2's format); float16 tensors are cast by ``load_state_dict``.
    The model is frozen (eval mode, ``requires_grad=False``) and moved to ``device``.

    Raises:
        BackboneError: unknown family / model type, missing or unreadable file, or a
            checkpoint whose keys or shapes do not match the model type.
    """
    device = resolve_device(device, key="sam.device")
    model = build_model(family, model_type)
    path = Path(checkpoint)
    if not path.is_file():
        raise BackboneError(f"{path}: checkpoint file not found (model type {family}/{model_type})")
    state_dict = _read_state_dict(path, model_type)
    _check_state_dict(model, state_dict, path, model_type)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if device.type == "cuda":
        enable_tf32()
    model.to(device)
    _, backbone_class = BACKBONE_REGISTRY[(family, model_type)]
    return backbone_class(model, model_type, path, device)
