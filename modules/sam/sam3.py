"""SAM 3's point and box tracker (``transformers``' ``Sam3TrackerModel``) behind the ``Backbone`` interface.

SAM 3's interactive ("SAM 1 task") path is SAM 2's prompt encoder and mask decoder on the features
of SAM 3's own ViT. The image encoder runs through ``transformers`` (``vision_encoder``, the
official ``sam3`` package is not used: see README "SAM 3"); the prompt encoder and mask decoder are
``sam2``'s own modules with the tracker's weights mapped onto them (``hf_weights``), so decoding,
``decode_features``, the decoder Laplace and the refinement run the SAM 2 code path.

SAM 3 stretches its input to 1008 x 1008 like SAM 2 (no padding); its feature maps are 288 / 144
/ 72 px, so its low-res masks are 288 x 288: the frame change to FRAME256 is a bilinear resize,
done as two resampling matrices (exact and linear, so it applies to decoder features alike).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import TwoWayTransformer
from torch import nn

from modules.core.frames import FRAME256
from modules.sam.base import MASK_INPUT_PAD_LOGIT, bilinear_matrix, checked_hw
from modules.sam.sam2 import Sam2Backbone

#: SAM 3's input side and normalisation (``Sam3TrackerProcessor``: mean = std = 0.5 on the 0-1 scale).
SAM3_IMAGE_SIZE = 1008
SAM3_PIXEL_MEAN = (0.5, 0.5, 0.5)
SAM3_PIXEL_STD = (0.5, 0.5, 0.5)


class Sam3TrackerImageModel(nn.Module):
    """The parts of SAM 3's tracker an image needs: ``vision_encoder`` (``transformers``),
    ``sam_prompt_encoder`` / ``sam_mask_decoder`` (``sam2``'s modules) and ``no_mem_embed``.

    ``vision_encoder`` is the module ``Sam3TrackerModel`` holds under the same name, so the
    tracker's ``vision_encoder.*`` weights load into it as they are.
    """

    def __init__(self, vision_encoder: nn.Module, embedding_side: int, image_size: int = SAM3_IMAGE_SIZE) -> None:
        super().__init__()
        self.image_size = image_size
        self.sam_image_embedding_size = embedding_side
        self.use_high_res_features_in_sam = True
        self.vision_encoder = vision_encoder
        self.sam_prompt_encoder = PromptEncoder(embed_dim=256, image_embedding_size=(embedding_side, embedding_side),
                                                input_image_size=(image_size, image_size), mask_in_chans=16)
        self.sam_mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256, use_high_res_features=True,
            iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
            use_multimask_token_for_obj_ptr=True, dynamic_multimask_via_stability=True,
            dynamic_multimask_stability_delta=0.05, dynamic_multimask_stability_thresh=0.98,
        )
        self.no_mem_embed = nn.Parameter(torch.zeros(1, 1, 256))


def build_sam3_tracker(config=None) -> Sam3TrackerImageModel:
    """The SAM 3 tracker's image model with random weights; ``config``: a ``transformers``
    ``Sam3TrackerConfig`` (default: ``facebook/sam3``'s architecture)."""
    from transformers import AutoModel, Sam3TrackerConfig  # a second of imports only SAM 3 users pay

    config = Sam3TrackerConfig() if config is None else config
    vision = config.vision_config
    embedding_side = int(vision.backbone_feature_sizes[-1][0])
    image_size = int(vision.backbone_config.image_size)
    return Sam3TrackerImageModel(AutoModel.from_config(vision), embedding_side, image_size)


class Sam3Backbone(Sam2Backbone):
    """SAM 3's point / box tracker (``sam3`` / ``tracker``): SAM 2's decoder path on SAM 3's features."""

    family = "sam3"
    image_encoder_attr = "vision_encoder"
    pixel_mean, pixel_std = SAM3_PIXEL_MEAN, SAM3_PIXEL_STD
    low_res_is_frame256 = False

    def __init__(self, model: nn.Module, model_type: str, checkpoint_path: Path, device: torch.device) -> None:
        super().__init__(model, model_type, checkpoint_path, device)
        with torch.inference_mode(False):  # normal tensors: a trainable pass may save them for backward
            self._to_256 = bilinear_matrix(self.low_res_size, FRAME256).float()

    # -- encoder -------------------------------------------------------------------------------

    def _encode_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``B x 3 x S x S`` -> ``image_embed`` B x 256 x 72 x 72, ``high_res_feat0`` B x 32 x 288 x
        288, ``high_res_feat1`` B x 64 x 144 x 144 (float32), as ``Sam3TrackerModel.get_image_embeddings``
        prepares them (``conv_s0`` / ``conv_s1`` applied, ``no_mem_embed`` added to the last map).
        ``transformers``' ViT already uses scaled-dot-product attention: the fast impl swaps nothing."""
        maps = list(self.model.vision_encoder(images, return_dict=True).fpn_hidden_states)
        decoder = self.model.sam_mask_decoder
        maps[0], maps[1] = decoder.conv_s0(maps[0]), decoder.conv_s1(maps[1])
        maps[-1] = maps[-1] + self.model.no_mem_embed.view(1, -1, 1, 1)
        return {"image_embed": maps[2].float(), "high_res_feat0": maps[0].float(), "high_res_feat1": maps[1].float()}

    # -- frames --------------------------------------------------------------------------------

    def to_frame256(self, low_res: torch.Tensor, original_hw) -> torch.Tensor:
        """``... x L x L`` maps in SAM 3's low-res frame (the stretched image, ``L = 288``) ->
        ``... x 256 x 256`` FRAME256: a bilinear resize (align_corners=False) as two matrix products."""
        checked_hw(original_hw)
        matrix = self._to_256.to(low_res.device)
        return torch.einsum("oh,...hw,pw->...op", matrix, low_res.float(), matrix)

    def from_frame256(self, logits: torch.Tensor, original_hw,
                      pad_value: float = MASK_INPUT_PAD_LOGIT) -> torch.Tensor:
        """``P x C x 256 x 256`` FRAME256 maps -> ``P x C x L x L`` resized bilinearly (nothing to
        pad: ``pad_value`` unused)."""
        checked_hw(original_hw)
        return F.interpolate(logits.float(), (self.low_res_size, self.low_res_size), mode="bilinear",
                             align_corners=False)
