"""modules/sam/ (base, sam_v1, sam2, registry): SAM v1 (vit_b) and SAM 2.1 (hiera_t) with random weights, loaded from files.

One image (120 x 160) per model; each model is built, saved, loaded and encoded once per module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from modules.core.config import ConfigError, load_config
from modules.core.device import DeviceError, resolve_device
from modules.core.frames import FRAME256
from modules.sam.base import (CPU_DECODER_BATCH, MASK_INPUT_PAD_LOGIT, BackboneError, checkpoint_md5,
                              resolve_decoder_batch)
from modules.sam.registry import build_sam_model, load_backbone, load_configured_backbone, registered_backbones
from tests.helpers.errors import one_line_error

HW = (120, 160)
REPO = Path(__file__).resolve().parents[1]


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*HW, 3), dtype=np.uint8)
    image[30:90, 50:120] = (200, 40, 40)
    return image


def _prompts():
    """P = 3 prompt sets: one positive and one negative point each, plus a box (ORIGINAL pixels)."""
    points = torch.tensor([[[80.0, 60.0], [10.0, 10.0]], [[60.0, 40.0], [150.0, 110.0]], [[100.0, 70.0], [5.0, 100.0]]])
    labels = torch.tensor([[1, 0], [1, 0], [1, -1]])
    boxes = torch.tensor([[50.0, 30.0, 119.0, 89.0], [40.0, 20.0, 130.0, 100.0], [0.0, 0.0, 159.0, 119.0]])
    return points, labels, boxes


def _loaded(tmp_path_factory, family, model_type, wrap_in_model_key, half):
    torch.manual_seed(0)
    state = build_sam_model(family, model_type).state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path_factory.mktemp(model_type) / f"{model_type}.pt"
    torch.save({"model": state} if wrap_in_model_key else state, path)
    backbone = load_backbone(family, model_type, path, "cpu")
    image = _image()
    pixels = backbone.preprocess(image)
    return {"backbone": backbone, "path": path, "image": image, "pixels": pixels,
            "features": backbone.encode(pixels[None])}


@pytest.fixture(scope="module")
def sam_v1(tmp_path_factory):
    # float16 file: load_state_dict must cast it back to float32
    return _loaded(tmp_path_factory, "sam", "vit_b", wrap_in_model_key=False, half=True)


@pytest.fixture(scope="module")
def sam2(tmp_path_factory):
    return _loaded(tmp_path_factory, "sam2", "hiera_t", wrap_in_model_key=True, half=False)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("demo") / "demo_tiny.pt"
    torch.save(build_sam_model("sam", "demo_tiny").state_dict(), path)
    return path


# --------------------------------------------------------------------------- registry and loading


def test_registry_lists_all_model_types():
    keys = set(registered_backbones())
    assert {("sam", t) for t in ("vit_b", "vit_l", "vit_h", "demo_tiny")} <= keys
    for size in ("t", "s", "b+", "l"):
        assert ("sam2", f"hiera_{size}") in keys and ("sam2", f"sam2.0_hiera_{size}") in keys


def test_loaded_model_is_frozen_and_described(sam_v1, sam2):
    for loaded, family, model_type in ((sam_v1, "sam", "vit_b"), (sam2, "sam2", "hiera_t")):
        backbone = loaded["backbone"]
        assert (backbone.family, backbone.model_type) == (family, model_type)
        assert backbone.image_size == 1024 and backbone.device == torch.device("cpu")
        assert backbone.checkpoint_path == loaded["path"]
        assert backbone.checkpoint_md5 == hashlib.md5(loaded["path"].read_bytes()).hexdigest()
        assert not backbone.model.training
        assert all(not p.requires_grad for p in backbone.model.parameters())
        assert all(p.dtype == torch.float32 for p in backbone.model.parameters())


def test_checkpoint_weights_are_the_saved_ones(tmp_path, demo_checkpoint):
    backbone = load_backbone("sam", "demo_tiny", demo_checkpoint, "cpu")
    saved = torch.load(demo_checkpoint, weights_only=True)
    for key, value in backbone.model.state_dict().items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0)


def test_checkpoint_md5_is_cached_but_follows_changes(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 3_000_000)
    assert checkpoint_md5(path) == hashlib.md5(path.read_bytes()).hexdigest()
    path.write_bytes(b"b" * 3_000_001)
    assert checkpoint_md5(path) == hashlib.md5(path.read_bytes()).hexdigest()


def _one_line_error(call) -> str:
    return one_line_error(call, BackboneError)


def test_load_errors_are_one_line_and_name_the_problem(tmp_path, demo_checkpoint):
    missing = tmp_path / "nope.pt"
    message = _one_line_error(lambda: load_backbone("sam", "vit_b", missing, "cpu"))
    assert str(missing) in message and "vit_b" in message

    message = _one_line_error(lambda: load_backbone("sam", "vit_x", demo_checkpoint, "cpu"))
    assert "vit_x" in message and "vit_b" in message and "demo_tiny" in message
    message = _one_line_error(lambda: load_backbone("sam4", "vit_b", demo_checkpoint, "cpu"))
    assert "sam4" in message and "sam2" in message

    # a demo_tiny checkpoint is not a vit_b checkpoint
    message = _one_line_error(lambda: load_backbone("sam", "vit_b", demo_checkpoint, "cpu"))
    assert str(demo_checkpoint) in message and "vit_b" in message and "image_encoder." in message

    state = torch.load(demo_checkpoint, weights_only=True)
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    reshaped = tmp_path / "reshaped.pt"
    torch.save(state, reshaped)
    message = _one_line_error(lambda: load_backbone("sam", "demo_tiny", reshaped, "cpu"))
    assert str(reshaped) in message and "mask_decoder.iou_token.weight" in message and "(1, 128)" in message

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    message = _one_line_error(lambda: load_backbone("sam", "demo_tiny", garbage, "cpu"))
    assert str(garbage) in message and "demo_tiny" in message

    not_tensors = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_tensors)
    assert str(not_tensors) in _one_line_error(lambda: load_backbone("sam", "demo_tiny", not_tensors, "cpu"))


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA"):
            resolve_device("cuda")


# --------------------------------------------------------------------------- preprocessing


def test_sam_v1_preprocess_matches_the_predictor(sam_v1):
    from segment_anything.utils.transforms import ResizeLongestSide

    backbone, image, pixels = sam_v1["backbone"], sam_v1["image"], sam_v1["pixels"]
    assert pixels.shape == (3, 1024, 1024) and pixels.dtype == torch.float32
    assert backbone.input_size(HW) == (768, 1024)
    resized = torch.as_tensor(ResizeLongestSide(1024).apply_image(image)).permute(2, 0, 1)[None]
    expected = backbone.model.preprocess(resized.float())[0]  # SamPredictor.set_image's path
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1e-5)
    assert torch.count_nonzero(pixels[:, 768:]) == 0  # bottom padding


def test_sam2_preprocess_matches_the_predictor(sam2):
    from sam2.utils.transforms import SAM2Transforms

    backbone, image, pixels = sam2["backbone"], sam2["image"], sam2["pixels"]
    assert pixels.shape == (3, 1024, 1024) and backbone.input_size(HW) == (1024, 1024)
    torch.testing.assert_close(pixels, SAM2Transforms(1024, 0.0)(image), rtol=0, atol=1e-5)


def test_preprocessor_is_picklable_and_pure(sam_v1, sam2):
    for loaded in (sam_v1, sam2):
        clone = pickle.loads(pickle.dumps(loaded["backbone"].preprocessor))
        torch.testing.assert_close(clone(loaded["image"]), loaded["pixels"], rtol=0, atol=0)
    with pytest.raises(BackboneError, match="uint8"):
        sam_v1["backbone"].preprocess(sam_v1["image"].astype(np.float32))
    with pytest.raises(BackboneError, match="H x W x 3"):
        sam_v1["backbone"].preprocess(sam_v1["image"][..., 0])


def test_prepare_hands_over_uint8_and_finish_batches_images_of_any_size(sam_v1, sam2):
    """Stage 3's split: workers send uint8 ``prepare`` outputs, ``finish`` makes the float batch on the
    encoding device. A batch mixing a landscape and a portrait image equals each image's own
    preprocessing, which equals the predictor's (tests above)."""
    portrait = np.ascontiguousarray(np.rot90(sam_v1["image"]))
    for loaded in (sam_v1, sam2):
        preprocessor = loaded["backbone"].preprocessor
        prepared = [preprocessor.prepare(loaded["image"]), preprocessor.prepare(portrait)]
        assert all(p.dtype == torch.uint8 for p in prepared)
        assert prepared[0].numel() <= 3 * 1024 * 1024 and prepared[0].shape[1:] != prepared[1].shape[1:]
        batch = preprocessor.finish(prepared, "cpu")
        assert batch.shape == (2, 3, 1024, 1024) and batch.dtype == torch.float32
        torch.testing.assert_close(batch[0], loaded["pixels"], rtol=0, atol=0)
        torch.testing.assert_close(batch[1], preprocessor(portrait), rtol=0, atol=0)
    # SAM v1 pads each image by its own resized size: the portrait's right side is padding.
    width = sam_v1["backbone"].input_size(portrait.shape[:2])[1]
    assert width < 1024 and torch.count_nonzero(sam_v1["backbone"].preprocessor.finish(
        [sam_v1["backbone"].preprocessor.prepare(portrait)])[0, :, :, width:]) == 0


