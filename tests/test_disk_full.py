"""Storage faults: a full disk, a file-size limit and a read-only project root.

Each is one line on stderr naming the folder (exit code 2), never a library's traceback; no entry or
row is flagged complete unless its data is on disk and reads back with its CRC; earlier results are
kept; a plain rerun after making space finishes and equals an uninterrupted run.

Small file systems are real tmpfs mounts under the test's folder (root may mount them, as on CI);
where mounting is not allowed those tests skip and say so, and the faults are injected instead: a
file-size limit (``RLIMIT_FSIZE``, EFBIG from the C library) and chmod for a read-only folder.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from modules.cache.packing import row_checksum
from modules.cache.sam_cache import CacheEntry, SamCache, ShardLayout
from modules.cache.shard_writer import ShardWriter
from modules.core.errors import PipelineError
from modules.core.fileio import StorageError, atomic_path, atomic_write_csv, atomic_write_text, storage_error
from tests.conftest import DEMO_CHECKPOINT
from tests.helpers.precompute_fixtures import write_tiny_dataset
from tests.stage_runner import REPO, write_config


# --------------------------------------------------------------------------- small file systems


def _try_mount() -> str | None:
    """None when this process may mount a tmpfs, else why not."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return "no mount command"
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"disk_full_probe_{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(probe)], capture_output=True)
        if done.returncode != 0:
            return f"mount -t tmpfs refused ({done.stderr.decode().strip() or done.returncode})"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


MOUNT_REFUSED = _try_mount()
needs_mount = pytest.mark.skipif(MOUNT_REFUSED is not None,
                                 reason=f"cannot mount a small tmpfs here: {MOUNT_REFUSED}")


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of ``size`` (``mount -o size=``) mounted on ``folder``, unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


def remount(folder: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(folder)], check=True)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines of a stage that must have failed with one of them and nothing worse."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines


def tree_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def prompt_set_files(folder: Path) -> dict[str, bytes]:
    """The prompt-set JSON files of a ``prompt_sets`` folder (not its stage records)."""
    return {name: data for name, data in tree_digest(folder).items() if "/" in name and name.endswith(".json")}


# --------------------------------------------------------------------------- the errno mapping


@pytest.mark.parametrize("error, folder, words", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/p/sam_cache/x.h5"), "/data/p/sam_cache",
     "no space left on device under"),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/q/f.csv"), "/q", "disk quota exceeded under"),
    (OSError(errno.EFBIG, "File too large", "/q/f.pt"), "/q", "file size limit exceeded under"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/project/manifests"), "/ro/project",
     "is not writable (read-only file system)"),
    (PermissionError(errno.EACCES, "Permission denied", "/home/p/out.json"), "/home/p",
     "is not writable (permission denied)"),
    # h5py: the errno only inside the message, with the file name.
    (OSError("Can't synchronously write data (file write failed: time = Mon Nov 30 11:17:38 2026\n, filename = "
             "'/big/cache/shard-000-of-001.h5', file descriptor = 3, errno = 28, error message = 'No space "
             "left on device', buf = 0x7f, total write size = 296792)"), "/big/cache", "no space left on device"),
    (RuntimeError("Can't close dataset (file write failed: filename = '/big/c/s.h5', errno = 122, error "
                  "message = 'Disk quota exceeded')"), "/big/c", "disk quota exceeded"),
])
def test_storage_errors_name_the_folder(error, folder, words):
    mapped = storage_error(error)
    assert isinstance(mapped, StorageError) and isinstance(mapped, PipelineError)
    message = str(mapped)
    assert words in message and folder in message and "finished work is kept" in message
    assert "\n" not in message


