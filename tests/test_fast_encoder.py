"""modules/sam/fast_encoder.py: the fast encoder path equals the reference one (CPU, float32).

SAM v1: the shipped demo backbone (trained, so its relative-position tables are not zero) through
the real loader, and a small ViT with a global attention layer and padded windows; SAM 2.1 hiera_t
with random weights from a file (its encode step at 512 px, for time). ``torch.compile`` itself is not run here (minutes on this CPU):
its static-batch padding is tested on a stand-in step.
"""

from __future__ import annotations

import typing
from functools import partial
from pathlib import Path

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import Attention
from torch import nn

from modules.core.config import ConfigError, SamConfig, load_config
from modules.sam.fast_encoder import (ENCODER_IMPLS, SAM_V1_SDPA_ATTENTION, EncoderRunner, EncoderSettings,
                                      EncoderSettingsError, SdpaRelPosAttention)
from modules.sam.registry import build_sam_model, load_backbone, load_configured_backbone
from tests.helpers.errors import one_line_error

REPO = Path(__file__).resolve().parents[1]
DEMO_CHECKPOINT = REPO / "assets" / "demo_backbone" / "demo_tiny.pt"


def _attention_classes(encoder: nn.Module) -> set[type]:
    return {type(m) for m in encoder.modules() if isinstance(m, Attention)}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def demo():
    """The demo backbone loaded with the fast impl, two images, and their reference features."""
    backbone = load_backbone("sam", "demo_tiny", DEMO_CHECKPOINT, "cpu", encoder=EncoderSettings("reference"))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size, generator=generator)
    reference = backbone.encode(images)
    backbone.configure_encoder(EncoderSettings("fast"))
    return {"backbone": backbone, "images": images, "reference": reference, "fast": backbone.encode(images)}


def test_sam_v1_fast_path_equals_reference_and_the_bias_matters(demo):
    backbone, reference, fast = demo["backbone"], demo["reference"], demo["fast"]
    encoder = backbone.model.image_encoder
    assert _attention_classes(encoder) == {SdpaRelPosAttention}
    assert encoder.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    scale = float(reference["image_embed"].abs().max())
    assert _max_diff(fast, reference) < 1e-5 * max(scale, 1.0)
    # The relative-position bias is what the fast path must carry over: without it the output moves
    # by orders of magnitude more than the tolerance above (so the check above can fail).
    blocks = [m for m in encoder.modules() if isinstance(m, Attention)]
    for block in blocks:
        block.use_rel_pos = False
    try:
        without_bias = backbone.encode(demo["images"])
    finally:
        for block in blocks:
            block.use_rel_pos = True
    assert _max_diff(without_bias, reference) > 100 * 1e-5 * max(scale, 1.0)


def test_demo_backbone_decodes_alike_with_both_impls_and_switches_back(demo):
    backbone = demo["backbone"]
    points = torch.tensor([[[60.0, 40.0], [10.0, 100.0]]])
    labels = torch.tensor([[1, 0]])
    features = {k: v[:1] for k, v in demo["fast"].items()}
    fast_logits, _ = backbone.decode(features, (120, 160), points, labels)
    reference_logits, _ = backbone.decode({k: v[:1] for k, v in demo["reference"].items()}, (120, 160), points, labels)
    torch.testing.assert_close(fast_logits, reference_logits, rtol=0, atol=1e-4)
    keys = list(backbone.model.state_dict())
    try:
        backbone.configure_encoder(EncoderSettings("reference"))
        assert _attention_classes(backbone.model.image_encoder) == {Attention}
        assert list(backbone.model.state_dict()) == keys  # same parameters, same checkpoint keys
        assert "reference" in repr(backbone)
    finally:
        backbone.configure_encoder(EncoderSettings("fast"))


def test_sam_v1_global_attention_and_padded_windows():
    torch.manual_seed(0)
    # 8 x 8 tokens: windows of 3 pad the map to 9 x 9; block 1 attends globally over all 64 tokens.
    encoder = ImageEncoderViT(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
                              out_chans=16, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                              use_rel_pos=True, window_size=3, global_attn_indexes=(1,)).eval()
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "rel_pos" in name:
                parameter.normal_(0.0, 0.5)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = encoder(images)
        assert SAM_V1_SDPA_ATTENTION.apply(encoder, fast=True) == 2
        fast = encoder(images)
        for block in encoder.blocks:
            block.attn.use_rel_pos = False
        without_bias = encoder(images)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)
    assert float((without_bias - reference).abs().max()) > 1e-2