# --------------------------------------------------------------------------- encode


def test_encode_shapes(sam_v1, sam2):
    assert {k: tuple(v.shape) for k, v in sam_v1["features"].items()} == {"image_embed": (1, 256, 64, 64)}
    assert sam_v1["backbone"].feature_names == ("image_embed",)
    assert {k: tuple(v.shape) for k, v in sam2["features"].items()} == {
        "image_embed": (1, 256, 64, 64), "high_res_feat0": (1, 32, 256, 256), "high_res_feat1": (1, 64, 128, 128)}
    assert sam2["backbone"].feature_names == ("image_embed", "high_res_feat0", "high_res_feat1")
    for loaded in (sam_v1, sam2):
        assert all(v.dtype == torch.float32 for v in loaded["features"].values())
        # The architecture-derived shapes (used to allocate cache files) equal what encode returns.
        assert loaded["backbone"].feature_shapes == {k: tuple(v.shape[1:]) for k, v in loaded["features"].items()}
    with pytest.raises(BackboneError, match="B x 3 x 1024 x 1024"):
        sam_v1["backbone"].encode(torch.zeros(1, 3, 256, 256))


def test_sam2_encode_matches_set_image_batch(sam2):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(sam2["backbone"].model)
    predictor.set_image_batch([sam2["image"]])
    reference = predictor._features
    torch.testing.assert_close(sam2["features"]["image_embed"], reference["image_embed"], rtol=0, atol=1e-4)
    torch.testing.assert_close(sam2["features"]["high_res_feat0"], reference["high_res_feats"][0], rtol=0, atol=1e-4)
    torch.testing.assert_close(sam2["features"]["high_res_feat1"], reference["high_res_feats"][1], rtol=0, atol=1e-4)