def test_other_errors_are_not_storage_faults(tmp_path):
    assert storage_error(FileNotFoundError(errno.ENOENT, "No such file", "/x/y")) is None
    assert storage_error(ValueError("no space left on device")) is None
    assert storage_error(PipelineError("bad config")) is None
    # torch.save's bare RuntimeError counts only while the disk holding the file is full.
    assert storage_error(RuntimeError("unexpected pos 576 vs 534"), tmp_path / "a.pt") is None
    # Without any path there is no folder to name, unless the caller gives one.
    assert storage_error(OSError(errno.ENOSPC, "No space left on device")) is None
    assert str(tmp_path) in str(storage_error(OSError(errno.ENOSPC, "No space"), default_folder=tmp_path))
    # An atomic_path temporary file is shown under its final name.
    shown = storage_error(OSError(errno.ENOSPC, "No space", str(tmp_path / ".train.h5.ab12cd.tmp")))
    assert "(writing train.h5)" in str(shown)


# --------------------------------------------------------------------------- the file layer


def write_hdf5(path: Path, values: np.ndarray) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("a", data=values)


@needs_mount
def test_every_writer_library_on_a_full_disk_is_one_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    """torch.save (a bare RuntimeError), PIL, pandas and h5py inside ``atomic_path``, and the plain
    writes: a ``StorageError`` naming the folder; the earlier file and no temporary file remain.
    An error naming no file while stdout is a file on the full disk names stdout's file."""
    with small_disk(tmp_path / "disk", "64k") as disk:
        atomic_write_text(disk / "earlier.txt", "earlier result\n")
        big = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
        writers = {
            "torch": lambda tmp: torch.save({"w": torch.from_numpy(big.astype(np.float32))}, tmp),
            "pil": lambda tmp: Image.fromarray(big).save(tmp, format="PNG"),
            "h5py": lambda tmp: write_hdf5(tmp, big.astype(np.float64)),
        }
        for name, write in writers.items():
            with pytest.raises(StorageError, match=f"no space left on device under {re.escape(str(disk))} "
                                                   r"\(writing earlier.txt\)"):
                with atomic_path(disk / "earlier.txt") as tmp:
                    write(tmp)
        with pytest.raises(StorageError, match="no space left on device"):
            atomic_write_csv(disk / "earlier.txt", pd.DataFrame({"a": np.arange(40000)}))
        assert sorted(p.name for p in disk.iterdir()) == ["earlier.txt"]
        assert (disk / "earlier.txt").read_text() == "earlier result\n"
        with open(disk / "log.txt", "w") as log:
            monkeypatch.setattr(sys, "stdout", log)
            from_print = storage_error(OSError(errno.ENOSPC, "No space left on device"), default_folder=tmp_path)
            monkeypatch.undo()
        assert f"under {disk} (writing log.txt)" in str(from_print)


# --------------------------------------------------------------------------- the SAM cache writer

FEATURES = (("image_embed", (64, 32, 32)),)  # 128 KiB per entry, plus 3 x 128 KiB of logits


def shard_layout(safe_ids):
    return ShardLayout(backbone_id="sam-test-0123456789ab", family="sam", model_type="test",
                       checkpoint_md5="0123456789ab" * 2, shard_index=0, shard_count=1,
                       slots=tuple(("train", s) for s in safe_ids), feature_shapes=FEATURES,
                       max_promptsets=3, num_outputs=3)


def synthetic_entry(safe_id: str, seed: int) -> CacheEntry:
    rng = np.random.default_rng(seed)
    return CacheEntry(safe_id=safe_id, split="train",
                      features={name: rng.normal(size=shape).astype(np.float16) for name, shape in FEATURES},
                      logits=rng.normal(size=(3, 256, 256)).astype(np.float16),
                      promptset_ids=np.arange(3, dtype=np.int32), branch_index=np.zeros(3, np.int8),
                      iou_predictions=rng.random((3, 3)).astype(np.float32), original_hw=(64, 80),
                      input_hw=(1024, 800), promptset_md5="a" * 32)


def assert_cache_holds(folder: Path, expected: dict[str, CacheEntry]) -> list[str]:
    """Every complete entry verifies its CRC and equals what was written; their safe ids."""
    cache = SamCache(folder)
    for safe_id in cache.sample_ids():
        entry = cache.entry(safe_id, verify=True)
        np.testing.assert_array_equal(entry.logits, expected[safe_id].logits)
        np.testing.assert_array_equal(entry.features["image_embed"], expected[safe_id].features["image_embed"])
    ids = cache.sample_ids()
    cache.close()
    return ids


