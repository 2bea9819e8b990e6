"""Process faults: no child outlives its stage or the pipeline, one writer per stage output, and
one-line errors for bad SLURM / torchrun variables.

The stage-3 scenarios run the real scripts as subprocesses on a tiny project (4 images, random
demo_tiny weights, encoder batches of one image, two DataLoader workers) and watch the processes
through /proc (Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, Dataset

from modules.cache import sam_cache
from modules.core.config import load_config
from modules.core.errors import PipelineError
from modules.core.locks import OutputLock, OutputLocked, lock_holder, lock_path
from modules.core.processes import process_gone
from modules.core.stage import Shard, resolve_shard, stage_context
from modules.sam.registry import load_backbone
from modules.stages.precompute_sam_outputs import run_precompute
from modules.training.distributed import DistributedContext, TrainingWorkerInit
from tests.helpers.precompute_fixtures import make_project, save_random_checkpoint
from tests.stage_runner import REPO, run_stage, write_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")

SCRIPT = "precompute_sam_outputs.py"
NUM_IMAGES = 4
#: How long a process may take to die after its parent did (PDEATHSIG is immediate; without it a
#: DataLoader worker notices an orphaned state only at its next 5 s idle check, if ever).
DEATH_DEADLINE_S = 2.0


# --------------------------------------------------------------------------- /proc helpers


def process_state(pid: int) -> str:
    """The /proc state letter of ``pid`` (R, S, T stopped, Z zombie ...); "gone" once it has no entry."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def children_of(pid: int) -> list[int]:
    """Live (non-zombie) children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def processes_mentioning(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker`` (forked workers keep their parent's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline and not process_gone(int(entry.name)):
                found.append(int(entry.name))
    return found


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None):
    """Poll ``condition`` until it returns something true (returned); fail on timeout, or as soon as
    ``process`` (whose run the condition watches) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{process.args} exited ({process.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def assert_all_die(pids: list[int], marker: str) -> None:
    """Every pid in ``pids``, and every process naming ``marker``, is gone within the deadline (the
    survivors are killed before the test fails)."""
    def survivors() -> list[int]:
        return sorted({pid for pid in pids if not process_gone(pid)} | set(processes_mentioning(marker)))

    try:
        wait_for(lambda: not survivors(), DEATH_DEADLINE_S, "the processes to die")
    except AssertionError:
        left = survivors()
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"processes {left} outlived their parent by {DEATH_DEADLINE_S} s") from None


# --------------------------------------------------------------------------- the lock


HOLDER = """
import os, sys, time
from pathlib import Path
from modules.core.locks import OutputLock
lock = OutputLock.acquire(Path(sys.argv[1]), Path(sys.argv[2]))
child = os.fork()
if child == 0:  # a forked child of the holder, like a DataLoader worker
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


@contextmanager
def lock_held_elsewhere(root: Path, target: Path):
    """Another process holds ``target``'s lock, and has a forked child; yields (holder, child pid)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root), str(target)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(holder.stdout.readline())
        yield holder, child
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        if child is not None and not process_gone(child):
            os.kill(child, signal.SIGKILL)


def test_lock_is_not_inherited_by_children_and_dies_with_its_holder(tmp_path):
    root, target = tmp_path / "project", tmp_path / "project" / "manifests"
    with lock_held_elsewhere(root, target) as (holder, child):
        with pytest.raises(OutputLocked) as refused:
            OutputLock.acquire(root, target)
        assert str(target) in str(refused.value) and f"process {holder.pid} " in str(refused.value)
        assert lock_holder(lock_path(root, target)) == holder.pid
        holder.kill()
        holder.wait()
        assert not process_gone(child)  # the orphan lives on (it has no PDEATHSIG) ...
        with OutputLock.acquire(root, target) as lock:  # ... but never held the lock
            assert lock.held and lock.path == root / ".locks" / "manifests.lock"
            assert lock_holder(lock.path) is None  # F_GETLK does not report the asker's own lock
        assert not lock.held


def test_stage_context_refuses_a_locked_output_except_on_ddp_ranks_above_0(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, tmp_path / "images", tmp_path / "masks")
    root = tmp_path / "project"
    args = argparse.Namespace(config=str(config), overrides=[], force=False)
    with lock_held_elsewhere(root, root / "checkpoints" / "head" / "run_x") as (holder, _):
        with pytest.raises(SystemExit) as exit_info:
            with stage_context("train_head", args, output_dir="checkpoints/head/run_x", main_rank_only=True):
                raise AssertionError("entered a locked output")
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith(f"error: {root / 'checkpoints/head/run_x'}: process {holder.pid} ")
        # Rank 1 of a torchrun job shares rank 0's lock: it takes none, so it neither refuses nor waits.
        monkeypatch.setenv("RANK", "1")
        with stage_context("train_head", args, output_dir="checkpoints/head/run_x", main_rank_only=True) as ctx:
            assert ctx.output_dir.is_dir()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(SystemExit):
        with stage_context("train_head", args, output_dir="checkpoints/head/run_x", main_rank_only=True):
            raise AssertionError("entered with a garbage RANK")
    assert capsys.readouterr().err.strip() == "error: environment variable RANK='one': not an integer"



def test_interrupted_stage_is_one_line_and_releases_its_lock(tmp_path, capsys):
    """Ctrl-C (or the SIGINT run_pipeline.py passes on) ends a stage with one line and exit 130, not a
    KeyboardInterrupt traceback, and the output's lock is free for the rerun."""
    config = write_config(tmp_path, tmp_path / "images", tmp_path / "masks")
    args = argparse.Namespace(config=str(config), overrides=[], force=False)
    with pytest.raises(SystemExit) as exit_info:
        with stage_context("build_manifests", args, output_dir="manifests"):
            raise KeyboardInterrupt
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: build_manifests interrupted; rerun the same command to resume: finished work is kept"]
    with stage_context("build_manifests", args, output_dir="manifests") as ctx:
        assert ctx.output_dir.is_dir()


# --------------------------------------------------------------------------- SLURM / torchrun variables


SLURM_OK = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2",
            "SLURM_ARRAY_TASK_MAX": "5"}


