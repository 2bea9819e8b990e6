"""The one-image predictor (``modules/interactive/predictor.py``) and its command
(``predict_uncertainty.py``) on the small demo project trained through the fusion stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from modules.cache.entries import record_prompts
from modules.cache.training_index import open_cache
from modules.core.errors import PipelineError
from modules.data.imageio import read_image_rgb
from modules.data.promptset import frame256_to_pixels, to_frame256_points
from modules.evaluation.methods import Predictor
from modules.evaluation.runs import Artifacts, RunIds
from modules.evaluation.samples import list_eval_units, load_sample
from modules.interactive.predictor import PredictorError, UncertainPredictor, suggest_click
from modules.sam.prompting import decode_selected
from modules.stages.predict_uncertainty import promptsets_from_arguments
from tests.helpers.stage_calls import call_stage

#: The methods compared bit for bit with the evaluation (the stochastic ones are seeded by the sample id).
COMPARED = ("raw_sam", "map_head", "laplace", "variance_network", "refined")


@pytest.fixture(scope="module")
def cached_sample(fusion_project):
    """A test-split sample as the evaluation loads it, and the evaluation's outputs for it."""
    cfg = fusion_project.load_config("evaluation.strategies=[raw_sam, map_head, laplace, variance_network]")
    unit = list_eval_units(cfg)[0]
    labelled = load_sample(cfg, open_cache(cfg), unit)
    artifacts = Artifacts(cfg, RunIds.resolve("v1"), torch.device("cpu"))
    with torch.inference_mode():
        outputs = Predictor(cfg, artifacts).predict(labelled)
    return cfg, unit, labelled.inputs, outputs


@pytest.fixture(scope="module")
def predictor(fusion_project, cached_sample):
    cfg, unit, _, _ = cached_sample
    predictor = UncertainPredictor(cfg, RunIds.resolve("v1"), methods=list(COMPARED), device="cpu")
    predictor.set_image(read_image_rgb(unit.image_path), image_id=unit.sample_id)
    return predictor


def test_predictor_equals_the_batch_evaluation_on_a_cached_sample(cached_sample, predictor):
    cfg, unit, sample, expected = cached_sample
    sets = [{"points": s["points"], "labels": s["labels"], "box": s["box"]} for s in sample.record["promptsets"]]
    prediction = predictor.predict_sets(sets)
    assert np.array_equal(prediction.entry.logits, sample.cache_entry.logits)
    assert np.array_equal(prediction.predicted_iou, sample.cache_entry.selected_iou_predictions)
    for method in COMPARED:
        got, want = prediction.methods[method].frame256, expected[method]
        assert torch.equal(got.mean_prob, want.mean_prob.cpu()), method
        assert set(got.maps) == set(want.maps), method
        for name in want.maps:
            assert torch.equal(got.maps[name], want.maps[name].cpu()), (method, name)
        at_image = prediction.methods[method]
        assert at_image.probability.shape == (len(sets), *unit.image_hw)
        assert set(at_image.quality) == {"band_uncertainty", "foreground_uncertainty", "expected_iou"}
    # The same clicks as arrays (one prompt set) give that prompt set's row (up to the float
    # rounding of a batch of another size).
    first = sample.record["promptsets"][0]
    single = predictor.predict(first["points"], first["labels"], box=first["box"])
    assert single.num_promptsets == 1
    assert torch.allclose(single.methods["laplace"].frame256.mean_prob[0],
                          prediction.methods["laplace"].frame256.mean_prob[0], atol=1e-4)


def test_suggest_click_is_the_argmax_of_the_map_never_a_clicked_pixel(predictor, cached_sample):
    _, unit, sample, _ = cached_sample
    height, width = unit.image_hw
    first = sample.record["promptsets"][0]
    prediction = predictor.predict(first["points"], first["labels"])
    bald = prediction.methods["laplace"].frame256.maps["mutual_information"][0].numpy()
    cells = np.rint(to_frame256_points(np.asarray(first["points"], float), height, width)).astype(int)
    clicked = np.zeros_like(bald, dtype=bool)
    clicked[cells[:, 1], cells[:, 0]] = True
    spacing = 2 * sample.record["gaussian_sigma"]  # min_distance "auto", in FRAME256 pixels
    near = ndimage.distance_transform_edt(~clicked) < spacing
    assert near.sum() > clicked.sum()
    for min_distance, allowed in (("auto", ~near), (0, ~clicked)):
        x, y = suggest_click(prediction, "bald", min_distance=min_distance)
        row, col = np.unravel_index(np.argmax(np.where(allowed, bald, -np.inf)), bald.shape)
        assert (x, y) == tuple(frame256_to_pixels(np.array([[col, row]]), height, width)[0]), min_distance
        assert 0 <= x < width and 0 <= y < height
        assert (x, y) not in {(int(px), int(py)) for px, py in first["points"]}
    assert suggest_click(prediction, "bald") == suggest_click(prediction, "bald", min_distance="auto")
    # Clicking there, the next suggestion is elsewhere.
    again = suggest_click(prediction, "bald", previous=[*first["points"], [x, y]])
    assert again != (x, y)
    with pytest.raises(PredictorError, match="needs the method 'prompt_perturbation'"):
        suggest_click(prediction, "prompt_perturbation")
    with pytest.raises(PredictorError, match="unknown 'oracle'"):  # it reads the ground truth, never at hand
        suggest_click(prediction, "oracle")