# --------------------------------------------------------------------------- decode


def test_sam_v1_decode_matches_the_predictor(sam_v1):
    from segment_anything import SamPredictor

    backbone, features = sam_v1["backbone"], sam_v1["features"]
    points, labels, boxes = _prompts()
    logits, iou = backbone.decode(features, HW, points, labels, boxes, multimask_output=True)
    assert logits.shape == (3, 3, 256, 256) and iou.shape == (3, 3)
    assert logits.dtype == torch.float32 and iou.dtype == torch.float32

    predictor = SamPredictor(backbone.model)
    predictor.features, predictor.original_size = features["image_embed"], HW
    predictor.input_size, predictor.is_image_set = backbone.input_size(HW), True
    _, iou_ref, low_res = predictor.predict_torch(
        predictor.transform.apply_coords_torch(points, HW), labels,
        predictor.transform.apply_boxes_torch(boxes, HW), multimask_output=True, return_logits=True)
    torch.testing.assert_close(iou, iou_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, backbone.to_frame256(low_res, HW), rtol=0, atol=1e-4)

    single, single_iou = backbone.decode(features, HW, points, labels, boxes, multimask_output=False)
    assert single.shape == (3, 1, 256, 256) and single_iou.shape == (3, 1)
    # features may come without the batch dimension; each prompt set is decoded independently
    alone, _ = backbone.decode({"image_embed": features["image_embed"][0]}, HW, points[1:2], labels[1:2], boxes[1:2])
    torch.testing.assert_close(alone, logits[1:2], rtol=0, atol=1e-4)


