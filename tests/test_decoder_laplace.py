"""The SAM-decoder Laplace target (``laplace.target: sam_decoder``, ``modules/laplace/decoder.py``) on the
small demo project (``packed_project`` in tests/conftest.py), through the real ``fit_laplace.py``."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from modules.laplace import decoder as dl
from modules.laplace import decoder_fit as dfit
from modules.laplace import posterior as lp
from modules.uncertainty import decoder_laplace as dstrat
from tests.stage_runner import REPO
from modules.core.paths import laplace_run_dir

RUN_ID = "dec"
TARGET_SETTING = ["--set", "laplace.target=sam_decoder"]


@pytest.fixture(scope="module")
def decoder_fit(packed_project):
    """The project after one decoder-Laplace fit (run ``dec``) and the stage's stdout."""
    result = packed_project.run("fit_laplace.py", "--run_id", RUN_ID, *TARGET_SETTING)
    return packed_project, result.stdout


@pytest.fixture(scope="module")
def cfg(decoder_fit):
    project, _ = decoder_fit
    return project.load_config("laplace.target=sam_decoder")


@pytest.fixture(scope="module")
def backbone(cfg):
    from modules.sam.registry import load_backbone

    return load_backbone(cfg.sam.family, cfg.sam.model_type, cfg.sam.checkpoint, "cpu")


@pytest.fixture(scope="module")
def val_image(cfg, backbone):
    """The first validation image's rows, decoded."""
    rows = dfit.SplitRows(cfg, "val", backbone)
    return rows.decode(rows.sample_rows[0])


@pytest.fixture(scope="module")
def posterior(cfg):
    return dl.load_decoder_posterior(cfg, RUN_ID, "cpu")


def run_folder(cfg):
    return laplace_run_dir(cfg.project_root, dl.TARGET, RUN_ID)


def test_artifacts_hold_the_documented_metadata(decoder_fit, cfg):
    from modules.core.fileio import file_md5
    from modules.cache.packed_reader import packed_dataset

    folder = run_folder(cfg)
    for name in ("laplace_state.pt", "laplace_config.yaml", "posterior_meta.json", "prior_precision_nll.csv",
                 "prior_precision_nll.png", "quality.json"):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "posterior_meta.json").read_text())
    assert meta["target"] == "sam_decoder"
    assert meta["source_checkpoint_md5"] == file_md5(cfg.sam.checkpoint)
    per_token = 32 * 256 + 32
    assert [t["token"] for t in meta["tokens"]] == [0, 1, 2, 3]
    assert all(t["num_parameters"] == per_token for t in meta["tokens"])
    assert meta["num_parameters"] == 4 * per_token
    train_rows = len(packed_dataset(cfg, "train"))
    assert sum(t["n_prompts"] for t in meta["tokens"]) == train_rows
    assert meta["n_data"] == train_rows * 256 * 256 == sum(t["n_data"] for t in meta["tokens"])
    if cfg.sam.multimask_policy == "best_iou":  # stage 3 only ever keeps multimask tokens 1..3
        assert meta["tokens"][0]["n_prompts"] == 0
    assert meta["prior_precision_grid"] == list(cfg.laplace.prior_precision_grid)
    assert len(meta["prior_precision_nll"]) == len(meta["prior_precision_grid"])
    tried = meta["tuning_nll"]
    assert len(tried) == len(cfg.laplace.prior_precision_grid) * len(cfg.laplace.temperature_grid)
    best = min(tried, key=lambda row: row["val_nll"])
    assert (best["temperature"], best["prior_precision"]) == (meta["temperature"], meta["prior_precision"])
    assert set(meta["library_versions"]) >= {"torch", "laplace-torch"}
    quality = json.loads((folder / "quality.json").read_text())
    assert np.isfinite(quality["laplace_nll"]) and np.isfinite(quality["map_nll"])


def test_saved_variances_are_the_tempered_ggn_plus_prior(cfg):
    folder = run_folder(cfg)
    meta = dl.read_decoder_meta(folder)
    state = dl.read_decoder_state(folder)
    for token, token_state in state["tokens"].items():
        expected = 1.0 / (token_state["ggn_weight"] / meta.temperature + meta.prior_precision)
        torch.testing.assert_close(token_state["weight_variance"], expected.float(), rtol=1e-6, atol=0)
        n_prompts = next(t["n_prompts"] for t in meta.tokens if t["token"] == token)
        assert bool((token_state["ggn_weight"] > 0).any()) == (n_prompts > 0)


