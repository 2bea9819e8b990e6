"""Stage 7 split across processes (``modules/stages/evaluate_uncertainty.py``): shards of a SLURM array
score their samples, the last one merges (``Scoreboard.merge``), and the reports equal a one-process
run's. The stage tests run the real script on the ``fusion_project`` fixture (``tests/conftest.py``)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from modules.core.paths import eval_report_dir
from modules.evaluation.reports import CSV_FILES
from modules.evaluation.samples import LabelledSample
from modules.evaluation.scoreboard import Scoreboard
from modules.scoring.entropy import binary_entropy
from modules.uncertainty.strategies import StrategyOutput
from tests.helpers.stage_calls import call_stage
from tests.stage_runner import REPO
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


def test_two_slurm_array_tasks_merge_to_the_one_process_reports(fusion_project):
    """The one-process reference and the ``--merge`` calls run in this process (``call_stage``); the
    two shards are two processes with the variables of a SLURM array's tasks."""
    project = fusion_project
    config = ("--config", str(project.config))
    torch.set_num_threads(1)  # as the shard processes (ONE_THREAD); conftest restores the count
    one = call_stage("evaluate_uncertainty", *config, "--run_id", "v1", "--name", "shard_reference", *CHEAP)
    assert one.code == 0, one.stderr[-3000:]
    env = {**os.environ, "WANDB_MODE": "offline", **ONE_THREAD, "SLURM_ARRAY_TASK_COUNT": "2"}
    command = [sys.executable, str(REPO / "evaluate_uncertainty.py"), *config, "--run_id", "v1", "--name",
               "sharded", *CHEAP]
    tasks = [subprocess.Popen(command, cwd=REPO, env={**env, "SLURM_ARRAY_TASK_ID": str(task)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for task in (0, 1)]
    outputs = [task.communicate(timeout=600) for task in tasks]
    for task, (out, err) in zip(tasks, outputs):
        assert task.returncode == 0, out[-3000:] + err[-3000:]
    assert sum("merging 2 shards" in out for out, _ in outputs) == 1  # the last one to finish merged
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
