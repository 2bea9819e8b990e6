"""Stage 3's cache writers (``modules/cache/cache_writers.py``): the writer process writes what the
writer thread writes, reports its errors in the stage, and never outlives the stage."""

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from modules.cache.cache_writers import CACHE_WRITERS, CacheWriterError, ProcessWriter
from modules.cache.sam_cache import CacheEntry, SamCacheError, ShardLayout, read_entry, shard_file_name
from modules.cache.shard_writer import ShardWriter
from modules.core.processes import process_gone
from tests.stage_runner import REPO

FEATURES = (("image_embed", (8, 4, 4)), ("high_res_feats_0", (2, 16, 16)))
PROMPTSETS, OUTPUTS = 3, 3


def layout(count: int) -> ShardLayout:
    return ShardLayout("sam2-test-0123456789ab", "sam2", "test", "0123456789ab" * 2, 0, 1,
                       tuple(("train", f"s{i}") for i in range(count)), FEATURES, PROMPTSETS, OUTPUTS)


def entry(index: int, promptsets: int = PROMPTSETS) -> CacheEntry:
    """Entry ``s<index>`` with seeded values; its embedding is a non-contiguous view (as a slice of a
    batch can be), which must survive the trip to the writer process."""
    rng = np.random.default_rng(index)
    wide = rng.standard_normal((8, 4, 8)).astype(np.float16)
    features = {"image_embed": wide[:, :, ::2], "high_res_feats_0": rng.standard_normal((2, 16, 16)).astype(np.float16)}
    return CacheEntry(f"s{index}", "train", features, rng.standard_normal((promptsets, 256, 256)).astype(np.float16),
                      np.arange(promptsets, dtype=np.int32), rng.integers(0, OUTPUTS, promptsets).astype(np.int8),
                      rng.random((promptsets, OUTPUTS)).astype(np.float32), (40, 60), (683, 1024), f"{index:032d}")


def flags(path: Path) -> list[bool]:
    writer = ShardWriter.reopen(path, layout(4))
    try:
        return [writer.is_complete(f"s{i}", f"{i:032d}") for i in range(4)]
    finally:
        writer.close()


def stored(path: Path, index: int) -> CacheEntry:
    with h5py.File(path, "r", locking=False) as handle:
        return read_entry(handle, index, [name for name, _ in FEATURES])


@pytest.mark.parametrize("kind", [*sorted(CACHE_WRITERS), "process_without_shared_memory"])
def test_each_writer_stores_the_entries_bit_for_bit(tmp_path, kind, monkeypatch):
    """Also a batch larger than the first (the writer process sizes its shared-memory slots by the
    first batch and sends a larger one in parts) and, where there is no memfd, through the socket."""
    memfd = os.memfd_create
    if kind == "process_without_shared_memory":  # as in a sandbox that refuses memfd_create
        monkeypatch.setattr(os, "memfd_create", lambda *args: (_ for _ in ()).throw(PermissionError(1, "denied")))
        kind = "process"
    written = []
    background = CACHE_WRITERS[kind](ShardWriter.open(tmp_path, layout(4), {}), written.append)
    assert (getattr(background, "_ring", None) is None) == (kind == "thread" or os.memfd_create is not memfd)
    background.put([entry(0)])
    background.flush()
    assert written == [1]
    background.put([entry(1), entry(2), entry(3, promptsets=2)])
    background.close()
    writer = background.release()
    writer.write_manifest()
    writer.close()
    assert sum(written) == 4
    assert flags(writer.path) == [True] * 4
    for index in range(4):
        want, got = entry(index, promptsets=2 if index == 3 else PROMPTSETS), stored(writer.path, index)
        for name, value in want.features.items():
            np.testing.assert_array_equal(got.features[name], value)
        np.testing.assert_array_equal(got.logits, want.logits)
        np.testing.assert_array_equal(got.iou_predictions, want.iou_predictions)
        np.testing.assert_array_equal(got.branch_index, want.branch_index)
        assert (got.original_hw, got.input_hw, got.promptset_md5) == (want.original_hw, want.input_hw,
                                                                       want.promptset_md5)


def test_an_error_in_the_writer_process_is_raised_in_the_stage(tmp_path):
    background = ProcessWriter(ShardWriter.open(tmp_path, layout(4), {}), lambda n: None)
    background.put([entry(0)])
    stranger = entry(1)
    stranger.safe_id = "not_in_this_shard"
    background.put([stranger])
    with pytest.raises(SamCacheError, match="not_in_this_shard is not a sample of this shard") as raised:
        background.put([entry(2)])  # or at close: whichever comes after the reply
        background.close()
    assert str(tmp_path) in str(raised.value)
    writer = background.release()
    writer.close()
    assert background._process.returncode is not None
    assert flags(writer.path) == [True, False, False, False]  # nothing after the failure was written


