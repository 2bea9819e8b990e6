"""SAM v1 (``vit_b`` / ``vit_l`` / ``vit_h``, and the tiny demo SAM) behind the ``Backbone`` interface.

SAM v1 pads its input, so its low-res frame differs from FRAME256; the exact linear map between
the two is built here from bilinear resampling matrices.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modules.core.frames import FRAME256
from modules.sam.base import MASK_INPUT_PAD_LOGIT, Backbone, SamDecoderPass, bilinear_matrix, hypernetwork_outputs
from modules.sam.fast_encoder import SAM_V1_SDPA_ATTENTION
from modules.sam.preprocessing import SamPreprocessor
from modules.sam.prompting import Prompts


# ----------------------------------------------------------------------------------------------
# FRAME256 <-> SAM v1's low-res frame (the padded S x S input frame at 256 x 256)
# ----------------------------------------------------------------------------------------------


def _sam_lowres_to_frame256_matrix(low_res: int, image_size: int, valid: int) -> torch.Tensor:
    """1-D map of ``Sam.postprocess_masks`` followed by a resize to FRAME256, as a matrix.

    SAM upsamples the ``low_res`` logits to ``image_size``, crops the first ``valid`` pixels
    (the unpadded image) and resizes to the original size; we resize to 256 instead. Bilinear
    resampling is separable and linear, so the composition is one ``256 x low_res`` matrix.
    """
    up = bilinear_matrix(low_res, image_size)[:valid]
    return (bilinear_matrix(valid, FRAME256) @ up).float()


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
    hyper_hidden, hyper_in = hypernetwork_outputs(mask_decoder, mask_tokens_out)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
    iou_pred = mask_decoder.iou_prediction_head(iou_token_out)
    return SamDecoderPass(masks, iou_pred, upscaled, hyper_hidden)


class SamBackbone(Backbone):
    """SAM v1 (``vit_b`` / ``vit_l`` / ``vit_h``) and the tiny demo SAM (``demo_tiny``)."""

    family = "sam"
    feature_names = ("image_embed",)
    attention_swaps = (SAM_V1_SDPA_ATTENTION,)

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

    def _mask_decoder(self) -> nn.Module:
        return self.model.mask_decoder

    @property
    def feature_shapes(self) -> dict[str, tuple[int, int, int]]:
        """``name -> (C, h, w)`` of ``encode``'s outputs, from the architecture (no probe encode)."""
        encoder = self.model.prompt_encoder
        return {"image_embed": (int(encoder.embed_dim), *map(int, encoder.image_embedding_size))}

    # -- encoder -------------------------------------------------------------------------------

    def _encode_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``B x 3 x S x S`` preprocessed images -> ``{"image_embed": B x 256 x 64 x 64}`` float32."""
        return {"image_embed": self.model.image_encoder(images).float()}

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

    def _encoder_prompts(self, original_hw, prompts: Prompts):
        """Points and boxes scaled from ORIGINAL to the resized INPUT frame (``ResizeLongestSide``)."""
        height, width = original_hw
        input_h, input_w = self.input_size(original_hw)
        scale = torch.tensor([input_w / width, input_h / height], device=self.device)
        points = None
        if prompts.point_coords is not None:
            points = (prompts.point_coords * scale, prompts.point_labels)
        boxes = None
        if prompts.boxes is not None:
            boxes = (prompts.boxes.reshape(-1, 2, 2) * scale).reshape(-1, 4)
        return points, boxes

    def _run_mask_decoder(self, features, sparse, dense, multimask_output):
        return self.model.mask_decoder(
            image_embeddings=features["image_embed"],
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def _decoder_pass(self, features, sparse, dense) -> SamDecoderPass:
        return sam_mask_decoder_pass(self.model.mask_decoder, features["image_embed"],
                                     self.model.prompt_encoder.get_dense_pe(), sparse, dense)