def test_rerun_skips_and_another_checkpoint_is_reported(decoder_fit, cfg, tmp_path):
    project, _ = decoder_fit
    state = run_folder(cfg) / "laplace_state.pt"
    before = state.stat().st_mtime_ns
    again = project.run("fit_laplace.py", "--run_id", RUN_ID, *TARGET_SETTING)
    assert "skipping" in again.stdout
    assert state.stat().st_mtime_ns == before
    other = tmp_path / "other_sam.pt"
    other.write_bytes(b"not the checkpoint the posterior was fitted on")
    mismatch = project.run("fit_laplace.py", "--run_id", RUN_ID, *TARGET_SETTING, "--set",
                           f"sam.checkpoint={other}", check=False)
    assert mismatch.returncode == 2
    assert "--force" in mismatch.stderr and "md5" in mismatch.stderr and "Traceback" not in mismatch.stderr
    assert state.stat().st_mtime_ns == before


def test_ggn_equals_the_brute_force_per_pixel_sum(val_image):
    """Factorised accumulation == sum over pixels of p (1 - p) phi^2 with phi = d logit / d (W_t, b_t),
    the gradient taken by autograd, on an 6 x 6 crop of every prompt set of one real image."""
    inputs = val_image.inputs
    crop = dl.DecoderHypernetInputs(inputs.upscaled[:, :, 120:126, 60:66].contiguous(), inputs.tokens,
                                    inputs.token_indices)
    accumulator = dl.DecoderGgnAccumulator(val_image.final_layers)
    accumulator.add(crop)
    for token, (weight, bias) in accumulator.means.items():
        expected_weight = torch.zeros_like(weight, dtype=torch.float64)
        expected_bias = torch.zeros_like(bias, dtype=torch.float64)
        for prompt in torch.nonzero(crop.token_indices == token).reshape(-1).tolist():
            u = crop.upscaled[prompt].reshape(weight.shape[0], -1)
            for pixel in range(u.shape[1]):
                w = weight.double().clone().requires_grad_(True)
                b = bias.double().clone().requires_grad_(True)
                logit = (w @ crop.tokens[prompt].double() + b) @ u[:, pixel].double()
                grad_w, grad_b = torch.autograd.grad(logit, (w, b))
                curvature = torch.sigmoid(logit) * torch.sigmoid(-logit)
                expected_weight += curvature.detach() * grad_w.square()
                expected_bias += curvature.detach() * grad_b.square()
        entry = accumulator.curvature[token]
        torch.testing.assert_close(entry.ggn_weight, expected_weight, rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(entry.ggn_bias, expected_bias, rtol=1e-4, atol=1e-10)
        assert entry.n_pixels == int((crop.token_indices == token).sum()) * 36
    assert accumulator.n_pixels == crop.tokens.shape[0] * 36


def test_huge_prior_precision_gives_the_decoder_probability(val_image, cfg):
    state = dl.read_decoder_state(run_folder(cfg))
    accumulator = dl.DecoderGgnAccumulator(val_image.final_layers)
    for token, entry in accumulator.curvature.items():
        entry.ggn_weight += state["tokens"][token]["ggn_weight"]
        entry.ggn_bias += state["tokens"][token]["ggn_bias"]
    tight = dl.DecoderPosterior.from_curvature(accumulator.means, accumulator.curvature, prior_precision=1e15)
    predictive = tight.predictive(val_image.inputs)
    assert float(predictive["logit_var"].max()) < 1e-4
    torch.testing.assert_close(predictive["mean_prob"], torch.sigmoid(val_image.decoder_logits), rtol=0, atol=1e-4)
    torch.testing.assert_close(predictive["logit_mean"], val_image.decoder_logits, rtol=1e-4, atol=1e-3)
    loose = dl.DecoderPosterior.from_curvature(accumulator.means, accumulator.curvature, prior_precision=1e-2)
    assert float(loose.predictive(val_image.inputs)["logit_var"].min()) > 0


def test_uncertainty_maps_are_seeded_and_mutual_information_is_nonnegative(posterior, val_image):
    first = posterior.uncertainty_maps(val_image.inputs, 6, seed=3)
    again = posterior.uncertainty_maps(val_image.inputs, 6, seed=3)
    other = posterior.uncertainty_maps(val_image.inputs, 6, seed=4)
    for name in first:
        assert torch.equal(first[name], again[name]), name
    assert not torch.equal(first["total_entropy"], other["total_entropy"])
    assert float(first["mutual_information"].min()) >= 0
    assert float(first["mutual_information"].max()) > 0
    assert bool((first["expected_entropy"] <= first["total_entropy"] + 1e-6).all())
    samples = posterior.sample_logits(val_image.inputs, 6, seed=3)
    assert samples.shape == (6, *val_image.decoder_logits.shape)


def test_posterior_refuses_other_decoder_weights(posterior, val_image):
    layers = [torch.nn.Linear(layer.in_features, layer.out_features) for layer in val_image.final_layers]
    with pytest.raises(dl.DecoderLaplaceError, match="another SAM checkpoint"):
        posterior.check_final_layers(layers, "test")
    posterior.check_final_layers(val_image.final_layers, "test")


def _eval_sample(cfg):
    from modules.evaluation.samples import list_eval_units, load_sample
    from modules.cache.training_index import open_cache

    unit = list_eval_units(cfg)[0]
    return load_sample(cfg, open_cache(cfg), unit).inputs


STRATEGY_SCRIPT = """
import sys, torch
from modules.core.config import load_config
from modules.sam.registry import load_backbone
from modules.laplace import decoder as dl
from modules.uncertainty import decoder_laplace as dstrat
from tests.test_decoder_laplace import _eval_sample
cfg = load_config(sys.argv[1], ["laplace.target=sam_decoder"])
backbone = load_backbone(cfg.sam.family, cfg.sam.model_type, cfg.sam.checkpoint, "cpu")
posterior = dl.load_decoder_posterior(cfg, "dec", "cpu")
strategy = dstrat.DecoderLaplaceStrategy(backbone, posterior, 5, seed=11, prompt_mode=cfg.sam.prompt_mode,
                                     multimask_policy=cfg.sam.multimask_policy)
output = strategy.predict(_eval_sample(cfg))
torch.save({"mean_prob": output.mean_prob, **output.maps}, sys.argv[2])
"""


def test_strategy_shapes_and_a_fresh_process_reproduces_it(decoder_fit, cfg, backbone, posterior, tmp_path):
    project, _ = decoder_fit
    sample = _eval_sample(cfg)
    strategy = dstrat.DecoderLaplaceStrategy(backbone, posterior, 5, seed=11, prompt_mode=cfg.sam.prompt_mode,
                                         multimask_policy=cfg.sam.multimask_policy)
    output = strategy.predict(sample)
    shape = (sample.num_promptsets, 256, 256)
    assert output.mean_prob.shape == shape and output.primary_map == "total_entropy"
    assert set(output.maps) == {"mutual_information", "total_entropy", "expected_entropy"}
    assert all(values.shape == shape and values.dtype == torch.float32 for values in output.maps.values())
    assert float(output.mean_prob.min()) >= 0 and float(output.mean_prob.max()) <= 1
    # The decoder re-run on the cache reproduces stage 3's cached logits (float16-rounded there).
    _, logits = strategy.decode(sample)
    cached = torch.from_numpy(np.asarray(sample.cache_entry.logits)).float()
    torch.testing.assert_close(logits, cached, rtol=2e-3, atol=2e-2)

    saved = tmp_path / "strategy.pt"
    subprocess.run([sys.executable, "-c", STRATEGY_SCRIPT, str(project.config), str(saved)], cwd=REPO, check=True,
                   capture_output=True, text=True, timeout=300)
    fresh = torch.load(saved, weights_only=True)
    assert torch.equal(fresh["mean_prob"], output.mean_prob)
    for name, values in output.maps.items():
        assert torch.equal(fresh[name], values), name


def test_grid_search_keeps_the_lowest_validation_nll(cfg, val_image):
    state = dl.read_decoder_state(run_folder(cfg))
    accumulator = dl.DecoderGgnAccumulator(val_image.final_layers)
    for token, entry in accumulator.curvature.items():
        entry.ggn_weight += state["tokens"][token]["ggn_weight"]
        entry.ggn_bias += state["tokens"][token]["ggn_bias"]
    search = dfit.search_temperature_and_prior(accumulator.means, accumulator.curvature, [val_image],
                                             prior_grid=[1e-3, 1.0, 1e3], temperature_grid=[1.0, 1e4])
    assert len(search.table) == 6
    best = search.table["val_nll"].idxmin()
    assert search.temperature == search.table.loc[best, "temperature"]
    assert search.prior_search.best_prior_precision == search.table.loc[best, "prior_precision"]
    single = dl.DecoderPosterior.from_curvature(accumulator.means, accumulator.curvature, 1.0, 1e4)
    probability = single.predictive(val_image.inputs)["mean_prob"]
    nll = float(lp.binary_nll(probability, val_image.targets).double().mean())
    row = search.table[(search.table["temperature"] == 1e4) & (search.table["prior_precision"] == 1.0)]
    assert abs(float(row["val_nll"].iloc[0]) - nll) < 1e-6
    with pytest.raises(dl.DecoderLaplaceError, match="laplace.temperature_grid"):
        dfit.search_temperature_and_prior(accumulator.means, accumulator.curvature, [val_image], [1.0], [0.0])