@pytest.mark.parametrize("env, variable", [
    ({**SLURM_OK, "SLURM_ARRAY_TASK_ID": "five"}, "SLURM_ARRAY_TASK_ID='five': not an integer"),
    ({**SLURM_OK, "SLURM_ARRAY_TASK_COUNT": "4.0"}, "SLURM_ARRAY_TASK_COUNT='4.0': not an integer"),
    ({**SLURM_OK, "SLURM_ARRAY_TASK_COUNT": "-4"}, "SLURM_ARRAY_TASK_COUNT=-4: must be >= 1"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT is not set but SLURM_ARRAY_TASK_ID is"),
    ({"SLURM_ARRAY_TASK_COUNT": "3"}, "SLURM_ARRAY_TASK_ID is not set but SLURM_ARRAY_TASK_COUNT is"),
    ({**SLURM_OK, "SLURM_ARRAY_TASK_ID": "7"}, "SLURM_ARRAY_TASK_ID=7: not a task of the array 2-5:1"),
    ({**SLURM_OK, "SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_ID=1: not a task of the array 2-5:1"),
    ({**SLURM_OK, "SLURM_ARRAY_TASK_MAX": "9"}, "SLURM_ARRAY_TASK_COUNT=4: does not match the array range"),
    ({**SLURM_OK, "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_MAX": "8"},
     "SLURM_ARRAY_TASK_ID=5: not a task of the array 2-8:2"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x': not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2: outside 0..1 (WORLD_SIZE=2)"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0: must be >= 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1: must be >= 0"),
    ({"RANK": "1"}, "WORLD_SIZE is not set but RANK is"),
])
def test_bad_shard_variables_are_one_line_naming_the_variable(env, variable):
    with pytest.raises(PipelineError) as error:
        resolve_shard(None, env)
    assert str(error.value).startswith(f"environment variable {variable}") and "\n" not in str(error.value)


def test_valid_shard_variables():
    assert resolve_shard(None, SLURM_OK) == Shard(3, 4)
    stepped = {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "2",
               "SLURM_ARRAY_TASK_MAX": "10", "SLURM_ARRAY_TASK_STEP": "4"}  # --array=2-10:4
    assert resolve_shard(None, stepped) == Shard(1, 3)
    assert resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "3", **SLURM_OK}) == Shard(1, 3)  # torchrun first
    flags = argparse.Namespace(num_shards=2, shard_index=1)
    assert resolve_shard(flags, {"RANK": "garbage", **SLURM_OK}) == Shard(1, 2)  # flags first, env unread
    for bad, message in ((argparse.Namespace(num_shards=0, shard_index=0), "--num-shards: 0 must be >= 1"),
                         (argparse.Namespace(num_shards=2, shard_index=-1), "--shard-index: -1 is outside 0..1")):
        with pytest.raises(PipelineError, match=message):
            resolve_shard(bad, {})


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "RANK is not set but WORLD_SIZE=2 is"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two': not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "a"}, "LOCAL_RANK='a': not an integer"),
])
def test_bad_torchrun_variables_stop_training_with_one_line(env, message, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(PipelineError, match=f"^environment variable {message}"):
        DistributedContext.from_env(torch.device("cpu"))


def test_bad_slurm_variable_stops_stage3_with_one_line(tmp_path):
    """The real script: exit code 2 and one line naming the variable (``train_head.py``'s ``RANK``
    goes through ``stage_context`` the same way, in-process above)."""
    config = write_config(tmp_path, tmp_path / "images", tmp_path / "masks")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE")}
    env.update(SLURM_ARRAY_TASK_ID="abc", SLURM_ARRAY_TASK_COUNT="2")
    result = subprocess.run([sys.executable, str(REPO / SCRIPT), "--config", str(config)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: environment variable SLURM_ARRAY_TASK_ID='abc': not an integer"]


def test_run_child_forwards_signals_and_its_child_dies_with_it(tmp_path):
    """``run_child`` (run_pipeline's stage runner) in a driver process: Ctrl-Z / ``fg`` (SIGTSTP /
    SIGCONT) stop and continue the child with the driver; SIGTERM to the driver reaches the child,
    and the driver exits 128 + 15; SIGKILL of the driver kills the child too."""
    marker = f"child-of-driver-{tmp_path.name}"
    driver = ("import sys; from modules.core.processes import run_child; "
              f"sys.exit(run_child([sys.executable, '-c', 'import time; time.sleep(120)', {marker!r}]).exit_status)")
    for signum, status in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGKILL, -signal.SIGKILL)):
        process = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO)
        try:
            child = wait_for(lambda: children_of(process.pid), 60, "the driver's child", process)[0]
            if signum == signal.SIGTERM:
                process.send_signal(signal.SIGTSTP)
                wait_for(lambda: process_state(child) == process_state(process.pid) == "T", 10, "both to stop")
                process.send_signal(signal.SIGCONT)
                wait_for(lambda: "T" not in (process_state(child), process_state(process.pid)), 10, "both to go on")
            process.send_signal(signum)
            assert process.wait(timeout=60) == status
            assert_all_die([child], marker)
        finally:
            process.kill()
            process.wait()
            for pid in processes_mentioning(marker):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- DataLoader workers


