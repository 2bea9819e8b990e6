"""The unseen-domain protocol (``data.unseen_groups``), the bootstrap intervals over images and the
mask-level quality scores (``modules/data/domains.py``, ``modules/scoring/bootstrap.py``,
``modules/scoring/mask_quality.py``, ``modules/evaluation/intervals.py``).

The protocol tests run stage 4 onwards on a copy of the shared ``packed_project`` with the shipped
``config.yaml``'s held-out groups (``medical_gray`` and ``thin``; the shared fixtures hold out none) and
inspect what each stage trained on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from modules.cache.packed_reader import PackedSplitDataset
from modules.cache.training_index import load_index
from modules.core.config import ConfigError, load_config
from modules.core.fileio import file_md5
from modules.core.paths import checkpoint_run_dir, eval_report_dir, laplace_run_dir, packed_path, training_data_dir
from modules.data.manifest import load_split_manifest
from modules.evaluation import reports
from modules.evaluation.intervals import BootstrapSettings, DomainResampler, mask_quality_frame
from modules.evaluation.samples import LabelledSample
from modules.evaluation.scoreboard import ImageStatistics, Scoreboard, load_state_file, save_state
from modules.scoring import metrics
from modules.scoring.bootstrap import (auroc_from_histograms, ece_from_bins, percentile_interval, ratio_interval,
                                       resample_counts)
from modules.scoring.entropy import binary_entropy
from modules.scoring.mask_quality import (QUALITY_SCORES, mask_scores, quality_metrics, quality_values,
                                          weighted_aurc, weighted_auroc, weighted_spearman)
from modules.uncertainty.strategies import StrategyOutput
from tests.helpers.stage_calls import call_stage
from tests.stage_runner import REPO
from tests.test_uncertainty import disc_ground_truth, make_sample

UNSEEN = {"medical_gray", "thin"}


# --------------------------------------------------------------------------- the protocol on real stages


def _fingerprint(path):
    return json.loads(path.read_text())


def test_shipped_config_holds_out_two_demo_groups():
    assert set(load_config(REPO / "config.yaml").data.unseen_groups) == UNSEEN


@pytest.fixture(scope="module")
def held_out_project(packed_project, tmp_path_factory):
    """A copy of the packed fixture project run from stage 4 on with the demo's held-out groups: every
    fit (head, variance network, Laplace, fusion; one epoch each) and a small evaluation."""
    root = tmp_path_factory.mktemp("held_out") / "project"
    for name in ("manifests", "prompt_sets", "sam_cache"):
        shutil.copytree(packed_project.root / name, root / name)
    common = ["--config", str(packed_project.config), "--set", f"data.project_root={root}",
              "--set", "data.unseen_groups=[medical_gray, thin]", "--set", "training.num_epochs=1",
              "--set", "fusion.num_epochs=1", "--set", "fusion.max_train_rows=8",
              "--set", "evaluation.strategies=[raw_sam, map_head]", "--set", "evaluation.refinement=false",
              "--set", "evaluation.bootstrap_samples=100", "--set", "evaluation.qualitative_per_domain=0"]
    run = ("--run_id", "v1")
    for stage, extra in (("build_training_indices", ()), ("pack_to_hdf5", ()),
                         ("train_head", ("--model", "head", *run)), ("train_head", ("--model", "variance", *run)),
                         ("fit_laplace", run), ("train_head", ("--model", "fusion", *run)),
                         ("evaluate_uncertainty", ("--name", "held_out", *run))):
        outcome = call_stage(stage, *common, *extra)
        assert outcome.code == 0, (stage, outcome.stderr[-3000:])
    return root


def test_no_fit_sees_an_unseen_group(held_out_project):
    root = held_out_project
    manifest_groups = {split: set(load_split_manifest(root, split)["group"]) for split in ("train", "val", "test")}
    assert UNSEEN <= manifest_groups["train"]  # the manifests keep them: splits never change
    for split in ("train", "val"):
        index = load_index(root, split)
        assert len(index) and not UNSEEN & set(index["group"]), split
        packed = PackedSplitDataset(packed_path(root, split), in_memory=False)
        group_of = dict(zip(index["safe_id"], index["group"]))
        assert not UNSEEN & {group_of[safe_id] for safe_id in packed.sample_safe_ids}, split
        assert len(packed) == len(index)
        packed.close()
    test_index = load_index(root, "test")
    assert set(test_index["group"]) == manifest_groups["test"]  # evaluated, never fitted
    # Every stage that selects or fits on training data records the held-out groups, and the fits
    # record the packed splits they read, whose own record holds them too.
    data = training_data_dir(root)
    packing = data / ".stage.pack_to_hdf5.json"
    for path in (data / ".stage.build_training_indices.json", packing,
                 checkpoint_run_dir(root, "head", "v1") / ".stage.json",
                 checkpoint_run_dir(root, "variance", "v1") / ".stage.json",
                 checkpoint_run_dir(root, "fusion", "v1") / ".stage.json",
                 laplace_run_dir(root, "head", "v1") / ".stage.json",
                 eval_report_dir(root, "held_out") / ".stage.json"):
        recorded = _fingerprint(path)
        assert set(recorded["config"]["data.unseen_groups"]) == UNSEEN, path
    for model in ("head", "variance", "fusion"):
        upstream = _fingerprint(checkpoint_run_dir(root, model, "v1") / ".stage.json")["upstream"]
        assert upstream["packed_splits"] == file_md5(packing), model


def test_the_stage_reports_seen_and_unseen_side_by_side(held_out_project):
    folder = eval_report_dir(held_out_project, "held_out")
    tested = set(load_split_manifest(held_out_project, "test")["group"])
    by_domain = pd.read_csv(folder / "summary_by_domain.csv")
    kinds = dict(zip(by_domain["domain"], by_domain["domain_kind"]))
    assert {group: kinds[group] for group in tested} == {g: "unseen" if g in UNSEEN else "seen" for g in tested}
    assert {"seen", "unseen"} <= set(by_domain["domain"])
    assert {"mean_iou_lo", "mean_iou_hi", "auroc_lo", "auroc_hi", "n_images", "n_masks"} <= set(by_domain.columns)
    quality = pd.read_csv(folder / "mask_quality.csv")
    assert {"seen", "unseen", "overall"} <= set(quality["domain"]) and "sam_predicted_iou" in set(quality["score"])
    assert "(unseen, n=" in (folder / "summary.md").read_text()


def test_unseen_groups_are_checked_and_a_change_needs_force(packed_project, tmp_path):
    root = tmp_path / "project"
    for name in ("manifests", "prompt_sets", "sam_cache"):
        shutil.copytree(packed_project.root / name, root / name)
    data = training_data_dir(packed_project.root)
    for path in [*data.glob("*_index.csv"), data / ".stage.build_training_indices.json"]:
        (root / data.name).mkdir(exist_ok=True)
        shutil.copy2(path, root / data.name / path.name)
    run = lambda *extra: call_stage("build_training_indices", "--config", str(packed_project.config),  # noqa: E731
                                    "--set", f"data.project_root={root}", *extra)
    unknown = run("--set", "data.unseen_groups=[thin, nosuchgroup]")
    lines = [line for line in unknown.stderr.splitlines() if line.strip()]
    assert unknown.code == 2 and len(lines) == 1, unknown.stderr
    assert lines[0].startswith("error: data.unseen_groups: 'nosuchgroup' is not a group") and "plain" in lines[0]
    changed = run("--set", "data.unseen_groups=[thin]")
    assert changed.code == 2 and "data.unseen_groups" in changed.stderr and "--force" in changed.stderr
    forced = run("--set", "data.unseen_groups=[thin]", "--force")
    assert forced.code == 0, forced.stderr[-2000:]
    assert "medical_gray" in set(load_index(root, "train")["group"])
    assert "thin" not in set(load_index(root, "train")["group"])
    with pytest.raises(ConfigError, match=r"^data\.unseen_groups: need distinct"):
        load_config(None, ["data.unseen_groups=[thin, thin]"])


# --------------------------------------------------------------------------- bootstrap


def test_identical_images_give_a_zero_width_interval():
    counts = resample_counts(8, 500, seed=3)
    assert counts.shape == (500, 8) and (counts.sum(1) == 8).all()
    interval = ratio_interval(np.full(8, 2.4), np.full(8, 3.0), counts)
    assert interval.value == pytest.approx(0.8) and interval.lo == pytest.approx(0.8) and interval.hi == pytest.approx(0.8)
    np.testing.assert_array_equal(resample_counts(8, 500, seed=3), counts)  # seeded
    assert not np.array_equal(resample_counts(8, 500, seed=4), counts)


def test_interval_of_a_known_distribution_covers_the_truth_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    covered, widths = 0, []
    for trial in range(60):
        per_image = rng.normal(0.6, 0.1, size=40)
        interval = ratio_interval(per_image, np.ones(40), resample_counts(40, 400, seed=trial))
        covered += interval.lo <= 0.6 <= interval.hi
        widths.append(interval.hi - interval.lo)
    assert covered >= 50  # nominal 57 of 60
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 0.1 / math.sqrt(40), rel=0.15)
    assert math.isnan(percentile_interval(0.5, np.full(10, np.nan)).lo)


def test_per_image_sums_give_the_streaming_metrics():
    generator = torch.Generator().manual_seed(1)
    accumulator = metrics.UncertaintyAccumulator((0.0, 0.7), n_bins=50, calibration_bins=10)
    histograms, bins = [], []
    for _ in range(5):
        y = torch.rand(400, generator=generator) < 0.4
        p = (y.float() * 0.3 + torch.rand(400, generator=generator) * 0.7).clamp(0, 1)
        u = torch.rand(400, generator=generator) * 0.7
        single = metrics.UncertaintyAccumulator((0.0, 0.7), n_bins=50, calibration_bins=10)
        single.update(p, y, u)
        accumulator.update(p, y, u)
        histograms.append(single.error_detection.state_dict()["_histogram"].numpy())
        state = single.calibration.state_dict()
        bins.append([state[name].numpy() for name in ("_count", "_prob_sum", "_positive_sum")])
    expected = accumulator.compute()
    assert not math.isnan(expected["auroc"]) and expected["ece"] > 0
    assert auroc_from_histograms(np.sum(histograms, 0)) == pytest.approx(expected["auroc"], abs=1e-12)
    assert ece_from_bins(*np.sum(bins, 0)) == pytest.approx(expected["ece"], abs=1e-12)
    assert math.isnan(auroc_from_histograms(np.zeros((50, 2))))


# --------------------------------------------------------------------------- mask-level quality


def test_quality_metrics_on_known_rankings():
    iou = np.array([0.9, 0.8, 0.7, 0.45, 0.3, 0.1])
    perfect = quality_metrics(iou.copy(), iou)
    assert perfect["spearman"][0] == pytest.approx(1.0) and perfect["auroc_bad"][0] == pytest.approx(1.0)
    oracle_aurc = np.mean(np.cumsum(1 - iou) / np.arange(1, 7))
    assert perfect["aurc"][0] == pytest.approx(oracle_aurc)
    reversed_ = quality_metrics(-iou, iou)
    assert reversed_["spearman"][0] == pytest.approx(-1.0) and reversed_["auroc_bad"][0] == pytest.approx(0.0)
    assert reversed_["aurc"][0] > perfect["aurc"][0]
    constant = quality_metrics(np.zeros(6), iou)  # one tie group: chance, and the mean risk at every coverage
    assert constant["auroc_bad"][0] == pytest.approx(0.5) and math.isnan(constant["spearman"][0])
    assert constant["aurc"][0] == pytest.approx(np.mean(1 - iou))


def test_weights_equal_repeated_masks():
    rng = np.random.default_rng(2)
    quality, iou = rng.integers(0, 5, 12).astype(float), rng.random(12)
    weights = rng.integers(0, 3, (4, 12)).astype(float)
    for row in weights:
        repeated = np.repeat(np.arange(12), row.astype(int))
        for weighted, plain in ((weighted_spearman(quality, iou, row[None]), weighted_spearman(quality[repeated], iou[repeated])),
                                (weighted_auroc(-quality, iou < 0.5, row[None]),
                                 weighted_auroc(-quality[repeated], iou[repeated] < 0.5)),
                                (weighted_aurc(quality, 1 - iou, row[None]), weighted_aurc(quality[repeated], 1 - iou[repeated]))):
            np.testing.assert_allclose(weighted, plain, rtol=1e-12, equal_nan=True)


def test_mask_scores_of_a_known_mask():
    rows, cols = np.mgrid[:64, :64]
    disc = torch.from_numpy((rows - 32) ** 2 + (cols - 32) ** 2 < 15**2)
    prob = torch.stack([disc.double(), torch.zeros(64, 64, dtype=torch.float64)])
    uncertainty = torch.zeros(2, 64, 64)
    ring = disc ^ torch.from_numpy((rows - 32) ** 2 + (cols - 32) ** 2 < 13**2)
    uncertainty[0][ring] = 1.0  # uncertain only right at the boundary
    scores = mask_scores(prob, uncertainty, band_fraction=2 / math.hypot(64, 64))  # a 2-pixel band
    assert scores[0]["expected_iou"] == pytest.approx(1.0)
    assert scores[0]["band_uncertainty"] > 0.3 and scores[0]["foreground_uncertainty"] < scores[0]["band_uncertainty"]
    assert math.isnan(scores[1]["band_uncertainty"]) and math.isnan(scores[1]["expected_iou"])  # empty prediction
    quality = quality_values(np.array([scores[0]["band_uncertainty"], scores[1]["band_uncertainty"]]),
                             QUALITY_SCORES["boundary_band"])
    assert quality[1] == -np.inf and quality[0] > quality[1]  # an empty mask ranks least trustworthy


# --------------------------------------------------------------------------- reports


def _board(unseen=frozenset({"thin"})) -> Scoreboard:
    board = Scoreboard(10, torch.device("cpu"), unseen)
    for index in range(6):
        sample = dataclasses.replace(make_sample(f"s{index}", seed=index, num_sets=2), group=("plain", "cam", "thin")[index % 3])
        prob = torch.sigmoid(torch.from_numpy(sample.cache_entry.logits.astype(np.float32)) / (1 + index))
        board.score_sample(LabelledSample(sample, disc_ground_truth()),
                           {"raw_sam": StrategyOutput(prob, {"entropy": binary_entropy(prob)}, "entropy")})
    return board


def test_reports_list_seen_and_unseen_rows_with_intervals(tmp_path):
    board = _board()
    assert ("raw_sam", "entropy", "unseen") in board.accumulators and ("raw_sam", "entropy", "seen") in board.accumulators
    bootstrap = BootstrapSettings(samples=100, seed=0)
    summary = reports.summary_frame(board, ["raw_sam"], [], bootstrap)
    assert list(summary["domain"]) == ["cam", "plain", "thin", "seen", "unseen", "overall"]
    assert list(summary["domain_kind"]) == ["seen", "seen", "unseen", "seen", "unseen", "all"]
    assert list(summary["n_images"]) == [2, 2, 2, 4, 2, 6] and list(summary["n_masks"]) == [4, 4, 4, 8, 4, 12]
    for column in ("mean_iou", "auroc", "ece", "nll"):
        assert (summary[f"{column}_lo"] <= summary[column] + 1e-12).all() and (summary[column] <= summary[f"{column}_hi"] + 1e-12).all()
    per_mask = pd.DataFrame(board.rows)
    assert set(per_mask.loc[per_mask.group == "thin", "domain_kind"]) == {"unseen"}
    quality = mask_quality_frame(per_mask, ["raw_sam"], board.unseen_groups, DomainResampler(bootstrap))
    assert {"seen", "unseen", "overall"} <= set(quality["domain"])
    assert set(quality["score"]) == set(QUALITY_SCORES) and quality["n_images"].max() == 6
    text = reports.summary_markdown(summary, summary.iloc[0:0], "", ["raw_sam"], 6, len(per_mask), 10,
                                    mask_quality=quality, bootstrap_samples=100)
    assert "thin (unseen, n=2 images)" in text and "unseen (n=2 images)" in text and "overall (n=6 images)" in text
    auroc = summary.set_index("domain").loc["overall"]
    assert f"{auroc.auroc:.4f} [{auroc.auroc_lo:.4f}, {auroc.auroc_hi:.4f}]" in text
    assert "Which masks should a person check" in text
    # The per-image sums survive state.pt and merge across shards by concatenation.
    save_state(tmp_path / "state.pt", board)
    restored = Scoreboard(10, torch.device("cpu"), frozenset({"thin"}))
    restored.load_state(load_state_file(tmp_path / "state.pt"))
    pd.testing.assert_frame_equal(reports.summary_frame(restored, ["raw_sam"], [], bootstrap), summary)
    merged = ImageStatistics()
    merged.merge(board.images)
    with pytest.raises(Exception, match="in both shards"):
        merged.merge(board.images)
    assert len(merged.entries) == 6


def test_intervals_that_round_to_zero_carry_no_sign():
    assert reports.format_interval(-0.0001, -0.0004, 0.2) == "0.000 [0.000, 0.200]"
    assert reports.format_interval(-0.5, -0.7, -0.0002) == "-0.500 [-0.700, 0.000]"
    assert reports.format_interval(-0.0003, float("nan"), 1.0) == "0.000"