def test_sam2_decode_matches_the_predictor(sam2):
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    backbone, features = sam2["backbone"], sam2["features"]
    points, labels, boxes = _prompts()
    predictor = SAM2ImagePredictor(backbone.model)
    predictor._features = {"image_embed": features["image_embed"],
                           "high_res_feats": [features["high_res_feat0"], features["high_res_feat1"]]}
    predictor._orig_hw, predictor._is_image_set, predictor._is_batch = [HW], True, True
    for multimask in (True, False):
        logits, iou = backbone.decode(features, HW, points, labels, boxes, multimask_output=multimask)
        outputs = 3 if multimask else 1
        assert logits.shape == (3, outputs, 256, 256) and iou.shape == (3, outputs)
        mask_input, coords, point_labels, box = predictor._prep_prompts(points, labels, boxes, None, True, img_idx=0)
        _, iou_ref, low_res = predictor._predict(coords, point_labels, box, mask_input, multimask, True, img_idx=0)
        torch.testing.assert_close(iou, iou_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, low_res, rtol=0, atol=1e-4)
        assert logits.abs().max() <= 32.0


@pytest.mark.parametrize("model", ["sam_v1", "sam2"])
@pytest.mark.parametrize("multimask", [True, False])
def test_decode_features_reproduce_the_logits(model, multimask, request):
    loaded = request.getfixturevalue(model)
    backbone, features = loaded["backbone"], loaded["features"]
    points, labels, boxes = _prompts()
    logits, iou = backbone.decode(features, HW, points, labels, boxes, multimask_output=multimask)
    unrolled = backbone.decode_features(features, HW, points, labels, boxes, multimask_output=multimask)
    outputs = 3 if multimask else 1
    assert unrolled.upscaled_features.shape == (3, 32, 256, 256)
    assert unrolled.hyper_hidden.shape == (3, outputs, 256)
    assert unrolled.token_indices.shape == (3, outputs)
    assert len(unrolled.final_layers) == 4
    assert all(isinstance(layer, torch.nn.Linear) and layer.out_features == 32 for layer in unrolled.final_layers)
    if multimask:
        assert unrolled.token_indices.tolist() == [[1, 2, 3]] * 3
    torch.testing.assert_close(unrolled.logits.clamp(-32, 32), logits, rtol=0, atol=2e-4)
    torch.testing.assert_close(unrolled.iou_predictions, iou, rtol=0, atol=1e-5)
    # logit = (W h + b) . u(pixel), in FRAME256
    torch.testing.assert_close(unrolled.logits_from_hidden(unrolled.hyper_hidden), unrolled.logits, rtol=0, atol=2e-4)
    perturbed = unrolled.logits_from_hidden(unrolled.hyper_hidden + 0.5)
    assert not torch.allclose(perturbed, unrolled.logits)


def test_dense_embedding_override_and_mask_input(sam_v1, sam2):
    points, labels, _ = _prompts()
    for loaded in (sam_v1, sam2):
        backbone, features = loaded["backbone"], loaded["features"]
        logits, _ = backbone.decode(features, HW, points, labels, multimask_output=False)
        no_mask = backbone._prompt_encoder().no_mask_embed.weight.reshape(1, 256, 1, 1).expand(3, 256, 64, 64)
        same, _ = backbone.decode(features, HW, points, labels, multimask_output=False, dense_embedding_override=no_mask)
        torch.testing.assert_close(same, logits, rtol=0, atol=1e-4)
        other, _ = backbone.decode(features, HW, points, labels, multimask_output=False,
                                   dense_embedding_override=torch.zeros(3, 256, 64, 64))
        assert not torch.allclose(other, logits, atol=1e-3)

        mask_input = torch.where(torch.arange(256)[None, :] < 128, 8.0, -8.0).expand(3, 1, 256, 256)
        with_mask, _ = backbone.decode(features, HW, points, labels, mask_input=mask_input, multimask_output=False)
        embedded = backbone.mask_embedding(mask_input, HW)
        assert embedded.shape == (3, 256, 64, 64)
        via_override, _ = backbone.decode(features, HW, points, labels, multimask_output=False,
                                          dense_embedding_override=embedded)
        torch.testing.assert_close(via_override, with_mask, rtol=0, atol=1e-4)
        with pytest.raises(BackboneError, match="prompt sets"):
            backbone.decode(features, HW, points, labels, boxes=torch.zeros(2, 4))