def test_a_killed_writer_process_is_one_line_and_keeps_what_it_flagged(tmp_path):
    background = ProcessWriter(ShardWriter.open(tmp_path, layout(4), {}), lambda n: None)
    background.put([entry(0)])
    background.flush()  # the first batch is on disk and flagged
    os.kill(background.pid, signal.SIGKILL)
    with pytest.raises(CacheWriterError) as raised:
        for index in range(1, 4):
            background.put([entry(index)])
        background.close()
    message = str(raised.value)
    assert "\n" not in message and message.startswith(str(tmp_path))
    assert f"cache writer process (pid {background.pid}) died (killed by SIGKILL)" in message
    background.release().close()
    assert flags(tmp_path / shard_file_name(0, 1)) == [True, False, False, False]


def test_the_writer_process_ignores_ctrl_c_and_dies_with_the_stage(tmp_path):
    """SIGINT goes to the stage's whole process group on a Ctrl-C: the stage decides what stops. A
    SIGKILL of the stage ends the writer too (PR_SET_PDEATHSIG), even while another process holds the
    stage's end of the socket (as forked loader workers do), so it never sees the end of its input."""
    code = (
        "import signal, subprocess, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # a test runner may ignore it\n"
        "from pathlib import Path\n"
        "from modules.cache.cache_writers import ProcessWriter\n"
        "from modules.cache.shard_writer import ShardWriter\n"
        "from tests.test_cache_writers import entry, layout\n"
        f"background = ProcessWriter(ShardWriter.open(Path({str(tmp_path)!r}), layout(4), {{}}), lambda n: None)\n"
        "background.put([entry(0)]); background.flush()\n"
        "holder = subprocess.Popen(['sleep', '600'], pass_fds=(background._conn.fileno(),))\n"
        "print(background.pid, holder.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    stage = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    holder_pid = None
    try:
        writer_pid, holder_pid = (int(word) for word in stage.stdout.readline().split())
        os.kill(writer_pid, signal.SIGINT)
        time.sleep(1.0)
        assert not process_gone(writer_pid)
        stage.kill()
        stage.wait()
        deadline = time.monotonic() + 10
        while not process_gone(writer_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process_gone(writer_pid)
    finally:
        stage.kill()
        stage.wait()
        stage.stdout.close()
        if holder_pid is not None:
            os.kill(holder_pid, signal.SIGKILL)
    assert flags(tmp_path / shard_file_name(0, 1)) == [True, False, False, False]


def staged(index: int, host_array, promptsets: int = PROMPTSETS) -> CacheEntry:
    """``entry(index)`` with its arrays copied into ``host_array``'s memory (as stage 3's host copies)."""
    def copied(value):
        out = host_array(value.shape, value.dtype)
        np.copyto(out, value)
        return out

    original = entry(index, promptsets)
    return dataclasses.replace(original, features={k: copied(v) for k, v in original.features.items()},
                               logits=copied(original.logits), branch_index=copied(original.branch_index),
                               iou_predictions=copied(original.iou_predictions))


def test_batches_copied_into_the_writers_shared_memory_are_written_as_they_are(tmp_path):
    """Stage 3 copies each batch's results into ``host_arrays()`` (a shared-memory slot): a batch
    of them, a batch with no entries (every image failed), and a staged batch larger than a slot."""
    written = []
    background = ProcessWriter(ShardWriter.open(tmp_path, layout(4), {}), written.append, batch_size=2)
    host = background.host_arrays()
    first = [staged(0, host), staged(1, host, promptsets=2)]
    assert np.shares_memory(first[0].logits, background._ring.bytes)  # decoded straight into the slot
    background.put(first)
    for _ in range(5):  # a slot handed out for nothing comes back
        background.host_arrays()
        background.put([])
    host = background.host_arrays()
    background.put([staged(2, host), staged(3, host), staged(1, host, promptsets=2)])  # 3 > 2: in parts
    background.close()
    background.release().close()
    assert sum(written) == 5 and flags(tmp_path / shard_file_name(0, 1)) == [True] * 4
    for index in range(4):
        want, got = entry(index, promptsets=2 if index == 1 else PROMPTSETS), stored(tmp_path / shard_file_name(0, 1), index)
        np.testing.assert_array_equal(got.logits, want.logits)
        np.testing.assert_array_equal(got.features["image_embed"], want.features["image_embed"])
        np.testing.assert_array_equal(got.iou_predictions, want.iou_predictions)


def test_the_writer_benchmark_runs_and_compares_both_writers():
    out = subprocess.run([sys.executable, "benchmarks/bench_cache_writer.py", "--batches", "2", "--batch-size", "1",
                          "--promptsets", "1", "--repeats", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.strip().split(" ")[0] in ("none", "thread", "process")]
    assert [row[0] for row in rows] == ["none", "thread", "process"] * 2
    assert all(float(row[2]) > 0 for row in rows)  # b/a of each writer
