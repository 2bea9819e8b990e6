"""Stage 7 split across processes (``modules/stages/evaluate_uncertainty.py``): shards of a SLURM array
score their samples, the last one merges (``Scoreboard.merge``), and the reports equal a one-process
run's; the array and its merge job run through the SLURM launch path (``core/slurm_launch.py``) on
submitit's LocalExecutor. The stage tests run the real script on the ``fusion_project`` fixture
(``tests/conftest.py``)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from modules.core.paths import eval_report_dir
from modules.core.pipeline_plan import StageCall
from modules.core.slurm_launch import add_launcher_arguments, launch
from modules.evaluation.reports import CSV_FILES
from modules.evaluation.samples import LabelledSample
from modules.evaluation.scoreboard import Scoreboard
from modules.scoring.entropy import binary_entropy
from modules.uncertainty.strategies import StrategyOutput
from tests.helpers.stage_calls import call_stage
from tests.test_uncertainty import disc_ground_truth, make_sample

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
CHEAP = ("--set", "evaluation.strategies=[raw_sam,map_head]", "--set", "evaluation.refinement=false")


def scored_sample(board: Scoreboard, safe_id: str, seed: int, group: str) -> None:
    sample = dataclasses.replace(make_sample(safe_id, seed=seed, num_sets=1), group=group)
    prob = torch.from_numpy(np.asarray(sample.cache_entry.logits)).float().sigmoid()
    outputs = {"a": StrategyOutput(prob, {"entropy": binary_entropy(prob), "std": prob * 0.1}, "entropy"),
               "b": StrategyOutput(prob.square(), {"entropy": binary_entropy(prob.square())}, "entropy")}
    board.score_sample(LabelledSample(sample, disc_ground_truth()), outputs)


def test_merged_scoreboards_equal_one_scoreboard_over_all_samples():
    units = [("s1", "g1"), ("s2", "g2"), ("s3", "g1"), ("s4", "g3")]
    cpu = torch.device("cpu")
    whole = Scoreboard(10, cpu)
    shards = [Scoreboard(10, cpu), Scoreboard(10, cpu)]
    for index, (safe_id, group) in enumerate(units):
        scored_sample(whole, safe_id, index, group)
        scored_sample(shards[index % 2], safe_id, index, group)
    merged = Scoreboard(10, cpu)
    for part in reversed(shards):  # any order of shards
        merged.merge(part)
    merged.sort_in_unit_order([safe_id for safe_id, _ in units])
    assert merged.done == whole.done and merged.rows == whole.rows
    assert list(merged.accumulators) == list(whole.accumulators)  # same report row order
    assert merged.primary_maps == whole.primary_maps
    for key, accumulator in whole.accumulators.items():
        expected, got = accumulator.compute(), merged.accumulators[key].compute()
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), (key, name)
    with pytest.raises(Exception, match="shards overlap"):
        merged.merge(shards[0])


def read(folder, name):
    return pd.read_csv(folder / name, keep_default_na=True)


def launcher_arguments(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_launcher_arguments(parser)
    return parser.parse_args(list(argv))


def test_a_two_task_job_array_and_its_merge_job_give_the_one_process_reports(fusion_project, monkeypatch):
    """The one-process reference and the later ``--merge`` calls run in this process (``call_stage``);
    the sharded run goes through the SLURM launch path with submitit's LocalExecutor: stage 7 as a job
    array of two tasks (two processes), then the merge job, as ``run_pipeline.py --launcher submitit``
    submits them."""
    project = fusion_project
    config = ("--config", str(project.config))
    torch.set_num_threads(1)  # as the shard processes (ONE_THREAD); conftest restores the count
    one = call_stage("evaluate_uncertainty", *config, "--run_id", "v1", "--name", "shard_reference", *CHEAP)
    assert one.code == 0, one.stderr[-3000:]
    for name, value in {"WANDB_MODE": "offline", **ONE_THREAD}.items():
        monkeypatch.setenv(name, value)
    stage7 = StageCall("evaluate_uncertainty", "evaluate_uncertainty.py", ("--run_id", "v1", "--name", "sharded"),
                       sharded=True)
    jobs = launch([stage7], ["--config", str(project.config), *CHEAP],
                  launcher_arguments("--submitit-cluster", "local", "--shards", "2", "--slurm-gpus", "0"),
                  project.root)
    assert len(jobs) == 3  # two array tasks, then the merge job
    logs = [Path(job.paths.stdout).read_text() + Path(job.paths.stderr).read_text() for job in jobs]
    assert sum("merging 2 shards" in text for text in logs[:2]) == 1  # the last task to finish merged
    assert "shards are merged and the reports written; skipped" in logs[2]
    reference, sharded = (eval_report_dir(project.root, name) for name in ("shard_reference", "sharded"))
    for name in CSV_FILES:
        if (reference / name).stat().st_size > 1:
            pd.testing.assert_frame_equal(read(sharded, name), read(reference, name), check_exact=False, rtol=1e-9)
    assert sorted(p.relative_to(sharded) for p in (sharded / "qualitative").rglob("*.png")) == \
        sorted(p.relative_to(reference) for p in (reference / "qualitative").rglob("*.png"))

    merge = (*config, "--run_id", "v1", "--name", "sharded", "--merge")
    again = call_stage("evaluate_uncertainty", *merge, *CHEAP)
    assert again.code == 0 and "shards are merged and the reports written; skipped" in again.stdout
    missing = call_stage("evaluate_uncertainty", *merge, *CHEAP, "--num-shards", "3")
    assert missing.code == 2 and "shards [0, 1, 2] of 3 have not finished" in missing.stderr
    changed = call_stage("evaluate_uncertainty", *merge, "--set", "evaluation.strategies=[raw_sam]",
                         "--set", "evaluation.refinement=false")
    assert changed.code == 2 and "computed from other inputs" in changed.stderr
    assert len([line for line in changed.stderr.splitlines() if line.strip()]) == 1