def test_sam2_fast_path_equals_reference(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "hiera_t.pt"
    torch.save({"model": build_sam_model("sam2", "hiera_t").state_dict()}, path)
    backbone = load_backbone("sam2", "hiera_t", path, "cpu", encoder=EncoderSettings("reference"))
    # The encode step at 512 px (a quarter of the 1024 px cost; Hiera takes any multiple of 32 here).
    images = torch.randn(1, 3, 512, 512)
    with torch.inference_mode():
        reference = backbone.encoder_runner(images)
        assert backbone.configure_encoder(EncoderSettings("fast")).impl == "fast"
        fast = backbone.encoder_runner(images)
    assert backbone.model.image_encoder.trunk.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert reference["high_res_feat0"].shape == (1, 32, 128, 128)
    scale = max(float(v.abs().max()) for v in reference.values())
    assert _max_diff(fast, reference) < 1e-5 * max(scale, 1.0)


# --------------------------------------------------------------------------- static batches


def test_static_batch_splits_pads_and_drops_the_padding():
    calls = []

    def step(images):  # each image's output is its own index: padding must not show in the result
        calls.append(tuple(images.shape))
        return {"embed": images[:, :1].clone(), "sum": images.sum(dim=(1, 2, 3))}

    runner = EncoderRunner(step, channels_last=True, static_batch=2, compiled=False)
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 4, 4).contiguous()
    out = runner(images)
    assert calls == [(2, 3, 4, 4)] * 3
    assert out["embed"][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert out["sum"].tolist() == [48.0 * i for i in range(5)]
    with runner.eager():
        runner(images)
    assert calls[-1] == (5, 3, 4, 4)


# --------------------------------------------------------------------------- config


def test_settings_resolve_per_device_and_bad_values_name_the_key():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    auto = EncoderSettings(batch_size=8)
    assert auto.resolve(cuda).impl == "fast" and auto.resolve(cuda).compiled and auto.resolve(cuda).static_batch == 8
    assert auto.resolve(cpu).impl == "reference" and not auto.resolve(cpu).compiled
    assert EncoderSettings("fast").resolve(cpu).compiled is False  # compile auto: only on CUDA
    assert EncoderSettings("reference", compile=True, batch_size=3).resolve(cpu).static_batch == 3
    assert EncoderSettings("reference").resolve(cuda).compiled is False
    assert "sam.encoder_impl" in one_line_error(lambda: EncoderSettings("quick").resolve(cpu), EncoderSettingsError)
    assert "sam.compile_encoder" in one_line_error(lambda: EncoderSettings(compile="yes").resolve(cpu),
                                                   EncoderSettingsError)
    assert "sam.encoder_impl" in one_line_error(
        lambda: load_backbone("sam", "demo_tiny", DEMO_CHECKPOINT, "cpu", encoder=EncoderSettings("quick")),
        EncoderSettingsError)


def test_config_keys_validate_and_reach_the_loader():
    choices = typing.get_args(typing.get_type_hints(SamConfig)["encoder_impl"])
    assert set(choices) == {"auto", *ENCODER_IMPLS}  # the config's choices are the registry's
    message = one_line_error(lambda: load_config(overrides=["sam.encoder_impl=quick"]), ConfigError)
    assert message.startswith("sam.encoder_impl:")
    message = one_line_error(lambda: load_config(overrides=["sam.compile_encoder=sometimes"]), ConfigError)
    assert message.startswith("sam.compile_encoder:")
    cfg = load_config(overrides=[f"sam.checkpoint={DEMO_CHECKPOINT}", "sam.device=cpu", "sam.encoder_impl=fast",
                                 "sam.compile_encoder=false"])
    assert cfg.sam.compile_encoder is False
    backbone = load_configured_backbone(cfg.sam)
    assert backbone.encoder_settings.impl == "fast" and not backbone.encoder_settings.compiled
    assert _attention_classes(backbone.model.image_encoder) == {SdpaRelPosAttention}
