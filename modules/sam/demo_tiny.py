"""The bundled demo model: SAM v1's own blocks, small enough to train and run on a CPU.

``build_demo_tiny`` gives it with random weights; the shipped checkpoint is loaded like any
other (``registry.load_backbone("sam", "demo_tiny", ...)``).
"""

from __future__ import annotations

from functools import partial

from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

#: The tiny demo SAM: SAM's own blocks at 256 px input with 4 px patches, so the image embedding
#: is 256 x 64 x 64 and the low-res masks 256 x 256 exactly like the real SAM.
DEMO_TINY_ARCH: dict = {
    "image_size": 256,
    "patch_size": 4,
    "encoder_embed_dim": 96,
    "encoder_depth": 4,
    "encoder_num_heads": 3,
    # Windowed attention only (16 x 16 tokens = 64 px windows): a global layer over the 64 x 64
    # tokens would dominate the encoder's cost on the CPU the demo is trained on. The decoder's
    # two-way attention is global, so prompts still see the whole image.
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
    return build_small_sam(DEMO_TINY_ARCH)


def build_small_sam(arch: dict) -> nn.Module:
    """A SAM v1 of SAM's own blocks with random weights, sized by ``arch`` (the keys of
    ``DEMO_TINY_ARCH``)."""
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