@needs_mount
def test_shard_writer_flags_only_entries_on_disk_when_the_disk_fills(tmp_path, monkeypatch):
    """On a file system that cannot reserve blocks up front (simulated: ``reserve_space`` off), the
    disk fills midway: that batch is a ``StorageError`` and unflagged, every flagged entry verifies,
    and after making space the writer finishes the rest. With reservation, a disk too small for the
    shard is refused when the file is created, before any work."""
    ids = [f"s{i}" for i in range(6)]
    entries = {s: synthetic_entry(s, i) for i, s in enumerate(ids)}
    md5s = {s: "a" * 32 for s in ids}
    ignored = []  # what h5py reports as "Exception ignored" (a write it swallowed)
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    with small_disk(tmp_path / "cache", "1600k") as disk:
        with pytest.raises(StorageError, match=f"no space left on device under {re.escape(str(disk))} "
                                               r"\(reserving .* for shard-000-of-001.h5"):
            ShardWriter.open(disk, shard_layout(ids), md5s)
        assert list(disk.iterdir()) == []

        with monkeypatch.context() as patch:
            patch.setattr("modules.cache.hdf5_rows.reserve_space", lambda path: None)
            writer = ShardWriter.open(disk, shard_layout(ids), md5s)
            with pytest.raises(StorageError, match=f"no space left on device under {re.escape(str(disk))} "
                                                   r"\(writing shard-000-of-001.h5"):
                for first in range(0, len(ids), 2):
                    writer.write_batch([entries[s] for s in ids[first:first + 2]])
            writer.close()
        flagged = assert_cache_holds(disk, entries)
        assert 0 < len(flagged) < len(ids) and not ignored

        remount(disk, "size=4m")
        writer = ShardWriter.open(disk, shard_layout(ids), md5s)
        assert writer.messages == [] and all(writer.is_complete(s, "a" * 32) for s in flagged)
        writer.write_batch([entries[s] for s in ids if s not in flagged])
        writer.close()
        assert assert_cache_holds(disk, entries) == ids


# --------------------------------------------------------------------------- stages, as processes