PR_GET_PDEATHSIG = 2


class WorkerFacts(Dataset):
    """Reports, from inside a DataLoader worker, its parent-death signal, its parent, and a NumPy draw."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> dict:
        signum = ctypes.c_int(-1)
        assert ctypes.CDLL(None, use_errno=True).prctl(PR_GET_PDEATHSIG, ctypes.byref(signum), 0, 0, 0) == 0
        return {"pdeathsig": signum.value, "parent": os.getppid(), "draw": int(np.random.randint(2**31))}


def test_training_loader_workers_die_with_the_trainer_and_are_seeded():
    loader = DataLoader(WorkerFacts(), batch_size=None, num_workers=2, worker_init_fn=TrainingWorkerInit(),
                        generator=torch.Generator().manual_seed(0))
    facts = list(loader)
    assert [f["pdeathsig"] for f in facts] == [signal.SIGKILL] * 2
    assert [f["parent"] for f in facts] == [os.getpid()] * 2
    assert facts[0]["draw"] != facts[1]["draw"]  # forked workers share NumPy's state unless seeded


# --------------------------------------------------------------------------- stage 3 and the pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Stages 1-2 of a 4-image project (config: 2 loader workers, encoder batches of 1, the random
    checkpoint) and the arrays of its uninterrupted cache."""
    folder = tmp_path_factory.mktemp("process_faults")
    checkpoint = save_random_checkpoint("sam", "demo_tiny", folder / "demo_tiny.pt", seed=1)
    config = make_project(folder / "base", per_group=NUM_IMAGES // 2, overrides={
        "sam": {"checkpoint": str(checkpoint), "num_workers": 2, "encoder_batch_size": 1}})
    pristine = folder / "pristine"
    shutil.copytree(folder / "base" / "project", pristine)
    cfg = load_config(config, ["sam.num_workers=0"])  # workers do not change the arrays
    backbone = load_backbone("sam", "demo_tiny", checkpoint, "cpu")
    run_precompute(cfg, backbone, Shard())
    return {"folder": folder, "config": config, "pristine": pristine,
            "reference": cache_arrays(cfg.project_root)}


def fresh_project(tiny, name: str) -> tuple[Path, Path]:
    """A copy of the stage-1/2 outputs with its own config; (config, project root)."""
    root = tiny["folder"] / name / "project"
    shutil.copytree(tiny["pristine"], root)
    config = yaml.safe_load(tiny["config"].read_text())
    config["data"]["project_root"] = str(root)
    path = tiny["folder"] / name / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, root


def cache_arrays(root: Path) -> dict:
    cache = sam_cache.SamCache(root)
    arrays = {}
    for safe_id in cache.sample_ids():
        entry = cache.entry(safe_id, verify=True)
        arrays[safe_id] = {**{f"features/{k}": v for k, v in entry.features.items()}, "logits": entry.logits,
                           "ids": entry.promptset_ids, "branch": entry.branch_index, "iou": entry.iou_predictions}
    return arrays


