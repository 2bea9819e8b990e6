import argparse
import logging
import re

import pytest

from modules.core.config import load_config

from modules.core.errors import PipelineError
import modules.laplace.head  # noqa: F401  (laplace-torch installs a root log handler at import)
from modules.core.stage import Shard, StageContext, StageInputsChanged, UnitError, resolve_shard, stage_context
from tests.stage_runner import write_config


def make_ctx(tmp_path, overrides=(), force=False):
    cfg = load_config(None, [f"data.project_root={tmp_path / 'proj'}", *overrides])
    out = tmp_path / "proj" / "stage_out"
    out.mkdir(parents=True, exist_ok=True)
    args = argparse.Namespace(force=force)
    return StageContext(name="demo_stage", cfg=cfg, args=args, output_dir=out)


def test_fingerprint_refuses_changed_inputs_unless_forced(tmp_path):
    assert make_ctx(tmp_path).check_inputs(["prompt_generation"], {"a.csv": "111"}) is True
    # Same inputs: earlier outputs are reusable.
    assert make_ctx(tmp_path).check_inputs(["prompt_generation"], {"a.csv": "111"}) is False
    with pytest.raises(StageInputsChanged, match=r"prompt_generation\.prompt_seed.*--force"):
        make_ctx(tmp_path, ["prompt_generation.prompt_seed=1"]).check_inputs(["prompt_generation"], {"a.csv": "111"})
    with pytest.raises(StageInputsChanged, match=r"upstream a\.csv"):
        make_ctx(tmp_path).check_inputs(["prompt_generation"], {"a.csv": "222"})
    forced = make_ctx(tmp_path, ["prompt_generation.prompt_seed=1"], force=True)
    assert forced.check_inputs(["prompt_generation"], {"a.csv": "111"}) is True
    # The forced run's inputs are now the recorded ones.
    assert make_ctx(tmp_path, ["prompt_generation.prompt_seed=1"]).check_inputs(
        ["prompt_generation"], {"a.csv": "111"}) is False


def test_run_units_skips_complete_and_counts_failures(tmp_path):
    ctx = make_ctx(tmp_path)
    done = {1, 2}
    processed = []

    def process(unit):
        if unit == 4:
            raise UnitError("bad input")
        processed.append(unit)

    counts = ctx.run_units([1, 2, 3, 4, 5], lambda u: u in done, process, desc="t")
    assert processed == [3, 5]
    assert (counts.done, counts.skipped, counts.failed) == (2, 2, 1)
    assert counts.failures == [("4", "bad input")]


def test_shards_from_flags_torchrun_and_slurm():
    assert resolve_shard(argparse.Namespace(num_shards=None, shard_index=None), {}) == Shard(0, 1)
    assert resolve_shard(argparse.Namespace(num_shards=3, shard_index=2), {}) == Shard(2, 3)
    assert resolve_shard(None, {"RANK": "1", "WORLD_SIZE": "2"}) == Shard(1, 2)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2"}
    assert resolve_shard(None, slurm) == Shard(3, 4)
    with pytest.raises(PipelineError, match="outside"):
        resolve_shard(argparse.Namespace(num_shards=2, shard_index=2), {})
    units = list(range(10))
    parts = [Shard(i, 3).select(units) for i in range(3)]
    assert sorted(sum(parts, [])) == units and all(parts)


def test_stage_log_lines_show_with_timestamps(tmp_path, capsys):
    """INFO lines of a stage reach stdout with a timestamp (cluster logs), although laplace-torch has
    already installed a WARNING-level root handler, which made ``basicConfig`` a no-op before."""
    assert logging.getLogger().handlers  # what laplace-torch left, or the test would prove nothing
    config = write_config(tmp_path, tmp_path / "images", tmp_path / "masks")
    args = argparse.Namespace(config=str(config), overrides=[], force=False)
    with stage_context("build_manifests", args, output_dir="manifests"):
        logging.getLogger("pipeline.test").info("epoch 3: done")
    lines = [line for line in capsys.readouterr().out.splitlines() if "epoch 3" in line]
    assert len(lines) == 1
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO pipeline\.test: epoch 3: done", lines[0])


def test_temporary_files_of_a_killed_run_are_removed_once_the_lock_is_held(tmp_path, capsys):
    """A write killed between ``atomic_path``'s temporary file and its rename leaves ``.<name>.<random>.tmp``
    behind; the next run of the stage, holding the output's lock, removes them (and nothing else)."""
    config = write_config(tmp_path, tmp_path / "images", tmp_path / "masks")
    args = argparse.Namespace(config=str(config), overrides=[], force=False)
    out = tmp_path / "project" / "prompt_sets"
    (out / "train").mkdir(parents=True)
    stale = [out / ".stage.json.k2j4x8.tmp", out / "train" / ".cats__s00.json.a8f3_q.tmp"]
    kept = [out / "train" / "cats__s00.json", out / ".notes.tmp", out / "train" / "x.json.abc.tmp"]
    for path in stale + kept:
        path.write_text("{}")
    with stage_context("generate_promptsets", args, output_dir="prompt_sets"):
        pass
    assert [p for p in stale if p.exists()] == [] and all(p.exists() for p in kept)
    assert "[generate_promptsets] removed 2 temporary file(s) a killed run left" in capsys.readouterr().out


def test_a_shard_lock_removes_only_that_shards_temporary_files(tmp_path):
    """Stage 3 locks per shard file (shards run side by side in one folder): holding one shard's lock
    removes that shard's leftover temporary file, never another shard's, which may be mid-write."""
    config = write_config(tmp_path, tmp_path / "images", tmp_path / "masks")
    args = argparse.Namespace(config=str(config), overrides=[], force=False)
    folder = tmp_path / "project" / "sam_cache" / "demo"
    folder.mkdir(parents=True)
    mine, other = folder / ".shard-000-of-002.h5.x1y2.tmp", folder / ".shard-001-of-002.h5.z3w4.tmp"
    mine.write_bytes(b"\0" * 64)
    other.write_bytes(b"\0" * 64)
    with stage_context("precompute_sam_outputs", args, output_dir="sam_cache", lock=False) as ctx:
        ctx.hold_lock(folder / "shard-000-of-002.h5")
    assert not mine.exists() and other.exists()
