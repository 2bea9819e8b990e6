"""modules/sam/fast_encoder.py: the fast encoder path equals the reference one (CPU, float32), and
int8 encoder weights (``sam.encoder_int8``) stay within int8 precision of the float ones.

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
                                      EncoderSettingsError, Int8WeightOnlyLinear, SdpaRelPosAttention,
                                      quantize_linear_weights)
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


@pytest.fixture(scope="module")
def hiera_t(tmp_path_factory):
    """SAM 2.1 hiera_t with random weights in a file, an image, and its reference-path features: the
    encode step at 512 px (a quarter of the 1024 px cost; Hiera takes any multiple of 32 here)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hiera_t") / "hiera_t.pt"
    torch.save({"model": build_sam_model("sam2", "hiera_t").state_dict()}, path)
    backbone = load_backbone("sam2", "hiera_t", path, "cpu", encoder=EncoderSettings("reference"))
    images = torch.randn(1, 3, 512, 512)
    with torch.inference_mode():
        reference = backbone.encoder_runner(images)
    return {"path": path, "backbone": backbone, "images": images, "reference": reference}


def test_sam2_fast_path_equals_reference(hiera_t):
    backbone, images, reference = hiera_t["backbone"], hiera_t["images"], hiera_t["reference"]
    with torch.inference_mode():
        assert backbone.configure_encoder(EncoderSettings("fast")).impl == "fast"
        fast = backbone.encoder_runner(images)
    assert backbone.model.image_encoder.trunk.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
    assert reference["high_res_feat0"].shape == (1, 32, 128, 128)
    scale = max(float(v.abs().max()) for v in reference.values())
    assert _max_diff(fast, reference) < 1e-5 * max(scale, 1.0)


# --------------------------------------------------------------------------- int8 weights


def _relative_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) / max(float(b[k].abs().max()), 1e-12) for k in b)


def test_int8_linear_rounds_each_row_to_its_own_scale():
    torch.manual_seed(0)
    linear = nn.Linear(64, 5)
    with torch.no_grad():
        linear.weight[1] *= 100.0  # rows of very different ranges keep their own scales
        linear.weight[3] = 0.0
    quantized = Int8WeightOnlyLinear.from_linear(linear)
    assert quantized.weight_int8.dtype == torch.int8 and quantized.weight_int8.abs().max() == 127
    dequantized = quantized.weight_int8.float() * quantized.scale[:, None]
    assert ((dequantized - linear.weight).abs() <= quantized.scale[:, None] / 2 + 1e-7).all()
    assert quantized.scale[3] == 1.0 and (quantized.weight_int8[3] == 0).all()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        expected, got = linear(x), quantized(x)
    assert got.shape == (2, 7, 5)
    for row in range(5):  # each output channel within int8 precision of its own range
        error = float((got[..., row] - expected[..., row]).abs().max())
        assert error <= 64 * float(quantized.scale[row]) / 2 * float(x.abs().max()) + 1e-6
    torch.testing.assert_close(got[..., 3], expected[..., 3])  # the zero row: the bias alone
    assert quantized(x.bfloat16()).dtype == torch.bfloat16


def test_int8_encoder_replaces_every_linear_layer_and_stays_close_on_the_demo_backbone(demo):
    reference = demo["reference"]
    cfg = load_config(overrides=[f"sam.checkpoint={DEMO_CHECKPOINT}", "sam.device=cpu", "sam.encoder_impl=reference",
                                 "sam.encoder_int8=true"])
    backbone = load_configured_backbone(cfg.sam)
    encoder = backbone.model.image_encoder
    assert backbone.encoder_int8 and "int8 weights" in repr(backbone)
    assert not any(type(m) is nn.Linear for m in encoder.modules())
    assert sum(isinstance(m, Int8WeightOnlyLinear) for m in encoder.modules()) == 4 * len(encoder.blocks)
    assert any(type(m) is nn.Linear for m in backbone.model.mask_decoder.modules())  # the decoder stays float
    assert set(backbone.model.state_dict()) != set(demo["backbone"].model.state_dict())
    int8 = backbone.encode(demo["images"])
    # int8 rounding moves the features (so the path is really taken), by about a percent of their range
    assert 1e-4 < _relative_diff(int8, reference) < 0.05
    points, labels = torch.tensor([[[60.0, 40.0], [10.0, 100.0]]]), torch.tensor([[1, 0]])
    int8_logits, _ = backbone.decode({k: v[:1] for k, v in int8.items()}, (120, 160), points, labels)
    float_logits, _ = backbone.decode({k: v[:1] for k, v in reference.items()}, (120, 160), points, labels)
    int8_mask, float_mask = int8_logits > 0, float_logits > 0
    assert float_mask.any()
    assert (int8_mask & float_mask).sum() / (int8_mask | float_mask).sum() >= 0.98  # the masks' IoU
    # the fast impl over int8 weights, and no silent way back to float weights
    backbone.configure_encoder(EncoderSettings("fast", int8=True))
    assert _relative_diff(backbone.encode(demo["images"]), int8) < 1e-5
    message = one_line_error(lambda: backbone.configure_encoder(EncoderSettings("fast")), EncoderSettingsError)
    assert message.startswith("sam.encoder_int8:")
    assert "sam.encoder_int8" in one_line_error(lambda: EncoderSettings(int8="yes").resolve(torch.device("cpu")),
                                                EncoderSettingsError)


def test_int8_sam2_hiera_encoder_stays_close(hiera_t):
    backbone = load_backbone("sam2", "hiera_t", hiera_t["path"], "cpu", encoder=EncoderSettings("reference", int8=True))
    with torch.inference_mode():
        int8 = backbone.encoder_runner(hiera_t["images"])
    trunk = backbone.model.image_encoder.trunk
    assert not any(type(m) is nn.Linear for m in trunk.modules())
    assert quantize_linear_weights(trunk) == 0  # nothing left to replace
    assert 1e-4 < _relative_diff(int8, hiera_t["reference"]) < 0.05


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
