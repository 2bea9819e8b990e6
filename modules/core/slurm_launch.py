"""Run the pipeline as SLURM jobs through submitit (``run_pipeline.py --launcher submitit``).

The selected stages are grouped into phases, each one job or one job array, each waiting for the
one before (``afterok``)::

    prepare    stages 1-2                       one job
    sam_cache  stage 3                          array of --shards tasks (--num-shards/--shard-index)
    train      stages 3.5-6 (sanity ... fusion)  one job, after every stage-3 task
    evaluate   stage 7                          array of --shards tasks; the last to finish merges
    merge      stage 7 --merge                  one job, after every stage-7 task (a no-op when merged)

On SLURM every job is submitted at once with its dependency and the launcher returns; submitit's
``local`` and ``debug`` executors (tests, a machine without SLURM) know no dependencies, so there
the launcher waits for each phase before submitting the next. Job logs go to
``<project_root>/slurm/`` (``%j_%t_log.out``/``.err``), inside the project root like every output.
Each job runs its stages as child processes (``core.processes.run_child``), exactly the commands
``run_pipeline.py`` runs; a failed stage fails its job, and SLURM then cancels the jobs after it.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from modules.core.errors import PipelineError
from modules.core.pipeline_plan import REPO, StageCall
from modules.core.processes import run_child

log = logging.getLogger("pipeline.slurm")

SLURM_LOG_DIR = "slurm"
CLUSTERS = ("slurm", "local", "debug")
#: Phases: (name, stage names, runs as an array of shards).
PHASES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("prepare", ("build_manifests", "generate_promptsets"), False),
    ("sam_cache", ("precompute_sam_outputs",), True),
    ("train", ("visualize_sanity", "build_training_indices", "pack_to_hdf5", "train_head", "train_variance",
               "fit_laplace", "train_fusion"), False),
    ("evaluate", ("evaluate_uncertainty",), True),
)
#: Phases that need no GPU (the others get --slurm-gpus).
CPU_PHASES = ("prepare", "merge")


class LaunchError(PipelineError):
    """A job of the pipeline failed, or the launcher's arguments are wrong (the message names it)."""


@dataclass
class StageJob:
    """What one job (or one array task) runs: stage commands in order, stopping at the first failure."""

    commands: list[list[str]]

    def __call__(self) -> str:
        for command in self.commands:
            ended = run_child(command)
            if not ended.ok:
                raise LaunchError(f"{Path(command[1]).name} {ended.describe()}")
        return f"{len(self.commands)} stage(s) finished"


@dataclass(frozen=True)
class Phase:
    name: str
    jobs: list[StageJob]
    array: bool


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cluster (--launcher submitit)")
    group.add_argument("--launcher", choices=("local", "submitit"), default="local",
                       help="local: stages one after the other in this process (default); submitit: SLURM jobs")
    group.add_argument("--shards", type=int, default=4, help="array tasks of stage 3 and of stage 7 (default 4)")
    group.add_argument("--slurm-partition", default=None, help="SLURM partition of every job")
    group.add_argument("--slurm-time-min", type=int, default=240, help="time limit of each job in minutes")
    group.add_argument("--slurm-gpus", type=int, default=1, help="GPUs of each job of stages 3-7 (default 1)")
    group.add_argument("--slurm-cpus", type=int, default=8, help="CPUs of each job (default 8)")
    group.add_argument("--slurm-mem-gb", type=int, default=32, help="memory of each job in GB (default 32)")
    group.add_argument("--slurm-array-parallelism", type=int, default=None,
                       help="at most this many tasks of an array at once (default: all)")
    group.add_argument("--submitit-cluster", choices=CLUSTERS, default="slurm",
                       help="submitit executor: slurm, or local / debug to try the jobs on this machine")


