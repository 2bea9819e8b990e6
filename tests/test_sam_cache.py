"""The HDF5 SAM cache on synthetic entries (no model): layout, flags, salvage, reader."""

import os
import pickle

import h5py
import numpy as np
import pytest

from modules.cache import sam_cache
from modules.cache.sam_cache import CacheEntry, SamCache, ShardLayout
from modules.cache.shard_writer import ShardWriter

FEATURES = (("image_embed", (8, 4, 4)), ("high_res_feat0", (2, 16, 16)))


def layout(safe_ids, index=0, count=1, max_promptsets=3):
    return ShardLayout(
        backbone_id="sam-test-0123456789ab", family="sam", model_type="test", checkpoint_md5="0123456789ab" * 2,
        shard_index=index, shard_count=count, slots=tuple(("train", s) for s in safe_ids),
        feature_shapes=FEATURES, max_promptsets=max_promptsets, num_outputs=3,
    )


def make_entry(safe_id, seed, num_sets=2, md5="a" * 32):
    rng = np.random.default_rng(seed)
    return CacheEntry(
        safe_id=safe_id, split="train",
        features={name: rng.normal(size=shape).astype(np.float16) for name, shape in FEATURES},
        logits=rng.normal(size=(num_sets, 256, 256)).astype(np.float16),
        promptset_ids=np.arange(num_sets, dtype=np.int32),
        branch_index=rng.integers(0, 3, num_sets).astype(np.int8),
        iou_predictions=rng.random((num_sets, 3)).astype(np.float32),
        original_hw=(50 + seed, 60), input_hw=(1024, 800), promptset_md5=md5,
    )


