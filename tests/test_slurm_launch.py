"""The SLURM launch path (``run_pipeline.py --launcher submitit``, ``modules/core/slurm_launch.py``):
which jobs and arrays it submits, and a real run through submitit's LocalExecutor on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

from modules.core.pipeline_plan import pipeline_stages, result_locations, selected_stages
from modules.core.slurm_launch import SLURM_LOG_DIR, LaunchError, job_failure, plan_phases
from tests.conftest import small_demo_config
from tests.helpers.stage_calls import call_stage
from tests.stage_runner import REPO


def script_and_flags(command: list[str]) -> tuple[str, list[str]]:
    return os.path.basename(command[1]), command[2:]


def test_phases_are_jobs_and_arrays_of_the_selected_stages():
    shared = ["--config", "c.yaml"]
    phases = plan_phases(pipeline_stages("r7"), shared, shards=3)
    assert [(p.name, len(p.jobs), p.array) for p in phases] == [
        ("prepare", 1, False), ("sam_cache", 3, True), ("train", 1, False), ("evaluate", 3, True), ("merge", 1, False)]
    assert [script_and_flags(c)[0] for c in phases[0].jobs[0].commands] == ["build_manifests.py",
                                                                             "generate_promptsets.py"]
    assert [script_and_flags(c)[0] for c in phases[2].jobs[0].commands] == [
        "visualize_sanity.py", "build_training_indices.py", "pack_to_hdf5.py", "train_head.py", "train_head.py",
        "fit_laplace.py", "train_head.py"]
    for index, job in enumerate(phases[3].jobs):  # each task its shard, every trained run and report run r7
        (command,) = job.commands
        assert command[-4:] == ["--num-shards", "3", "--shard-index", str(index)]
        assert command[2:4] == shared and ["--run_id", "r7"] == command[4:6]
    assert phases[4].jobs[0].commands[0][-5:] == ["--run_id", "r7", "--merge", "--num-shards", "3"]
    only = plan_phases(selected_stages(None, "pack_to_hdf5,evaluate_uncertainty"), shared, shards=2)
    assert [(p.name, len(p.jobs)) for p in only] == [("train", 1), ("evaluate", 2), ("merge", 1)]


def test_local_executor_runs_stage_3_as_a_two_task_array(tmp_path):
    """Stages 1-2 in this process, then stage 3 submitted as an array of two tasks to submitit's
    LocalExecutor (separate processes, like SLURM array tasks)."""
    config = small_demo_config(tmp_path, {"demo.scenes_per_group": 1})
    for stage in ("build_manifests", "generate_promptsets"):
        assert call_stage(stage, "--config", str(config)).code == 0
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, str(REPO / "run_pipeline.py"), "--config", str(config), "--launcher", "submitit",
              "--submitit-cluster", "local", "--shards", "2", "--slurm-gpus", "0"]
    result = subprocess.run([*launch, "--only", "precompute_sam_outputs"], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted sam_cache" in result.stdout and "sam_cache finished" in result.stdout
    root = tmp_path / "project"
    shard_files = sorted(root.glob("sam_cache/*/shard-*.h5"))
    assert [p.name for p in shard_files] == ["shard-000-of-002.h5", "shard-001-of-002.h5"]
    job_logs = list((root / SLURM_LOG_DIR).rglob("*_log.out"))
    assert len(job_logs) == 2  # the two array tasks' logs, inside the project root
    assert all("precompute_sam_outputs" in p.read_text() for p in job_logs)


def test_the_pipeline_names_the_summary_the_html_report_and_the_wandb_runs(tmp_path):
    assert result_locations(tmp_path, "r1") == []  # nothing written yet: nothing named
    report = tmp_path / "reports" / "eval" / "run_r1"
    report.mkdir(parents=True)
    (report / "summary.md").write_text("# summary\n")
    offline = tmp_path / "wandb" / "wandb" / "offline-run-20261130_140000-abc"
    offline.mkdir(parents=True)
    found = dict(result_locations(tmp_path, "r1"))
    assert found.pop("summary") == report / "summary.md"
    ((label, path),) = found.items()
    assert label.startswith("W&B offline runs (1; upload: wandb sync") and path == offline.parent
    (report / "index.html").write_text("<html></html>")
    assert [label for label, _ in result_locations(tmp_path, "r1")][:2] == ["summary", "HTML report"]


class FailedJob:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def result(self):
        raise self.error


def test_a_failed_job_is_named_by_its_failed_stage():
    """The debug executor raises the job's own error; the others wrap it in a traceback text."""
    assert job_failure(FailedJob(LaunchError("pack_to_hdf5.py failed with exit code 2"))) == \
        "pack_to_hdf5.py failed with exit code 2"
    wrapped = RuntimeError("Job (task=0) failed during processing with trace:\n---\nTraceback ...\n"
                           "modules.core.slurm_launch.LaunchError: train_head.py failed with exit code 2\n")
    assert job_failure(FailedJob(wrapped)) == "train_head.py failed with exit code 2"
    assert job_failure(FailedJob(OSError("node lost"))) == "OSError: node lost"