def test_mask_input_is_decoded_by_sam_and_refused_by_the_fitted_methods(predictor, cached_sample):
    """An earlier prediction's low-res logits go back in as the mask prompt: SAM's output changes (the
    mask takes the prompt encoder's own mask path), only raw SAM runs, and a fitted method named with
    a mask says why it cannot run."""
    _, unit, sample, _ = cached_sample
    first = sample.record["promptsets"][0]
    plain = predictor.predict(first["points"], first["labels"], methods=["raw_sam"])
    low_res = plain.low_res_logits
    assert low_res.shape == (1, 256, 256) and low_res.dtype == np.float32
    assert np.array_equal(low_res, plain.entry.logits.astype(np.float32))
    inverted = predictor.predict(first["points"], first["labels"], mask_input=-low_res[0])
    assert list(inverted.methods) == ["raw_sam"]  # the default methods, less the fitted ones
    assert inverted.probability.shape == (1, *unit.image_hw)
    assert not np.allclose(inverted.low_res_logits, low_res, atol=1e-2)
    again = predictor.predict(first["points"], first["labels"], mask_input=low_res[None])  # P x 1 x 256 x 256
    assert not np.array_equal(again.low_res_logits, inverted.low_res_logits)
    # The dense embedding replacing the no-mask one is the prompt encoder's own for that mask.
    backbone, hw = predictor.backbone, unit.image_hw
    points = torch.as_tensor(np.asarray(first["points"], np.float32))[None]
    labels = torch.as_tensor(np.asarray(first["labels"]))[None]
    masks = torch.from_numpy(-low_res)[:, None]
    native = backbone.decode(predictor._features, hw, points, labels, mask_input=masks)
    overridden = backbone.decode(predictor._features, hw, points, labels,
                                 dense_embedding_override=backbone.mask_embedding(masks, hw))
    assert torch.equal(native[0], overridden[0])
    for method in ("map_head", "laplace", "variance_network", "refined"):
        with pytest.raises(PredictorError, match=rf"mask_input: the method '{method}' cannot run with a mask "
                                                 r"prompt: its fitted part was trained on SAM outputs decoded "
                                                 r"without a mask prompt"):
            predictor.predict(first["points"], first["labels"], mask_input=low_res, methods=["raw_sam", method])


def test_multimask_policy_single_keeps_sams_single_mask_output(predictor, cached_sample):
    """``multimask_policy="single"``: every prompt set keeps SAM's single-mask output, the logits the
    decoder gives without its multimask outputs (as the click simulation's later rounds on a real SAM
    checkpoint); the default keeps stage 3's best multimask output. An unknown name is one line."""
    _, _, sample, _ = cached_sample
    first = sample.record["promptsets"][0]
    default = predictor.predict(first["points"], first["labels"], methods=["raw_sam", "map_head"])
    single = predictor.predict(first["points"], first["labels"], methods=["raw_sam", "map_head"],
                               multimask_policy="single")
    assert default.entry.iou_predictions.shape == (1, 3) and single.entry.iou_predictions.shape == (1, 1)
    prompts, _ = record_prompts(single.record)  # the clicks, padded to the prompt sets' point width
    expected = decode_selected(predictor.backbone, predictor._features, predictor.image_hw, prompts,
                               predictor.cfg.sam.prompt_mode, "single")
    assert np.array_equal(single.entry.logits, expected.logits.to(torch.float16).numpy())
    assert not np.array_equal(single.entry.logits, default.entry.logits)
    assert np.array_equal(single.predicted_iou, expected.iou_predictions[:, 0].numpy())
    head_probability = [prediction.methods["map_head"].frame256.mean_prob for prediction in (single, default)]
    assert not torch.equal(*head_probability)
    assert predictor.later_output == "best_iou"  # the demo model keeps its multimask outputs (auto)
    with pytest.raises(PredictorError, match="multimask_policy: 'triple' is not one of single, best_iou"):
        predictor.predict(first["points"], first["labels"], multimask_policy="triple")


