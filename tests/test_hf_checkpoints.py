"""SAM checkpoints in the formats users hold them: Hugging Face model folders (``SamModel``,
``Sam2Model``), ``.safetensors`` files and ``torch.save`` files with either key names.

Random weights in small configurations, saved by the libraries' own writers (``save_pretrained``,
``safetensors.torch.save_file``, ``torch.save``) and read by ``load_backbone``. The agreement
tests compare the project's backbone (the official modules with the mapped weights) with
``transformers``' own forward pass on the same weights, image and prompts.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from sam2.build_sam import build_sam2
from transformers import (Sam2Config, Sam2HieraDetConfig, Sam2Model, Sam2VisionConfig, Sam3TrackerConfig,
                          Sam3TrackerModel, SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig,
                          SamVisionConfig)
from transformers.models.sam3.configuration_sam3 import Sam3VisionConfig, Sam3ViTConfig

from modules.sam import hf_weights, registry
from modules.sam.base import BackboneError
from modules.core.config import load_config
from modules.sam.checkpoint_files import OFFICIAL_RELEASES, locate_checkpoint, read_state_dict
from modules.sam.demo_tiny import DEMO_TINY_ARCH, build_small_sam
from modules.sam.fast_encoder import EncoderSettings
from modules.sam.hf_weights import hf_to_official
from modules.sam.registry import load_backbone
from modules.sam.sam2 import Sam2Backbone
from modules.sam.sam3 import build_sam3_tracker
from modules.sam.sam_v1 import SamBackbone
from tests.conftest import small_demo_config
from tests.helpers.errors import one_line_error
from tests.helpers.stage_calls import SMALL, call_stage
from tests.stage_runner import REPO

#: A SAM v1 small enough for the CPU that ``transformers``' ``SamModel`` can express (its
#: two-way blocks fix the attention downsample rate at 2; the demo model uses 4).
TINY_ARCH = {**DEMO_TINY_ARCH, "encoder_embed_dim": 64, "encoder_depth": 2, "encoder_num_heads": 2,
             "decoder_attention_downsample_rate": 2}
TINY_TYPE = "hf_tiny"
IMAGE_HW = (200, 300)
POINTS = torch.tensor([[[50.0, 60.0], [120.0, 80.0]], [[250.0, 150.0], [10.0, 190.0]]])
LABELS = torch.tensor([[1, 0], [1, 1]])
BOXES = torch.tensor([[20.0, 30.0, 150.0, 120.0], [100.0, 50.0, 280.0, 190.0]])


@pytest.fixture
def tiny_registered(monkeypatch):
    """``("sam", "hf_tiny")`` registered (builder and weight signature) for this test only."""
    monkeypatch.setitem(registry.BACKBONE_REGISTRY, ("sam", TINY_TYPE), (lambda: build_small_sam(TINY_ARCH), SamBackbone))
    monkeypatch.setitem(hf_weights.SAM_SIGNATURES, (TINY_ARCH["encoder_embed_dim"], TINY_ARCH["encoder_depth"]),
                        TINY_TYPE)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (HF zero-initialises some, e.g. the relative positions), norms near 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05 + offset)


@pytest.fixture(scope="module")
def hf_sam():
    """A tiny ``SamModel`` (``TINY_ARCH``) with random weights."""
    arch = TINY_ARCH
    vision = SamVisionConfig(hidden_size=arch["encoder_embed_dim"], num_hidden_layers=arch["encoder_depth"],
                             num_attention_heads=arch["encoder_num_heads"], image_size=arch["image_size"],
                             patch_size=arch["patch_size"], window_size=arch["encoder_window_size"],
                             global_attn_indexes=list(arch["encoder_global_attn_indexes"]),
                             output_channels=arch["prompt_embed_dim"], mlp_dim=4 * arch["encoder_embed_dim"])
    prompt = SamPromptEncoderConfig(hidden_size=arch["prompt_embed_dim"], image_size=arch["image_size"],
                                    patch_size=arch["patch_size"], mask_input_channels=16)
    decoder = SamMaskDecoderConfig(hidden_size=arch["prompt_embed_dim"], num_hidden_layers=arch["decoder_depth"],
                                   mlp_dim=arch["decoder_mlp_dim"], num_attention_heads=arch["decoder_num_heads"])
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))
    _randomize(model, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def hf_sam_folder(hf_sam, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "sam-tiny"
    hf_sam.save_pretrained(folder)
    return folder


def _image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)


def test_hf_sam_folder_agrees_with_transformers_forward(tiny_registered, hf_sam, hf_sam_folder):
    backbone = load_backbone("sam", TINY_TYPE, hf_sam_folder, "cpu")
    assert sorted(p.name for p in hf_sam_folder.iterdir()) == ["config.json", "model.safetensors"]
    pixels = backbone.preprocess(_image())[None]
    features = backbone.encode(pixels)
    with torch.no_grad():
        hf_embedding = hf_sam.get_image_embeddings(pixels)
    assert torch.allclose(features["image_embed"], hf_embedding, atol=1e-3), \
        (features["image_embed"] - hf_embedding).abs().max()

    input_h, input_w = backbone.input_size(IMAGE_HW)
    scale = torch.tensor([input_w / IMAGE_HW[1], input_h / IMAGE_HW[0]])  # ORIGINAL -> INPUT frame
    for multimask, boxes in ((True, None), (False, BOXES)):
        logits, iou = backbone.decode(features, IMAGE_HW, point_coords=POINTS, point_labels=LABELS, boxes=boxes,
                                      multimask_output=multimask)
        with torch.no_grad():
            out = hf_sam(image_embeddings=hf_embedding, input_points=(POINTS * scale)[None],
                         input_labels=LABELS[None], multimask_output=multimask,
                         input_boxes=None if boxes is None else (boxes * scale.repeat(2))[None])
        hf_logits = backbone.to_frame256(out.pred_masks[0], IMAGE_HW)
        assert logits.shape == hf_logits.shape == (2, 3 if multimask else 1, 256, 256)
        assert logits.abs().max() > 0.1  # not a degenerate all-zero comparison
        # float32 on both sides, different op order: agreement to 1e-3 on logits of order 1
        assert torch.allclose(logits, hf_logits, atol=1e-3), (multimask, (logits - hf_logits).abs().max())
        assert torch.allclose(iou, out.iou_scores[0], atol=1e-3)


def test_every_format_loads_the_same_weights(tiny_registered, hf_sam, hf_sam_folder, tmp_path):
    hf_state = {k: v.contiguous() for k, v in hf_sam.state_dict().items()
                if k != "prompt_encoder.shared_embedding.positional_embedding"}  # the tied copy, as HF saves it
    official = hf_to_official(hf_state, "sam")
    files = {"hf.safetensors": hf_state, "hf.pt": hf_state, "official.safetensors": official,
             "official.pth": {"model": official}}
    reference = load_backbone("sam", TINY_TYPE, hf_sam_folder, "cpu").model.state_dict()
    for name, state in files.items():
        path = tmp_path / name
        save_file(state, path) if name.endswith(".safetensors") else torch.save(state, path)
        loaded = load_backbone("sam", TINY_TYPE, path, "cpu")
        assert loaded.checkpoint_path == path
        state_dict = loaded.model.state_dict()
        assert state_dict.keys() == reference.keys()
        assert all(torch.equal(state_dict[k], reference[k]) for k in reference), name


def _one_line(call) -> str:
    return one_line_error(call, BackboneError)


def test_checkpoint_errors_name_the_file_and_both_models(tiny_registered, hf_sam_folder, tmp_path):
    message = _one_line(lambda: load_backbone("sam", "demo_tiny", hf_sam_folder, "cpu"))
    assert message.startswith("sam.model_type:") and str(hf_sam_folder) in message
    assert f"sam/{TINY_TYPE}" in message and "sam.model_type=demo_tiny" in message
    message = _one_line(lambda: load_backbone("sam2", "hiera_t", hf_sam_folder, "cpu"))
    assert message.startswith("sam.family:") and "sam.family=sam2" in message
    assert "sam2.1_hiera_tiny.pt" in message and "facebook/sam2.1-hiera-tiny" in message

    hub_id = tmp_path / "facebook" / "sam-vit-huge"  # a hub id, resolved against the config folder
    message = _one_line(lambda: load_backbone("sam", "vit_h", hub_id, "cpu"))
    assert "'facebook/sam-vit-huge'" in message and "hf download facebook/sam-vit-huge" in message
    assert "sam.checkpoint: checkpoints/sam-vit-huge" in message

    no_config = tmp_path / "folder"
    no_config.mkdir()
    assert "config.json" in _one_line(lambda: load_backbone("sam", "vit_b", no_config, "cpu"))
    video = tmp_path / "sam2_video"
    video.mkdir()
    (video / "config.json").write_text('{"model_type": "sam2_video"}')
    save_file({"vision_encoder.backbone.blocks.0.proj.weight": torch.zeros(1)}, video / "model.safetensors")
    message = _one_line(lambda: load_backbone("sam2", "hiera_t", video, "cpu"))
    assert "sam2_video" in message and "Sam2Model" in message
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    message = _one_line(lambda: load_backbone("sam", "vit_b", damaged, "cpu"))
    assert str(damaged) in message and "safetensors" in message


#: A SAM 2 image model with a five-block Hiera (the stage widths and the decoder as in
#: ``hiera_t``), for both libraries.
SMALL_HIERA = {"stages": [1, 1, 2, 1], "global_att_blocks": [3]}


def _small_sam2_pair():
    backbone = Sam2HieraDetConfig(blocks_per_stage=SMALL_HIERA["stages"],
                                  global_attention_blocks=SMALL_HIERA["global_att_blocks"])
    hf = Sam2Model(Sam2Config(vision_config=Sam2VisionConfig(backbone_config=backbone)))
    _randomize(hf, seed=1)
    # Converted releases carry one positional matrix twice; random init draws two.
    hf.prompt_encoder.shared_embedding.positional_embedding.copy_(hf.shared_image_embedding.positional_embedding)
    official = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu", hydra_overrides_extra=[
        f"++model.image_encoder.trunk.stages=[{','.join(map(str, SMALL_HIERA['stages']))}]",
        f"++model.image_encoder.trunk.global_att_blocks=[{','.join(map(str, SMALL_HIERA['global_att_blocks']))}]",
    ])
    return hf.eval(), official.eval()


def test_hf_sam2_weights_agree_with_transformers_forward(tmp_path):
    hf, official = _small_sam2_pair()
    hf.save_pretrained(tmp_path / "sam2")
    state_dict = hf_to_official(read_state_dict(locate_checkpoint(tmp_path / "sam2")), "sam2")
    expected = official.state_dict()
    missing = {k for k in expected if k not in state_dict}
    assert missing and all(k.startswith(hf_weights.SAM2_VIDEO_ONLY_PREFIXES) for k in missing)
    official.load_state_dict({**expected, **state_dict}, strict=True)

    pixels = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = official.image_encoder(pixels)["backbone_fpn"]
        theirs = hf.vision_encoder(pixels, return_dict=True).fpn_hidden_states
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-3), (a - b).abs().max()

    # The decoder with the Sam2Backbone's own features and prompts, on random 1024-px-sized maps.
    backbone = Sam2Backbone(official, "hiera_t", tmp_path / "sam2", torch.device("cpu"))
    generator = torch.Generator().manual_seed(3)
    features = {name: torch.randn(1, *shape, generator=generator) for name, shape in backbone.feature_shapes.items()}
    maps = [features["high_res_feat0"], features["high_res_feat1"], features["image_embed"]]
    size = torch.tensor([IMAGE_HW[1], IMAGE_HW[0]], dtype=torch.float32)
    for multimask in (True, False):
        logits, iou = backbone.decode(features, IMAGE_HW, point_coords=POINTS, point_labels=LABELS, boxes=BOXES,
                                      multimask_output=multimask)
        with torch.no_grad():
            out = hf(image_embeddings=maps, input_points=(POINTS / size * 1024)[None], input_labels=LABELS[None],
                     input_boxes=(BOXES / size.repeat(2) * 1024)[None], multimask_output=multimask)
        hf_logits = out.pred_masks[0].clamp(-32, 32)
        assert logits.abs().max() > 0.1
        assert torch.allclose(logits, hf_logits, atol=1e-3), (multimask, (logits - hf_logits).abs().max())
        assert torch.allclose(iou, out.iou_scores[0], atol=1e-3)


def test_hf_folder_runs_stage_3_and_an_evaluation(tiny_registered, hf_sam_folder, tmp_path):
    """The stages call ``load_backbone`` / ``configured_checkpoint_md5`` with the folder as
    ``sam.checkpoint``: the SAM cache is named by the folder's MD5, and TTA (which re-encodes
    and re-decodes through the backbone) evaluates on it."""
    config = small_demo_config(tmp_path, {**SMALL, "sam.model_type": TINY_TYPE, "sam.checkpoint": str(hf_sam_folder),
                                          "evaluation.strategies": ["raw_sam", "tta"],
                                          "evaluation.tta.transforms": ["hflip"], "evaluation.refinement": False,
                                          "evaluation.max_samples": 1})
    for stage in ("build_manifests", "generate_promptsets", "precompute_sam_outputs"):
        outcome = call_stage(stage, "--config", str(config))
        assert outcome.code == 0, (stage, outcome.stderr[-2000:])
    caches = list((tmp_path / "project").rglob(f"sam-{TINY_TYPE}-*"))
    assert caches, sorted(str(p) for p in (tmp_path / "project").rglob("*"))[:20]
    outcome = call_stage("evaluate_uncertainty", "--config", str(config), "--run_id", "hf", "--name", "hf")
    assert outcome.code == 0, outcome.stderr[-2000:]
    summary = pd.read_csv(tmp_path / "project" / "reports" / "eval" / "hf" / "summary_overall.csv")
    assert {"raw_sam", "tta"} <= set(summary.method)
    assert summary.mean_iou.between(0, 1).all()


def test_example_config_is_a_valid_own_data_config():
    cfg = load_config(REPO / "configs" / "own_data_vit_h.yaml")
    assert not cfg.demo.enabled
    assert (cfg.sam.family, cfg.sam.model_type) == ("sam", "vit_h")
    assert cfg.sam.checkpoint.name == OFFICIAL_RELEASES[("sam", "vit_h")][0]
    assert cfg.data.project_root.is_relative_to(REPO) and cfg.data.images_root.is_relative_to(REPO)


def test_hf_sam3_tracker_agrees_with_transformers_forward(monkeypatch, tmp_path):
    """SAM 3's tracker (a one-block ViT; SAM 3's input side, feature sizes and decoder) through
    ``load_backbone``: its ViT runs in ``transformers``, its decoder as SAM 2's modules."""
    vit = Sam3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        global_attn_indexes=[0])
    config = Sam3TrackerConfig(vision_config=Sam3VisionConfig(
        backbone_config=vit, backbone_feature_sizes=[[288, 288], [144, 144], [72, 72]]))
    monkeypatch.setitem(registry.BACKBONE_REGISTRY, ("sam3", "tracker"),
                        (lambda: build_sam3_tracker(config), registry.BACKBONE_REGISTRY[("sam3", "tracker")][1]))
    monkeypatch.setitem(hf_weights.SAM3_SIGNATURES, (32, 1), "tracker")
    hf = Sam3TrackerModel(config)
    _randomize(hf, seed=4)
    hf.prompt_encoder.shared_embedding.positional_embedding.copy_(hf.shared_image_embedding.positional_embedding)
    hf.eval().save_pretrained(tmp_path / "sam3")
    backbone = load_backbone("sam3", "tracker", tmp_path / "sam3", "cpu")
    assert backbone.image_size == 1008 and backbone.low_res_size == 288

    pixels = backbone.preprocess(_image())[None]
    features = backbone.encode(pixels)
    with torch.no_grad():
        hf_maps = hf.get_image_embeddings(pixels)
    for ours, theirs in zip([features["high_res_feat0"], features["high_res_feat1"], features["image_embed"]], hf_maps):
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    size = torch.tensor([IMAGE_HW[1], IMAGE_HW[0]], dtype=torch.float32)
    for multimask, boxes in ((True, None), (False, BOXES)):
        logits, iou = backbone.decode(features, IMAGE_HW, point_coords=POINTS, point_labels=LABELS, boxes=boxes,
                                      multimask_output=multimask)
        with torch.no_grad():
            out = hf(image_embeddings=hf_maps, input_points=(POINTS / size * 1008)[None], input_labels=LABELS[None],
                     input_boxes=None if boxes is None else (boxes / size.repeat(2) * 1008)[None],
                     multimask_output=multimask)
        hf_logits = backbone.to_frame256(out.pred_masks[0].clamp(-32, 32), IMAGE_HW)
        assert logits.shape == hf_logits.shape == (2, 3 if multimask else 1, 256, 256)
        assert logits.abs().max() > 0.1
        assert torch.allclose(logits, hf_logits, atol=1e-4), (multimask, (logits - hf_logits).abs().max())
        assert torch.allclose(iou, out.iou_scores[0], atol=1e-4)
    unrolled = backbone.decode_features(features, IMAGE_HW, point_coords=POINTS, point_labels=LABELS)
    assert torch.allclose(unrolled.logits_from_hidden(unrolled.hyper_hidden), unrolled.logits, atol=1e-3)

    # sam.encoder_int8 reaches transformers' ViT too: every linear layer int8, the features close.
    backbone.configure_encoder(EncoderSettings(int8=True))
    assert not any(type(m) is torch.nn.Linear for m in backbone.model.vision_encoder.modules())
    int8 = backbone.encode(pixels)
    for name, value in features.items():
        difference = float((int8[name] - value).abs().max()) / float(value.abs().max())
        assert 1e-5 < difference < 0.05, (name, difference)