def plan_phases(stages: list[StageCall], shared: list[str], shards: int) -> list[Phase]:
    """The jobs of the selected ``stages``: one job per phase, or ``shards`` tasks for a sharded one;
    phases without a selected stage are left out, and a selected stage 7 adds the merge job."""
    if shards < 1:
        raise LaunchError(f"--shards: {shards} must be >= 1")
    by_name = {call.name: call for call in stages}
    phases = []
    for name, members, sharded in PHASES:
        calls = [by_name[member] for member in members if member in by_name]
        if not calls:
            continue
        if sharded:
            (call,) = calls
            jobs = [StageJob([call.command(shared, (index, shards))]) for index in range(shards)]
            phases.append(Phase(name, jobs, array=True))
        else:
            phases.append(Phase(name, [StageJob([call.command(shared) for call in calls])], array=False))
    if "evaluate_uncertainty" in by_name:
        merge = by_name["evaluate_uncertainty"].command(shared) + ["--merge", "--num-shards", str(shards)]
        phases.append(Phase("merge", [StageJob([merge])], array=False))
    return phases


def make_executor(args: argparse.Namespace, project_root: Path):
    """The submitit executor (``--submitit-cluster``) writing its logs under the project root."""
    folder = Path(project_root) / SLURM_LOG_DIR / "%j"
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=args.submitit_cluster)
    except RuntimeError as exc:  # no srun / sbatch on this machine
        raise LaunchError(f"--submitit-cluster {args.submitit_cluster}: {exc} (--submitit-cluster local runs "
                          "the jobs on this machine)") from None
    executor.update_parameters(timeout_min=args.slurm_time_min, cpus_per_task=args.slurm_cpus,
                               mem_gb=args.slurm_mem_gb, slurm_partition=args.slurm_partition,
                               slurm_array_parallelism=args.slurm_array_parallelism or args.shards)
    return executor


def _submit(executor, phase: Phase, args: argparse.Namespace, after: list[Any]) -> list[Any]:
    gpus = 0 if phase.name in CPU_PHASES else args.slurm_gpus
    parameters: dict[str, Any] = {"name": f"sam-uq-{phase.name}", "gpus_per_node": gpus}
    if after and args.submitit_cluster == "slurm":
        parameters["slurm_additional_parameters"] = {
            "dependency": "afterok:" + ":".join(sorted({job.job_id.split("_")[0] for job in after}))}
    executor.update_parameters(**parameters)
    try:
        if phase.array:
            with executor.batch():
                jobs = [executor.submit(job) for job in phase.jobs]
        else:
            jobs = [executor.submit(phase.jobs[0])]
    except (submitit.core.utils.FailedSubmissionError, subprocess.CalledProcessError) as exc:
        raise LaunchError(f"submitting {phase.name}: {' '.join(str(exc).split())[:500]}") from None
    log.info("submitted %s: job %s%s", phase.name, jobs[0].job_id.split("_")[0],
             f" ({len(jobs)} array tasks)" if phase.array else "")
    return jobs


def job_failure(job) -> str | None:
    """Wait for ``job``; None when it succeeded, else the one-line reason (the failed stage)."""
    try:
        job.result()
    except LaunchError as exc:  # the debug executor runs the job in this process
        return str(exc)
    except Exception as exc:  # the other executors wrap the job's error in its traceback
        lines = [line for line in str(exc).splitlines() if "LaunchError:" in line]
        return lines[-1].split("LaunchError:")[-1].strip() if lines else f"{type(exc).__name__}: {exc}"
    return None


def launch(stages: list[StageCall], shared: list[str], args: argparse.Namespace, project_root: Path) -> list[Any]:
    """Submit the phases of ``stages``; with the local or debug executor, wait for each phase and
    raise ``LaunchError`` naming the first failed job. Returns the submitted jobs."""
    phases = plan_phases(stages, shared, args.shards)
    if not phases:
        raise LaunchError("no stage selected")
    # The jobs unpickle StageJob from this repository, wherever the job starts.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    executor = make_executor(args, project_root)
    waits = args.submitit_cluster != "slurm"
    submitted, previous = [], []
    for phase in phases:
        jobs = _submit(executor, phase, args, previous)
        submitted += jobs
        if waits:
            for job in jobs:
                reason = job_failure(job)
                if reason is not None:
                    raise LaunchError(f"{phase.name} job {job.job_id} failed: {reason} (log: {job.paths.stderr})")
            log.info("%s finished", phase.name)
        previous = jobs
    if not waits:
        log.info("submitted %d jobs; logs in %s; follow them with squeue --me", len(submitted),
                 Path(project_root) / SLURM_LOG_DIR)
    return submitted
