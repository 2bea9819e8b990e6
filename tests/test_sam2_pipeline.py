"""SAM 2.1 (``hiera_t``, random weights saved to a file) through every stage after the cache:
training, both Laplace targets, fusion, and the evaluation with all strategies and refinements.

Random weights make the masks noise, so this checks that the SAM 2 code paths (high-resolution
features, its unpadded frame, boxes as labelled points, its decoder in TTA, prompt perturbation,
the decoder Laplace and the refinement pass) run end to end and write every report, not what
they score. Prompts are points and boxes (the demo fixture covers points alone).
"""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import torch
from modules.data.demo_dataset import write_demo_dataset
from modules.sam.registry import build_sam_model
from tests.conftest import PipelineProject, prepared_demo_project

STRATEGIES = ["raw_sam", "map_head", "tta", "prompt_perturbation", "laplace", "variance_network"]
REFINEMENTS = ["refined", "refined_constant", "refined_oracle_mask"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
#: Three of the demo's six groups, as a user's own data folder: SAM 2's encoder on the CPU is most of
#: this file's time; three groups (grayscale among them) still give every split an image of each.
GROUPS = ("plain", "camouflage", "medical_gray")


@pytest.fixture(scope="module")
def sam2_project(tmp_path_factory) -> PipelineProject:
    folder = tmp_path_factory.mktemp("sam2_pipeline")
    checkpoint = folder / "hiera_t.pt"
    torch.manual_seed(0)
    torch.save(build_sam_model("sam2", "hiera_t").state_dict(), checkpoint)
    # A group of 3 gets one image in each split.
    write_demo_dataset(folder / "demo" / "images", folder / "demo" / "masks", scenes_per_group=3, seed=2026)
    for kind in ("images", "masks"):
        for group in GROUPS:
            shutil.copytree(folder / "demo" / kind / group, folder / "data" / kind / group)
    project = prepared_demo_project(folder, {
        "demo.enabled": False,
        # Boxes too: SAM 2 turns them into two labelled points, and TTA / prompt perturbation move them.
        "sam.family": "sam2", "sam.model_type": "hiera_t", "sam.checkpoint": str(checkpoint),
        "sam.encoder_batch_size": 1, "sam.prompt_mode": "points_and_box",
        "prompt_generation.num_promptsets_train": 2, "training.num_epochs": 1,
        "fusion.num_epochs": 1, "fusion.max_train_rows": 4, "evaluation.max_samples": 2,
        "evaluation.tta.transforms": ["hflip", "rot90"], "evaluation.prompt_perturbation.num_samples": 2,
    }, env=ONE_THREAD)
    for script, *args in [("train_head.py", "--model", "head", "--run_id", "v1"),
                          ("train_head.py", "--model", "variance", "--run_id", "v1"),
                          ("fit_laplace.py", "--run_id", "v1"),
                          ("fit_laplace.py", "--run_id", "dec", "--set", "laplace.target=sam_decoder"),
                          ("train_head.py", "--model", "fusion", "--run_id", "v1")]:
        project.run(script, *args, env=ONE_THREAD)
    return project


def _overall(project: PipelineProject, name: str) -> pd.DataFrame:
    summary = pd.read_csv(project.root / "reports" / "eval" / name / "summary_overall.csv")
    return summary[summary.is_primary].set_index("method")


def test_sam2_evaluation_runs_every_strategy_and_refinement(sam2_project):
    sam2_project.run("evaluate_uncertainty.py", "--run_id", "v1", "--name", "sam2_head", env=ONE_THREAD)
    overall = _overall(sam2_project, "sam2_head")
    assert set(STRATEGIES + REFINEMENTS) <= set(overall.index)
    assert (overall.n_masks == 2 * 2).all()  # 2 test images x 2 prompt sets
    for method in STRATEGIES + REFINEMENTS:
        assert 0.0 <= overall.at[method, "mean_iou"] <= 1.0, method
        assert math.isfinite(overall.at[method, "nll"]) and math.isfinite(overall.at[method, "ece"]), method
    assert overall.at["laplace", "map"] == "total_entropy"
    refinement = pd.read_csv(sam2_project.root / "reports" / "eval" / "sam2_head" / "refinement.csv")
    assert set(REFINEMENTS) <= set(refinement.method)


def test_sam2_decoder_laplace_is_evaluated(sam2_project):
    """The SAM-decoder Laplace as a strategy; the other strategies and the refinement do not depend on
    the Laplace target and ran in the test above."""
    sam2_project.run("evaluate_uncertainty.py", "--run_id", "v1", "--laplace_run_id", "dec", "--name", "sam2_dec",
                     "--set", "laplace.target=sam_decoder", "--set", "evaluation.strategies=[raw_sam,laplace]",
                     "--set", "evaluation.refinement=false", env=ONE_THREAD)
    overall = _overall(sam2_project, "sam2_dec")
    assert set(overall.index) == {"raw_sam", "laplace"} and (overall.n_masks == 2 * 2).all()
    assert overall.at["laplace", "map"] == "total_entropy"
    assert 0.0 <= overall.at["laplace", "mean_iou"] <= 1.0 and math.isfinite(overall.at["laplace", "nll"])