def test_decoder_calls_of_a_few_prompt_sets_give_what_one_call_gives(sam_v1, sam2):
    """``decoder_batch = 2`` splits P = 7 prompt sets (points, boxes, a mask prompt each) into four
    mask-decoder calls whose outputs, in prompt-set order, are those of one call of all seven (to float
    rounding, which on the CPU may depend on a call's size), for both output modes, in ``decode`` and
    in the unrolled ``decode_features`` (the decoder Laplace's path)."""
    points, labels, boxes = _prompts()
    points, labels, boxes = (torch.cat([value, value, value[:1]]) for value in (points, labels, boxes))
    points = points + torch.arange(7.0).reshape(7, 1, 1)  # seven different prompt sets
    mask_input = torch.where(torch.arange(256)[None, :] < 100 + 10 * torch.arange(7.0).reshape(7, 1, 1, 1), 8.0,
                             -8.0).expand(7, 1, 256, 256)
    for loaded in (sam_v1, sam2):
        backbone, features = loaded["backbone"], loaded["features"]
        calls = []
        run_mask_decoder = backbone._run_mask_decoder
        backbone._run_mask_decoder = lambda *args: calls.append(args[1].shape[0]) or run_mask_decoder(*args)
        try:
            for multimask in (True, False):
                assert backbone.configure_decoder(0) == 0
                whole = backbone.decode(features, HW, points, labels, boxes, mask_input, multimask_output=multimask)
                assert backbone.configure_decoder(2) == 2
                split = backbone.decode(features, HW, points, labels, boxes, mask_input, multimask_output=multimask)
                assert calls[-5:] == [7, 2, 2, 2, 1]
                for part, one_call in zip(split, whole):
                    assert part.shape == one_call.shape and part.shape[0] == 7
                    torch.testing.assert_close(part, one_call, rtol=0, atol=1e-4)
            passes = []
            decoder_pass = backbone._decoder_pass
            backbone._decoder_pass = lambda *args: passes.append(args[1].shape[0]) or decoder_pass(*args)
            for multimask in (True, False):
                backbone.configure_decoder(0)
                whole = backbone.decode_features(features, HW, points, labels, boxes, mask_input,
                                                 multimask_output=multimask)
                backbone.configure_decoder(2)
                split = backbone.decode_features(features, HW, points, labels, boxes, mask_input,
                                                 multimask_output=multimask)
                assert passes[-5:] == [7, 2, 2, 2, 1]
                torch.testing.assert_close(split.token_indices, whole.token_indices, rtol=0, atol=0)
                for field in ("logits", "iou_predictions", "upscaled_features", "hyper_hidden"):
                    part, one_call = getattr(split, field), getattr(whole, field)
                    assert part.shape == one_call.shape and part.shape[0] == 7, field
                    torch.testing.assert_close(part, one_call, rtol=0, atol=1e-4, msg=field)
        finally:
            backbone._run_mask_decoder = run_mask_decoder
            backbone.__dict__.pop("_decoder_pass", None)
            backbone.configure_decoder("auto")