def test_predictor_refuses_bad_prompts_and_runs_with_one_line(fusion_project, predictor, cached_sample):
    _, unit, _, _ = cached_sample
    height, width = unit.image_hw
    with pytest.raises(PredictorError, match=rf"outside the {width} x {height} image"):
        predictor.predict([[width, 0]], [1])
    with pytest.raises(PredictorError, match=r"mask_input: need 256 x 256 or P x 256 x 256 .* P = 1 .* \(2, 256, 256\)"):
        predictor.predict([[0, 0]], [1], mask_input=np.zeros((2, 256, 256), np.float32))
    with pytest.raises(PredictorError, match=r"mask_input: need .* got shape \(64, 64\)"):
        predictor.predict([[0, 0]], [1], mask_input=np.zeros((64, 64), np.float32))
    with pytest.raises(PredictorError, match="fusion"):
        UncertainPredictor(predictor.cfg, RunIds.resolve("v1", fusion="nope"), methods=["refined"])
    # A mistyped run id is an error naming the runs there, not a silent fall back to SAM alone ...
    with pytest.raises(PredictorError, match=r"run id 'v2': no fitted method has its run there .* head runs [^)]*\bv1\b"):
        UncertainPredictor(predictor.cfg, RunIds.resolve("v2"))
    with pytest.raises(PredictorError, match=r"run ids head 'v2', variance 'v1', laplace 'v1', fusion 'v1'"):
        UncertainPredictor(predictor.cfg, RunIds.resolve("v1", head="v2"))
    # ... while SAM alone, asked for, runs under any id, and a missing fusion run alone is skipped.
    assert UncertainPredictor(predictor.cfg, RunIds.resolve("v2"), methods=["raw_sam"]).methods == ["raw_sam"]
    assert "refined" not in UncertainPredictor(predictor.cfg, RunIds.resolve("v1", fusion="nope")).methods
    # Runs fitted under another prompt-map sigma would read prompt maps they never saw.
    other_sigma = fusion_project.load_config("prompt_generation.gaussian_sigma=5")
    with pytest.raises(PredictorError, match=r"run_v1/config.resolved.yaml: the head run was fitted with "
                                             r"prompt_generation.gaussian_sigma=8"):
        UncertainPredictor(other_sigma, RunIds.resolve("v1"), methods=["map_head"])


def test_command_writes_overlay_maps_and_json(fusion_project, cached_sample, tmp_path):
    _, unit, _, _ = cached_sample
    height, width = unit.image_hw
    image = tmp_path / "predict_input.jpg"  # read from anywhere; written only inside the project root
    Image.fromarray(read_image_rgb(unit.image_path)).save(image, quality=95)
    out = fusion_project.root / "predictions" / "test_predictor"
    result = call_stage("predict_uncertainty", "--config", str(fusion_project.config), "--image", str(image),
                        "--point", f"{width // 2},{height // 2}", "--point", "1,1,0",
                        "--box", f"0,0,{width - 1},{height - 1}", "--out", str(out),
                        "--methods", "raw_sam,laplace,variance_network")
    assert result.code == 0, result.stderr
    summary = json.loads((out / "prediction.json").read_text())
    assert summary["image_hw"] == [height, width]
    assert set(summary["methods"]) == {"raw_sam", "laplace", "variance_network"}
    assert summary["promptsets"][0]["labels"] == [1, 0]
    assert summary["multimask_policy"] == "best_iou"  # sam.multimask_policy, as stage 3
    assert len(summary["predicted_iou"]) == 1
    for name in ("overlay.png", "probability.npy", "probability.png", "laplace_mutual_information.npy",
                 "laplace_mutual_information.png", "variance_network_log_variance.npy", "raw_sam_entropy.png"):
        assert (out / name).is_file(), name
    probability = np.load(out / "probability.npy")
    assert probability.shape == (1, height, width) and 0 <= probability.min() <= probability.max() <= 1
    assert Image.open(out / "overlay.png").size[0] > Image.open(out / "overlay.png").size[1]  # 4 panels in a row
    x, y = summary["suggested_click"]["bald"][0]
    assert 0 <= x < width and 0 <= y < height
    bad = call_stage("predict_uncertainty", "--config", str(fusion_project.config), "--image", str(image),
                     "--point", f"{width + 5},3", "--out", str(out))
    assert bad.code == 2
    assert bad.stderr.strip().count("\n") == 0 and "outside the" in bad.stderr, bad.stderr


def test_command_prompts_from_flags_and_from_a_file(tmp_path):
    assert promptsets_from_arguments(["10,20", "3.5,4,0"], "0,0,9,9", None) == [
        {"points": [[10.0, 20.0], [3.5, 4.0]], "labels": [1, 0], "box": [0.0, 0.0, 9.0, 9.0]}]
    assert promptsets_from_arguments([], "0,0,9,9", None)[0]["points"] is None
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"points": [[1, 2]], "labels": [1]}, {"points": [], "box": [0, 0, 5, 5]}]))
    sets = promptsets_from_arguments([], None, str(path))
    assert [s["box"] for s in sets] == [None, [0, 0, 5, 5]] and sets[1]["points"] is None
    for points, box, match in ((["1"], None, "--point '1'"), (["1,2,3"], None, "label must be"),
                               ([], "1,2,3", "--box '1,2,3'"), ([], None, "no prompt")):
        with pytest.raises(PipelineError, match=match):
            promptsets_from_arguments(points, box, None)
    with pytest.raises(PipelineError, match="not both"):
        promptsets_from_arguments(["1,2"], None, str(path))
    path.write_text("{}")
    with pytest.raises(PipelineError, match="non-empty JSON list"):
        promptsets_from_arguments([], None, str(path))
