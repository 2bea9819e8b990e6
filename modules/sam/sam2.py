"""SAM 2 and SAM 2.1 (Hiera ``t`` / ``s`` / ``b+`` / ``l``) behind the ``Backbone`` interface.

SAM 2 stretches its input without padding, so its low-res frame is FRAME256; its decoder also
takes two high-resolution feature maps and may switch an unstable single-mask output to a
multimask token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from modules.core.frames import FRAME256
from modules.sam.base import (MASK_INPUT_PAD_LOGIT, Backbone, BackboneError, SamDecoderPass, checked_hw,
                              hypernetwork_outputs)
from modules.sam.preprocessing import SAM2_PIXEL_MEAN, SAM2_PIXEL_STD, Sam2Preprocessor
from modules.sam.prompting import Prompts


def sam2_mask_decoder_pass(
    mask_decoder: nn.Module,
    image_embeddings: torch.Tensor,
    high_res_features: list[torch.Tensor],
    image_pe: torch.Tensor,
    sparse_embeddings: torch.Tensor,
    dense_embeddings: torch.Tensor,
) -> SamDecoderPass:
    """SAM 2 ``MaskDecoder.predict_masks`` unrolled, keeping the last layer's inputs.

    Args:
        mask_decoder: a ``sam2`` ``MaskDecoder``.
        image_embeddings: ``1 x C x h' x w'`` (shared by all prompt sets).
        high_res_features: ``[1 x C0 x 4h' x 4w', 1 x C1 x 2h' x 2w']`` (``conv_s0`` / ``conv_s1`` applied).
        image_pe: ``1 x C x h' x w'`` dense positional encoding.
        sparse_embeddings: ``P x T x C``; dense_embeddings: ``P x C x h' x w'``.

    ``masks`` and ``iou_predictions`` come back as float32 (the stability check reads them).
    """
    num_sets = sparse_embeddings.shape[0]
    first = 1 if mask_decoder.pred_obj_scores else 0  # the object-score token comes first
    leading = [mask_decoder.obj_score_token.weight] if mask_decoder.pred_obj_scores else []
    output_tokens = torch.cat(leading + [mask_decoder.iou_token.weight, mask_decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(num_sets, -1, -1), sparse_embeddings), dim=1)
    src = image_embeddings.expand(num_sets, -1, -1, -1) + dense_embeddings
    pos_src = image_pe.expand(num_sets, -1, -1, -1)
    batch, channels, height, width = src.shape
    hidden_states, src = mask_decoder.transformer(src, pos_src, tokens)
    iou_token_out = hidden_states[:, first, :]
    mask_tokens_out = hidden_states[:, first + 1 : first + 1 + mask_decoder.num_mask_tokens, :]
    src = src.transpose(1, 2).reshape(batch, channels, height, width)
    deconv1, norm1, act1, deconv2, act2 = mask_decoder.output_upscaling
    upscaled = act1(norm1(deconv1(src) + high_res_features[1]))
    upscaled = act2(deconv2(upscaled) + high_res_features[0])
    hyper_hidden, hyper_in = hypernetwork_outputs(mask_decoder, mask_tokens_out)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w).float()
    iou_pred = mask_decoder.iou_prediction_head(iou_token_out).float()
    return SamDecoderPass(masks, iou_pred, upscaled, hyper_hidden)


class Sam2Backbone(Backbone):
    """SAM 2 and SAM 2.1 (Hiera ``t`` / ``s`` / ``b+`` / ``l``), as ``SAM2ImagePredictor`` runs them."""

    family = "sam2"
    feature_names = ("image_embed", "high_res_feat0", "high_res_feat1")
    #: Clamp of SAM 2's low-res logits (``SAM2ImagePredictor._predict``; safe in float16).
    logit_clamp = 32.0
    #: Input normalisation (0-1 scale); SAM 3 (a subclass) uses its own.
    pixel_mean, pixel_std = SAM2_PIXEL_MEAN, SAM2_PIXEL_STD
    #: SAM 2's low-res frame is FRAME256 itself; a subclass with another low-res size resamples.
    low_res_is_frame256 = True

    def __init__(self, model: nn.Module, model_type: str, checkpoint_path: Path, device: torch.device) -> None:
        if not model.use_high_res_features_in_sam:
            raise BackboneError(f"sam2/{model_type}: configs without high-resolution features are not supported")
        preprocessor = Sam2Preprocessor(int(model.image_size), self.pixel_mean, self.pixel_std)
        super().__init__(model, model_type, checkpoint_path, device, preprocessor)
        self.low_res_size = 4 * int(model.sam_image_embedding_size)
        if self.low_res_is_frame256 and self.low_res_size != FRAME256:
            raise BackboneError(f"sam2/{model_type}: low-res masks are {self.low_res_size} px, expected {FRAME256}")

    def _prompt_encoder(self) -> nn.Module:
        return self.model.sam_prompt_encoder

    def _mask_decoder(self) -> nn.Module:
        return self.model.sam_mask_decoder

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

    def _encode_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``B x 3 x S x S`` -> ``image_embed`` B x 256 x 64 x 64, ``high_res_feat0`` B x 32 x
        256 x 256, ``high_res_feat1`` B x 64 x 128 x 128 (float32), as ``set_image_batch``
        prepares them (the decoder's ``conv_s0`` / ``conv_s1`` applied, ``no_mem_embed`` added to
        the lowest-resolution map). Hiera already uses scaled-dot-product attention: the fast impl
        swaps nothing here."""
        batch = images.shape[0]
        backbone_out = self.model.forward_image(images)
        _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        maps = [feat.permute(1, 2, 0).reshape(batch, -1, *size) for feat, size in zip(vision_feats, feat_sizes)]
        return {"image_embed": maps[-1].float(), "high_res_feat0": maps[0].float(), "high_res_feat1": maps[1].float()}

    # -- frames --------------------------------------------------------------------------------

    def to_frame256(self, low_res: torch.Tensor, original_hw) -> torch.Tensor:
        """SAM 2 stretches the image to ``S x S`` without padding: its low-res frame is FRAME256."""
        checked_hw(original_hw)
        return low_res.float()

    def from_frame256(self, logits: torch.Tensor, original_hw,
                      pad_value: float = MASK_INPUT_PAD_LOGIT) -> torch.Tensor:
        """FRAME256 maps are SAM 2's low-res frame as they are (nothing to pad: ``pad_value`` unused)."""
        checked_hw(original_hw)
        return logits.float()

    # -- decoder -------------------------------------------------------------------------------

    def _encoder_prompts(self, original_hw, prompts: Prompts):
        """Points in the ``S x S`` INPUT frame; boxes become two points with labels 2 and 3 placed
        before the clicks, as ``SAM2ImagePredictor._predict`` does (no separate box argument)."""
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
        return concat_points, None

    def _run_mask_decoder(self, features, sparse, dense, multimask_output):
        low_res, iou_predictions, _, _ = self.model.sam_mask_decoder(
            image_embeddings=features["image_embed"],
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=True,
            high_res_features=[features["high_res_feat0"], features["high_res_feat1"]],
        )
        return low_res, iou_predictions

    def _logits_to_frame256(self, low_res, original_hw, enable_grad):
        """Clamped to [-32, 32] like the predictor's low-res logits."""
        logits = torch.clamp(low_res.float(), -self.logit_clamp, self.logit_clamp)
        return self.to_frame256(logits, original_hw)

    def _decoder_pass(self, features, sparse, dense) -> SamDecoderPass:
        return sam2_mask_decoder_pass(self.model.sam_mask_decoder, features["image_embed"],
                                      [features["high_res_feat0"], features["high_res_feat1"]],
                                      self.model.sam_prompt_encoder.get_dense_pe(), sparse, dense)

    def _output_tokens(self, unrolled: SamDecoderPass, multimask_output: bool) -> torch.Tensor:
        """With ``dynamic_multimask_via_stability`` (eval mode) the single-mask output falls back,
        per prompt set, to the best multimask token when it is unstable, as ``MaskDecoder.forward``."""
        tokens = super()._output_tokens(unrolled, multimask_output)
        decoder = self.model.sam_mask_decoder
        if multimask_output or not (decoder.dynamic_multimask_via_stability and not decoder.training):
            return tokens
        best_multimask = (unrolled.iou_predictions[:, 1:].argmax(dim=-1) + 1)[:, None]
        is_stable = decoder._get_stability_scores(unrolled.masks[:, 0:1]) >= decoder.dynamic_multimask_stability_thresh
        return torch.where(is_stable, tokens, best_multimask)