def test_decoder_batch_setting_resolves_per_device_and_bad_values_name_the_key(demo_checkpoint):
    assert resolve_decoder_batch("auto", torch.device("cpu")) == CPU_DECODER_BATCH
    assert resolve_decoder_batch("auto", torch.device("cuda")) == 0  # a GPU takes every prompt set at once
    assert resolve_decoder_batch(0, torch.device("cpu")) == 0 and resolve_decoder_batch(3, torch.device("cuda")) == 3
    for bad in (-1, "all", True, 2.5):
        with pytest.raises(BackboneError, match="^sam.decoder_batch: must be 'auto' or an integer"):
            resolve_decoder_batch(bad, torch.device("cpu"))
    assert load_backbone("sam", "demo_tiny", demo_checkpoint, "cpu").decoder_batch == CPU_DECODER_BATCH
    assert load_backbone("sam", "demo_tiny", demo_checkpoint, "cpu", decoder_batch=0).decoder_batch == 0
    message = _one_line_error(lambda: load_backbone("sam", "demo_tiny", "missing.pt", "cpu", decoder_batch=-2))
    assert message.startswith("sam.decoder_batch")  # before the checkpoint is looked for
    config = load_config(None, ["sam.decoder_batch=3"])
    assert load_configured_backbone(dataclasses.replace(config.sam, checkpoint=demo_checkpoint)).decoder_batch == 3
    with pytest.raises(ConfigError, match="sam.decoder_batch"):
        load_config(None, ["sam.decoder_batch=many"])


def test_the_decoder_batch_benchmark_runs_and_compares_call_sizes():
    out = subprocess.run([sys.executable, "benchmarks/bench_decoder_batch.py", "--promptsets", "3", "--sizes", "2",
                          "--repeats", "1", "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if ", P = 3, per prompt set: one call " in line]
    assert [row.split(",")[0] for row in rows] == ["sam demo_tiny", "sam2 hiera_t (random weights)"]
    assert all(float(re.search(r"2: [0-9.]+ ms \(([0-9.]+)x\)", row).group(1)) > 0 for row in rows)


def test_decode_with_grad_reaches_a_trainable_dense_embedding(demo_checkpoint):
    backbone = load_backbone("sam", "demo_tiny", demo_checkpoint, "cpu")
    image = _image()
    features = backbone.encode(backbone.preprocess(image)[None])
    dense = torch.zeros(2, 256, 64, 64, requires_grad=True)
    points, labels = torch.tensor([[[80.0, 60.0]], [[20.0, 20.0]]]), torch.ones(2, 1)
    logits, _ = backbone.decode(features, HW, points, labels, multimask_output=False,
                                dense_embedding_override=dense, enable_grad=True)
    logits.sum().backward()
    assert dense.grad is not None and dense.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())


# --------------------------------------------------------------------------- FRAME256


def test_sam_v1_to_frame256_is_sam_postprocessing_resized_to_256(sam_v1):
    backbone = sam_v1["backbone"]
    low_res = torch.randn(2, 3, 256, 256)
    input_h, input_w = backbone.input_size(HW)
    upsampled = F.interpolate(low_res, (1024, 1024), mode="bilinear", align_corners=False)
    reference = F.interpolate(upsampled[..., :input_h, :input_w], (256, 256), mode="bilinear", align_corners=False)
    torch.testing.assert_close(backbone.to_frame256(low_res, HW), reference, rtol=0, atol=1e-4)


def test_frame256_round_trip_and_geometry(sam_v1, sam2):
    # a smooth map in FRAME256: x256 + 2 * y256
    ys, xs = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    frame = (xs + 2 * ys)[None, None] / 100
    backbone = sam_v1["backbone"]
    low_res = backbone.from_frame256(frame, HW)
    assert low_res.shape == (1, 1, 256, 256)
    # 120 x 160 -> input 768 x 1024 -> valid low-res rows 192 of 256; the rest is padding
    assert torch.all(low_res[..., 192:, :] == MASK_INPUT_PAD_LOGIT)
    assert torch.all(backbone.from_frame256(frame, HW, pad_value=0.0)[..., 192:, :] == 0)
    back = backbone.to_frame256(low_res, HW)
    interior = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    torch.testing.assert_close(back[interior], frame[interior], rtol=0, atol=0.02)

    assert FRAME256 == 256
    sam2_backbone = sam2["backbone"]
    torch.testing.assert_close(sam2_backbone.to_frame256(frame, HW), frame)
    torch.testing.assert_close(sam2_backbone.from_frame256(frame, HW), frame)
