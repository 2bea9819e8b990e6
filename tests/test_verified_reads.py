"""Stored checksums are checked where data is read: SAM cache entries, packed rows, checkpoints.

One small real project (2 images per group, random demo_tiny weights) runs stages 1-4.5; bytes
are then flipped inside the real files, and each reader must refuse with one line naming the
file; a rerun of stage 3 must repair a damaged cache entry.
"""

import struct
import zipfile

import h5py
import numpy as np
import pytest

from modules.cache import packing
from modules.cache.packed_reader import PackedSplitDataset
from modules.cache.sam_cache import SamCache, SamCacheError, shard_files
from modules.cache.training_index import PackingError
from modules.core.config import load_config
from modules.core.paths import packed_path
from modules.sam import registry
from modules.sam.base import BackboneError
from tests.helpers.precompute_fixtures import make_project, save_random_checkpoint
from tests.stage_runner import run_stage


def row_offset(path, name, row):
    """File offset of the first stored byte of row ``row`` of dataset ``name``."""
    with h5py.File(path, "r", locking=False) as handle:
        dataset = handle[name]
        if dataset.chunks is None:
            row_bytes = int(np.prod(dataset.shape[1:])) * dataset.dtype.itemsize
            return dataset.id.get_offset() + row * row_bytes
        return dataset.id.get_chunk_info_by_coord((row,) + (0,) * (dataset.ndim - 1)).byte_offset


def flip_byte(path, offset):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0x5A]))


def one_error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verified")
    checkpoint = save_random_checkpoint("sam", "demo_tiny", folder / "demo_tiny.pt")
    config = make_project(folder, per_group=2, overrides={"sam": {"checkpoint": str(checkpoint)}})
    run_stage("precompute_sam_outputs.py", config)
    run_stage("build_training_indices.py", config)
    run_stage("pack_to_hdf5.py", config)
    return config


def test_flipped_byte_in_a_packed_row_is_refused_naming_the_file(project):
    path = packed_path(load_config(project).project_root, "train")
    dataset = PackedSplitDataset(path, in_memory=False)
    dataset.read_batch(range(len(dataset)))  # intact: every row passes
    dataset.close()
    offset = row_offset(path, "inputs", 1)
    flip_byte(path, offset + 100)
    try:
        for in_memory in (False, True):
            with pytest.raises(PackingError) as info:
                PackedSplitDataset(path, in_memory=in_memory).read_batch([0, 1])
            message = str(info.value)
            assert message.startswith(str(path)) and "row 1" in message and "checksum" in message, message
            assert "pack_to_hdf5.py" in message and "\n" not in message
        PackedSplitDataset(path, in_memory=False).read_batch([0])  # other rows still read
    finally:
        flip_byte(path, offset + 100)
    PackedSplitDataset(path, in_memory=True).read_batch([0, 1])


def test_old_format_packed_file_is_refused_and_repacked(project, tmp_path):
    root = load_config(project).project_root
    path = packed_path(root, "train")
    with h5py.File(path, "r+") as handle:
        handle.attrs["format_version"] = 1
        fingerprint = dict(packing.json.loads(handle.attrs["fingerprint"]), format_version=1)
        handle.attrs["fingerprint"] = packing.json.dumps(fingerprint, sort_keys=True)
    with pytest.raises(PackingError, match="format version 1.*rerun pack_to_hdf5.py"):
        PackedSplitDataset(path)
    result = run_stage("pack_to_hdf5.py", project)
    assert "train: " in result.stdout and "repacking" in result.stdout, result.stdout
    PackedSplitDataset(path).read_batch([0])


def test_flipped_cache_logits_are_refused_and_a_stage3_rerun_repairs_them(project):
    cfg = load_config(project)
    cache = SamCache(cfg.project_root)
    (shard,) = shard_files(cache.folder)
    safe_id = cache.sample_ids("train")[0]
    with h5py.File(shard, "r", locking=False) as handle:
        slot = [s.decode() for s in handle["slots/safe_id"][:]].index(safe_id)
    cache.close()
    flip_byte(shard, row_offset(shard, "logits", slot) + 7)

    with pytest.raises(SamCacheError) as info:
        SamCache(cfg.project_root).entry(safe_id)
    message = str(info.value)
    assert message.startswith(str(shard)) and safe_id in message and "precompute_sam_outputs.py" in message
    # The packing stage reads through the same check: one line, exit code 2.
    line = one_error_line(run_stage("pack_to_hdf5.py", project, "--force", check=False))
    assert str(shard) in line and safe_id in line and "checksum" in line, line

    result = run_stage("precompute_sam_outputs.py", project)
    assert "fail their checksum" in result.stdout and safe_id in result.stdout, result.stdout
    repaired = SamCache(cfg.project_root)
    for other in repaired.sample_ids():
        repaired.entry(other)  # every entry verifies again
    run_stage("pack_to_hdf5.py", project)


def damage_largest_member(source, target):
    """Copy a torch zip checkpoint and flip one byte inside its largest (stored) member."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0x5A
    target.write_bytes(bytes(data))
    return info.filename


def test_checkpoint_with_a_damaged_member_is_refused_naming_the_file(project, tmp_path, monkeypatch):
    good = load_config(project).sam.checkpoint
    bad = tmp_path / "damaged.pt"
    member = damage_largest_member(good, bad)
    with pytest.raises(BackboneError) as info:
        registry.load_backbone("sam", "demo_tiny", bad, device="cpu")
    message = str(info.value)
    assert message.startswith(f"sam.checkpoint: {bad}") and member in message and "\n" not in message, message

    calls = []
    original = zipfile.ZipFile.testzip
    monkeypatch.setattr(zipfile.ZipFile, "testzip", lambda self: calls.append(1) or original(self))
    registry.load_backbone("sam", "demo_tiny", good, device="cpu")
    registry.load_backbone("sam", "demo_tiny", good, device="cpu")
    assert len(calls) <= 1  # verified once per (path, size, mtime) and process

    line = one_error_line(run_stage("precompute_sam_outputs.py", project, "--set", f"sam.checkpoint={bad}",
                                    check=False))
    assert str(bad) in line and "damaged checkpoint" in line, line