def assert_cache_equals(root: Path, reference: dict) -> None:
    arrays = cache_arrays(root)
    assert sorted(arrays) == sorted(reference) and len(arrays) == NUM_IMAGES
    for safe_id, values in reference.items():
        for name, value in values.items():
            np.testing.assert_array_equal(arrays[safe_id][name], value, err_msg=f"{safe_id} {name}")


def shard_file(root: Path) -> Path | None:
    files = sorted((root / "sam_cache").glob("*/shard-*.h5"))
    return files[0] if files else None


def complete_entries(root: Path) -> int:
    """How many entries of the (possibly being written) shard file carry their completion flag."""
    path = shard_file(root)
    if path is None:
        return 0
    try:
        with h5py.File(path, "r", locking=False) as handle:
            return int(handle["entries/complete"][:].sum())
    except (OSError, KeyError):
        return 0


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "WANDB_MODE": "offline"})


def running_with_workers(pid: int) -> list[int] | None:
    """The children of stage process ``pid`` once all run (its cache writer process and two DataLoader
    workers), else None."""
    workers = children_of(pid)
    return workers if len(workers) >= 3 else None


def test_sigkill_of_stage3_kills_its_workers_and_the_rerun_equals_uninterrupted(tiny):
    config, root = fresh_project(tiny, "stage_killed")
    stage = start([SCRIPT, "--config", str(config)])
    try:
        workers = wait_for(lambda: complete_entries(root) >= 1 and running_with_workers(stage.pid), 300,
                           "stage 3 to start its writer and workers and cache an image", stage)
        stage.kill()
    finally:
        stage.kill()
        stage.wait()
        stage.stdout.close()
    assert_all_die(workers, str(config))
    finished = complete_entries(root)
    # Without PDEATHSIG the orphaned workers kept the shard file's HDF5 lock: "unable to lock file".
    rerun = run_stage(SCRIPT, config)
    assert f"{finished} already cached, {NUM_IMAGES - finished} to compute" in rerun.stdout
    assert f"done: {NUM_IMAGES - finished}" in rerun.stdout
    assert_cache_equals(root, tiny["reference"])


def test_sigkill_of_run_pipeline_kills_the_stage_and_the_rerun_recomputes_only_the_rest(tiny):
    config, root = fresh_project(tiny, "pipeline_killed")
    argv = ["run_pipeline.py", "--config", str(config), "--only", "precompute_sam_outputs"]
    pipeline = start(argv)
    try:
        stage = wait_for(lambda: children_of(pipeline.pid), 300, "run_pipeline to start stage 3", pipeline)[0]
        workers = wait_for(lambda: complete_entries(root) >= 1 and running_with_workers(stage), 300,
                           "stage 3 to start its workers and cache an image", pipeline)
        assert not process_gone(stage)
        pipeline.kill()
    finally:
        pipeline.kill()
        pipeline.wait()
        pipeline.stdout.close()
    assert_all_die([stage, *workers], str(config))
    finished = complete_entries(root)
    assert 1 <= finished
    rerun = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert "=== precompute_sam_outputs.py" in rerun.stdout and "=== pipeline finished" in rerun.stdout
    assert f"{finished} already cached, {NUM_IMAGES - finished} to compute" in rerun.stdout
    assert f"done: {NUM_IMAGES - finished}" in rerun.stdout and f"skipped: {finished}" in rerun.stdout
    assert_cache_equals(root, tiny["reference"])


def test_second_copy_of_stage3_on_the_same_shard_refuses_with_one_line(tiny):
    """Copy A takes the shard's lock and is frozen (SIGSTOP) there, so copy B deterministically
    meets the lock; B refuses without computing anything, A then finishes the whole cache."""
    config, root = fresh_project(tiny, "two_copies")
    first = start([SCRIPT, "--config", str(config)])
    try:
        lock = wait_for(lambda: [p for p in (root / ".locks").rglob("*.lock") if lock_holder(p) == first.pid],
                        300, "copy A to take the shard lock", first)[0]
        assert lock.name == "shard-000-of-001.h5.lock"
        first.send_signal(signal.SIGSTOP)
        second = run_stage(SCRIPT, config, check=False)
        assert second.returncode == 2
        shard = lock.parent.relative_to(root / ".locks") / "shard-000-of-001.h5"
        assert second.stderr.strip().splitlines() == [
            f"error: {root / shard}: process {first.pid} is writing this output (lock {lock}); "
            "wait for it to finish or stop it, then rerun"]
        assert "to compute" not in second.stdout
        first.send_signal(signal.SIGCONT)
        output, _ = first.communicate(timeout=600)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == 0, output[-3000:]
    assert f"0 already cached, {NUM_IMAGES} to compute" in output and f"done: {NUM_IMAGES}" in output
    assert_cache_equals(root, tiny["reference"])