def assert_same(a, b):
    for name in a.features:
        np.testing.assert_array_equal(a.features[name], b.features[name])
    for name in ("logits", "promptset_ids", "branch_index", "iou_predictions"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert (a.original_hw, a.input_hw, a.promptset_md5) == (b.original_hw, b.input_hw, b.promptset_md5)


def test_write_read_roundtrip_and_flags(tmp_path):
    ids = ["a", "b", "c"]
    writer = ShardWriter.open(tmp_path, layout(ids), {})
    entries = [make_entry("a", 0), make_entry("c", 2, num_sets=3)]
    writer.write_batch(entries)
    assert writer.is_complete("a", "a" * 32) and not writer.is_complete("a", "b" * 32)
    assert not writer.is_complete("b", "a" * 32)
    writer.write_manifest()
    writer.close()

    cache = SamCache(tmp_path)
    assert len(cache) == 2 and "a" in cache and "b" not in cache
    assert cache.sample_ids() == ["a", "c"]
    for expected in entries:
        assert_same(cache.entry(expected.safe_id, verify=True), expected)
    assert cache.entry("c").logits.shape == (3, 256, 256)
    clone = pickle.loads(pickle.dumps(cache))  # DataLoader workers get a handle-free copy
    assert_same(clone.entry("a"), entries[0])
    manifest = (tmp_path / "shard-000-of-001.manifest.csv").read_text()
    assert "a,train,shard-000-of-001.h5,0,1," in manifest


def test_chunks_within_recommended_sizes(tmp_path):
    big = ShardLayout("sam2-x-0", "sam2", "x", "0" * 32, 0, 1, (("train", "a"),),
                      (("image_embed", (256, 64, 64)), ("high_res_feat0", (32, 256, 256))), 10, 3)
    ShardWriter.open(tmp_path, big, {}).close()
    with h5py.File(tmp_path / "shard-000-of-001.h5", "r") as handle:
        for dataset in (handle["features/image_embed"], handle["features/high_res_feat0"], handle["logits"]):
            size = np.prod(dataset.chunks) * dataset.dtype.itemsize
            assert 10 * 1024 <= size <= 1 << 20 and dataset.chunks[0] == 1


def test_kill_between_data_and_flags_leaves_entry_incomplete(tmp_path):
    writer = ShardWriter.open(tmp_path, layout(["a", "b"]), {})
    writer.write_batch([make_entry("a", 0)])

    def crash():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        writer.write_batch([make_entry("b", 1)], before_flags=crash)
    writer.close()
    assert SamCache(tmp_path).sample_ids() == ["a"]
    reopened = ShardWriter.open(tmp_path, layout(["a", "b"]), {"a": "a" * 32, "b": "a" * 32})
    assert reopened.messages == [] and reopened.is_complete("a", "a" * 32) and not reopened.is_complete("b", "a" * 32)
    reopened.close()


def test_writes_never_change_hdf5_metadata(tmp_path):
    """Only raw data bytes change after creation: what makes a killed writer harmless."""
    ids = [f"s{i}" for i in range(4)]
    ShardWriter.open(tmp_path, layout(ids), {}).close()
    path = tmp_path / "shard-000-of-001.h5"
    before = np.frombuffer(path.read_bytes(), np.uint8).copy()
    writer = ShardWriter.open(tmp_path, layout(ids), {})
    writer.write_batch([make_entry("s1", 1), make_entry("s3", 3)])
    writer.close()
    after = np.frombuffer(path.read_bytes(), np.uint8)
    assert after.size == before.size
    changed = np.flatnonzero(before != after)
    with h5py.File(path, "r") as handle:
        regions = []
        for dataset in [handle[f"entries/{n}"] for n in handle["entries"]]:
            regions.append((dataset.id.get_offset(), dataset.id.get_storage_size()))
        for dataset in [handle[f"features/{n}"] for n, _ in FEATURES] + [handle["logits"]]:
            for i in range(dataset.id.get_num_chunks()):
                info = dataset.id.get_chunk_info(i)
                regions.append((info.byte_offset, info.size))
    inside = np.zeros(after.size, bool)
    for offset, size in regions:
        inside[offset:offset + size] = True
    assert changed.size > 0 and inside[changed].all()


def test_truncated_file_is_salvaged(tmp_path):
    ids = [f"s{i}" for i in range(6)]
    md5s = {s: "a" * 32 for s in ids}
    writer = ShardWriter.open(tmp_path, layout(ids), md5s)
    entries = [make_entry(s, i) for i, s in enumerate(ids)]
    writer.write_batch(entries)
    writer.close()
    path = tmp_path / "shard-000-of-001.h5"
    os.truncate(path, int(path.stat().st_size * 0.8))

    repaired = ShardWriter.open(tmp_path, layout(ids), md5s)
    assert any("truncated or corrupt" in m for m in repaired.messages)
    kept = [s for s in ids if repaired.is_complete(s, "a" * 32)]
    repaired.close()
    assert 0 < len(kept) < len(ids)  # the logits of the last entries were cut off
    cache = SamCache(tmp_path)
    for safe_id in kept:
        assert_same(cache.entry(safe_id, verify=True), entries[ids.index(safe_id)])


def test_garbage_file_is_replaced(tmp_path):
    path = tmp_path / "shard-000-of-001.h5"
    path.write_bytes(b"not an hdf5 file" * 100)
    writer = ShardWriter.open(tmp_path, layout(["a"]), {"a": "a" * 32})
    assert any("truncated or corrupt" in m for m in writer.messages)
    assert not writer.is_complete("a", "a" * 32)
    writer.close()


def test_new_layout_keeps_valid_entries_and_drops_stale_ones(tmp_path):
    writer = ShardWriter.open(tmp_path, layout(["a", "b"]), {})
    writer.write_batch([make_entry("a", 0), make_entry("b", 1)])
    writer.close()
    # A new sample list (e.g. a new manifest): 'a' is kept, 'b' has another prompt-set file now.
    rebuilt = ShardWriter.open(tmp_path, layout(["a", "b", "c"]), {"a": "a" * 32, "b": "f" * 32, "c": "a" * 32})
    assert any("another layout" in m for m in rebuilt.messages)
    assert rebuilt.is_complete("a", "a" * 32)
    assert not rebuilt.is_complete("b", "f" * 32) and not rebuilt.is_complete("b", "a" * 32)
    rebuilt.close()


def test_reader_joins_shards_and_rejects_ambiguity(tmp_path):
    folder = tmp_path / "sam_cache" / "sam-test-0123456789ab"
    for index, ids in enumerate((["a", "c"], ["b"])):
        writer = ShardWriter.open(folder, layout(ids, index, 2), {})
        writer.write_batch([make_entry(s, i) for i, s in enumerate(ids)])
        writer.close()
    cache = SamCache(tmp_path)
    assert cache.sample_ids() == ["a", "b", "c"] and cache.folder == folder
    (tmp_path / "sam_cache" / "other").mkdir()
    ShardWriter.open(tmp_path / "sam_cache" / "other", layout(["z"]), {}).close()
    with pytest.raises(sam_cache.SamCacheError, match="several backbone caches"):
        SamCache(tmp_path)
    assert len(SamCache(tmp_path, backbone="sam-test-0123456789ab")) == 3