#: Runs a stage script with ``fileio.reserve_space`` switched off: a file system that cannot
#: reserve blocks (copy-on-write), where stage 3 fills the disk midway instead of at creation.
NO_RESERVE = ("import runpy, sys; import modules.core.fileio as f; f.reserve_space = lambda path: None; "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_here(script: str, config: Path, *extra: str) -> None:
    """Run a stage script's ``main`` in this process: the runs that must succeed, without paying for
    another interpreter start (the failing runs are processes: their exit code and stderr count)."""
    argv = sys.argv
    sys.argv = [script, "--config", str(config), *extra]
    try:
        importlib.import_module(Path(script).stem).main()
    finally:
        sys.argv = argv


def run_script(script: str, config: Path, *extra: str, no_reserve: bool = False, preexec_fn=None):
    prefix = [sys.executable, "-c", NO_RESERVE] if no_reserve else [sys.executable]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    return subprocess.run([*prefix, str(REPO / script), "--config", str(config), *extra], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=600, preexec_fn=preexec_fn)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny project (4 images, the demo backbone) through stages 1-3 uninterrupted; returns its
    folder, config and cache arrays."""
    if not DEMO_CHECKPOINT.is_file():
        pytest.skip(f"{DEMO_CHECKPOINT} is missing")
    folder = tmp_path_factory.mktemp("disk_full")
    images, masks = write_tiny_dataset(folder / "data", per_group=2)
    (folder / "ref").mkdir()
    config = write_config(folder / "ref", images, masks, {
        "sam": {"checkpoint": str(DEMO_CHECKPOINT), "family": "sam", "model_type": "demo_tiny", "device": "cpu",
                "num_workers": 0, "encoder_batch_size": 2},
        "prompt_generation": {"num_promptsets_train": 3, "num_promptsets_val": 3, "num_promptsets_test": 3}})
    for script in ("build_manifests.py", "generate_promptsets.py", "precompute_sam_outputs.py"):
        run_here(script, config)
    return {"folder": folder, "config": config, "root": folder / "ref" / "project",
            "cache": cache_arrays(folder / "ref" / "project")}


def cache_arrays(root: Path) -> dict[str, dict[str, np.ndarray]]:
    cache = SamCache(root)
    arrays = {}
    for safe_id in cache.sample_ids():
        entry = cache.entry(safe_id, verify=True)
        arrays[safe_id] = {"embed": entry.features["image_embed"], "logits": entry.logits,
                           "iou": entry.iou_predictions, "hw": np.array(entry.original_hw + entry.input_hw)}
    cache.close()
    return arrays


def copy_project(reference, name: str, parts=("manifests", "prompt_sets")) -> tuple[Path, Path]:
    """A new project reading the reference's data, with copies of ``parts``; (config, root)."""
    root = reference["folder"] / name / "project"
    for part in parts:
        shutil.copytree(reference["root"] / part, root / part)
    config = root.parent / "config.yaml"
    root.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(reference["config"].read_text().replace(str(reference["root"]), str(root)))
    return config, root


@needs_mount
def test_stage3_disk_full_midway_then_rerun_equals_uninterrupted(reference, capsys):
    """The reported fault: the disk fills while stage 3 writes. One line naming the cache folder,
    no flagged entry with bad data; after making space a plain rerun computes only the rest and
    the cache equals the uninterrupted run's."""
    config, root = copy_project(reference, "midway")
    with small_disk(root / "sam_cache", "7m") as disk:  # the shard needs ~9.5 MiB, a batch ~5 MiB
        failed = run_script("precompute_sam_outputs.py", config, no_reserve=True)  # batches of 2 images
        (line,) = error_lines(failed)
        folder = next(disk.iterdir())
        assert f"no space left on device under {folder}" in line
        partial = cache_arrays(root)
        assert 0 < len(partial) < len(reference["cache"])
        for safe_id, arrays in partial.items():
            for name, value in arrays.items():
                np.testing.assert_array_equal(value, reference["cache"][safe_id][name], err_msg=f"{safe_id} {name}")

        remount(disk, "size=32m")
        capsys.readouterr()
        run_here("precompute_sam_outputs.py", config)
        assert f"{len(partial)} already cached" in capsys.readouterr().out
        finished = cache_arrays(root)
        assert sorted(finished) == sorted(reference["cache"])
        for safe_id, arrays in finished.items():
            for name, value in arrays.items():
                np.testing.assert_array_equal(value, reference["cache"][safe_id][name], err_msg=f"{safe_id} {name}")


@needs_mount
def test_stage2_disk_full_keeps_earlier_results_and_rerun_finishes(reference):
    """Stage 2 fills its folder: one line naming it, the manifests untouched, every prompt-set file
    written is whole; after making space the rerun's files equal the reference's byte for byte."""
    config, root = copy_project(reference, "stage2", parts=("manifests",))
    manifests = tree_digest(root / "manifests")
    with small_disk(root / "prompt_sets", "12k") as disk:  # the stage record and two prompt-set files
        (line,) = error_lines(run_script("generate_promptsets.py", config))
        assert "no space left on device under" in line and str(disk) in line
        written = prompt_set_files(disk)
        reference_files = prompt_set_files(reference["root"] / "prompt_sets")
        assert written, "the disk filled before any prompt-set file: size the tmpfs larger"
        assert {name: reference_files[name] for name in written} == written
        assert not [p for p in disk.rglob("*.tmp")]
        assert tree_digest(root / "manifests") == manifests

        remount(disk, "size=4m")
        run_here("generate_promptsets.py", config)
        assert prompt_set_files(disk) == prompt_set_files(reference["root"] / "prompt_sets")


def verified_rows(path: Path) -> np.ndarray:
    """The flags of a packed (or partial) file, after checking that every flagged row's stored
    inputs and target give its stored CRC."""
    with h5py.File(path, "r") as handle:
        flags = handle["rows/complete"][:].astype(bool)
        for row in np.flatnonzero(flags):
            assert row_checksum(handle["inputs"][row], handle["targets"][row]) == handle["rows/checksum"][row]
    return flags


@needs_mount
def test_packing_on_a_full_disk_is_one_line_and_flags_only_rows_on_disk(reference, monkeypatch, capsys):
    """pack_to_hdf5.py on a disk too small for the packed split: one line naming the folder when the
    file is created, the index and the SAM cache unchanged. Where blocks cannot be reserved
    (simulated), the disk fills midway: flagged rows all verify; after making space the rerun
    finishes every row."""
    config, root = copy_project(reference, "packing", parts=("manifests", "prompt_sets", "sam_cache"))
    cache_before = tree_digest(root / "sam_cache")
    with small_disk(root / "training_data", "256k") as disk:
        run_here("build_training_indices.py", config)
        index_before = tree_digest(disk)
        (line,) = error_lines(run_script("pack_to_hdf5.py", config))
        assert f"no space left on device under {disk} (reserving" in line
        after = tree_digest(disk)
        assert {name: after.get(name) for name in index_before} == index_before

        remount(disk, "size=2m")  # one sample's 3 rows (1.3 MiB) fit, two samples' do not
        with monkeypatch.context() as patch:
            patch.setattr("modules.cache.hdf5_rows.reserve_space", lambda path: None)
            with pytest.raises(SystemExit, match="2"):
                run_here("pack_to_hdf5.py", config)
        assert f"no space left on device under {disk} (writing train.h5.partial)" in capsys.readouterr().err
        flagged = verified_rows(disk / "train.h5.partial")
        assert 0 < flagged.sum() < len(flagged)

        remount(disk, "size=16m")
        run_here("pack_to_hdf5.py", config)
        assert verified_rows(disk / "train.h5").all()
    assert tree_digest(root / "sam_cache") == cache_before


def _read_only(folder: Path):
    """Make ``folder`` read-only for the stage: a read-only remount when it is a tmpfs we mounted,
    else (no mount allowed) chmod, which binds only non-root users."""
    if MOUNT_REFUSED is None:
        remount(folder, "ro")
    else:
        if os.geteuid() == 0:
            pytest.skip("as root without mount, nothing makes a folder read-only")
        folder.chmod(0o555)


def test_read_only_project_root_is_one_line_naming_it(reference):
    """Stage 2 into a read-only project root (its manifests there): one line naming the folder;
    nothing in it changes."""
    config, root = copy_project(reference, "readonly", parts=())
    mount = small_disk(root, "1m") if MOUNT_REFUSED is None else contextlib.nullcontext(root)
    with mount:
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(reference["root"] / "manifests", root / "manifests")
        before = tree_digest(root)
        _read_only(root)
        try:
            (line,) = error_lines(run_script("generate_promptsets.py", config))
        finally:
            if MOUNT_REFUSED is not None:
                root.chmod(0o755)
        assert f"{root} is not writable (" in line
        assert tree_digest(root) == before


def test_file_size_limit_is_one_line_and_keeps_written_files(reference):
    """The injected fault that needs no mount: a file-size limit (``RLIMIT_FSIZE``, SIGXFSZ ignored,
    so writes fail with EFBIG) while stage 2 writes: one line naming the folder, whole files only."""
    config, root = copy_project(reference, "fsize", parts=("manifests",))

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    (line,) = error_lines(run_script("generate_promptsets.py", config, preexec_fn=limit_file_size))
    assert "file size limit exceeded under" in line and str(root / "prompt_sets") in line
    reference_files = prompt_set_files(reference["root"] / "prompt_sets")
    written = prompt_set_files(root / "prompt_sets")
    assert {name: reference_files[name] for name in written} == written
    assert not [p for p in (root / "prompt_sets").rglob("*.tmp")]
