"""Stages 4 and 4.5 on a real project: index rows, packed arrays aligned with the cache, prompt sets
and masks, resume after SIGKILL, fingerprints, and the Dataset (in memory, from disk, workers).

The SAM cache of the fixture project is written through ``shard_writer.ShardWriter`` with seeded
random logits instead of running stage 3 (the demo backbone takes ~6 s per image on the 2-core
test machine): the arrays are then known, and some logits are set far outside the clip range.
"""

import hashlib
import shutil
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from modules.cache import packed_reader, packing, sam_cache, shard_writer, training_index
from modules.core.config import load_config
from modules.core.fileio import cached_file_md5
from modules.data.manifest import SPLITS, load_split_manifest
from modules.core.paths import cache_dir, promptset_path
from modules.data.promptset import load_promptsets
from modules.data.sample_files import DataRoots
from tests.helpers.precompute_fixtures import save_random_checkpoint, write_tiny_dataset
from tests.stage_runner import run_stage, write_config

FEATURES = (("image_embed", (8, 4, 4)),)
#: Written into every cached logit map at pixel (0, 0) / (0, 1), far outside any clip.
HUGE_LOGIT = 1000.0
#: Cached in no shard: stands for an image stage 3 failed on.
UNCACHED_SAMPLE = "dogs__s01"
RESIZED_MASK_SAMPLE = "cats__big"


def write_fixture_cache(config_path, skip=(UNCACHED_SAMPLE,), seed=0):
    """A complete one-shard SAM cache for every sample of the project except ``skip``.

    Logits ``P x 256 x 256`` are seeded normals (std 8) with +-HUGE_LOGIT at two pixels;
    ``image_embed`` is ``8 x 4 x 4``. Returns the cache folder.
    """
    cfg = load_config(config_path)
    root = cfg.project_root
    backbone = training_index.configured_backbone_id(cfg)
    md5 = cached_file_md5(cfg.sam.checkpoint)
    slots = [(split, safe_id) for split in SPLITS for safe_id in load_split_manifest(root, split)["safe_id"]]
    max_sets = max(cfg.prompt_generation.num_promptsets_train, cfg.prompt_generation.num_promptsets_val,
                   cfg.prompt_generation.num_promptsets_test)
    layout = sam_cache.ShardLayout(backbone, cfg.sam.family, cfg.sam.model_type, md5, 0, 1, tuple(slots),
                                   FEATURES, max_sets, 3)
    folder = cache_dir(root, backbone)
    writer = shard_writer.ShardWriter.open(folder, layout, {})
    rng = np.random.default_rng(seed)
    entries = []
    for split, safe_id in slots:
        if safe_id in skip:
            continue
        record = load_promptsets(root, split, safe_id)
        count = len(record["promptsets"])
        logits = rng.normal(0.0, 8.0, (count, 256, 256))
        logits[:, 0, 0], logits[:, 0, 1] = HUGE_LOGIT, -HUGE_LOGIT
        entries.append(sam_cache.CacheEntry(
            safe_id=safe_id, split=split,
            features={"image_embed": rng.normal(size=(8, 4, 4)).astype(np.float16)},
            logits=logits.astype(np.float16),
            promptset_ids=np.array([s["promptset_id"] for s in record["promptsets"]], np.int32),
            branch_index=rng.integers(0, 3, count).astype(np.int8),
            iou_predictions=rng.random((count, 3)).astype(np.float32),
            original_hw=(record["image_h"], record["image_w"]), input_hw=(64, 64),
            promptset_md5=cached_file_md5(promptset_path(root, split, safe_id)),
        ))
    writer.write_batch(entries)
    writer.write_manifest()
    writer.close()
    shard_writer.write_backbone_info(folder, {"backbone_id": backbone, "family": cfg.sam.family,
                                           "model_type": cfg.sam.model_type, "checkpoint_md5": md5,
                                           "feature_shapes": {name: list(shape) for name, shape in FEATURES}})
    return folder


def make_packing_project(folder, per_group=4):
    """Tiny data set (+ one sample whose mask is twice the image size), stages 1-2, fixture cache."""
    images, masks = write_tiny_dataset(folder / "data", per_group=per_group)
    yy, xx = np.mgrid[:120, :160]
    Image.fromarray(np.full((60, 80, 3), 90, np.uint8)).save(images / "cats" / "big.png")
    Image.fromarray((((yy - 50) ** 2 + (xx - 70) ** 2 < 30**2) * 255).astype(np.uint8)).save(masks / "cats" / "big.png")
    checkpoint = save_random_checkpoint("sam", "demo_tiny", folder / "demo_tiny.pt")
    config = write_config(folder, images, masks, {
        "sam": {"checkpoint": str(checkpoint), "device": "cpu"},
        "training": {"logit_clip": 20.0},
    })
    run_stage("build_manifests.py", config)
    run_stage("generate_promptsets.py", config)
    write_fixture_cache(config)
    return config


@pytest.fixture(scope="module")
def packed_project(tmp_path_factory):
    """A project packed once, uninterrupted (read-only for the tests: they copy it to mutate)."""
    folder = tmp_path_factory.mktemp("packing")
    config = make_packing_project(folder)
    index_run = run_stage("build_training_indices.py", config)
    run_stage("pack_to_hdf5.py", config)
    return {"config": config, "root": folder / "project", "index_stdout": index_run.stdout + index_run.stderr}


def copy_project(packed_project, tmp_path, keep=("manifests", "prompt_sets", "sam_cache", "training_data")):
    """A copy of the fixture's project root; run stages on it with ``--set data.project_root=``."""
    root = tmp_path / "project"
    for name in keep:
        shutil.copytree(packed_project["root"] / name, root / name)
    return root


def run_on(packed_project, root, script, *extra, **kwargs):
    return run_stage(script, packed_project["config"], "--set", f"data.project_root={root}", *extra, **kwargs)


def mask_file(packed_project, row) -> Path:
    """The mask file an index row names (stored relative to the data's masks root)."""
    return DataRoots.from_config(load_config(packed_project["config"]).data).mask(row["mask_path"])


def file_state(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, hashlib.md5(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def packed_arrays(path):
    with h5py.File(path, "r") as handle:
        arrays = {name: handle[name][:] for name in ("inputs", "targets", "rows/complete", "rows/sample",
                                                     "rows/promptset_id", "samples/safe_id", "index_csv")}
        if "samples/embedding" in handle:
            arrays["samples/embedding"] = handle["samples/embedding"][:]
        return arrays, dict(handle.attrs)


# --------------------------------------------------------------------------- independent recomputation


def expected_prompt_maps(points_256, labels, sigma):
    """``2 x 256 x 256``: per-point Gaussians (peak 1) summed per label and clamped to [0, 1]."""
    yy, xx = np.mgrid[:256, :256].astype(np.float64)
    maps = np.zeros((2, 256, 256))
    for (x, y), label in zip(points_256, labels):
        maps[0 if label == 1 else 1] += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.minimum(maps, 1.0)


def nearest(mask, height, width):
    rows = ((np.arange(height) + 0.5) * mask.shape[0] / height).astype(int)
    cols = ((np.arange(width) + 0.5) * mask.shape[1] / width).astype(int)
    return mask[rows][:, cols]


def expected_target(mask_path, image_h, image_w):
    mask = np.asarray(Image.open(mask_path).convert("L")) > 127
    if mask.shape != (image_h, image_w):
        mask = nearest(mask, image_h, image_w)
    return nearest(mask, 256, 256).astype(np.uint8)


# --------------------------------------------------------------------------- stage 4


def test_index_has_one_row_per_cached_prompt_set(packed_project):
    root = packed_project["root"]
    cache = sam_cache.SamCache(root / "sam_cache")
    total_missing = 0
    for split in SPLITS:
        manifest = load_split_manifest(root, split)
        index = training_index.load_index(root, split)
        cached = [s for s in manifest["safe_id"] if s != UNCACHED_SAMPLE]
        total_missing += len(manifest) - len(cached)
        expected_rows = sum(len(load_promptsets(root, split, s)["promptsets"]) for s in cached)
        assert len(index) == expected_rows > 0
        assert list(index.columns) == list(training_index.INDEX_COLUMNS)
        assert UNCACHED_SAMPLE not in set(index["safe_id"])
        assert list(dict.fromkeys(index["safe_id"])) == cached  # manifest order
        for row in index.to_dict("records"):
            record = load_promptsets(root, split, row["safe_id"])
            promptset = next(s for s in record["promptsets"] if s["promptset_id"] == row["promptset_id"])
            assert row["k_pairs"] == promptset["k"] == len(promptset["labels"]) // 2
            # The recorded shard file and slot really hold this sample.
            with h5py.File(cache.folder / row["cache_shard_file"], "r") as handle:
                assert handle["slots/safe_id"][row["cache_slot"]].decode() == row["safe_id"]
            assert row["cache_backbone_id"] == cache.folder.name
    assert total_missing == 1
    assert "1 samples left out, not in the SAM cache" in packed_project["index_stdout"]


def test_index_rerun_with_same_inputs_rewrites_nothing(packed_project, tmp_path):
    root = copy_project(packed_project, tmp_path)
    before = file_state(root / "training_data")
    result = run_on(packed_project, root, "build_training_indices.py")
    after = file_state(root / "training_data")
    assert "wrote" not in result.stdout
    assert {k: v for k, v in after.items() if k.name != "config.resolved.yaml"} == \
        {k: v for k, v in before.items() if k.name != "config.resolved.yaml"}


# --------------------------------------------------------------------------- stage 4.5


def test_packed_rows_match_cache_promptsets_and_masks(packed_project):
    root = packed_project["root"]
    cache = sam_cache.SamCache(root / "sam_cache")
    clip = 20.0
    for split in SPLITS:
        index = training_index.load_index(root, split)
        arrays, attrs = packed_arrays(root / "training_data" / f"{split}.h5")
        n = len(index)
        assert arrays["inputs"].shape == (n, 3, 256, 256) and arrays["inputs"].dtype == np.float16
        assert arrays["targets"].shape == (n, 1, 256, 256) and arrays["targets"].dtype == np.uint8
        assert arrays["rows/complete"].all() and attrs["logit_clip"] == clip
        assert arrays["index_csv"].tobytes() == (root / "training_data" / f"{split}_index.csv").read_bytes()
        with h5py.File(root / "training_data" / f"{split}.h5", "r") as handle:
            assert handle["inputs"].chunks == (1, 3, 256, 256)
        assert np.abs(arrays["inputs"][:, 0]).max() == clip  # the +-1000 logits were clipped
        assert set(np.unique(arrays["targets"])) == {0, 1}
        safe_ids = [s.decode() for s in arrays["samples/safe_id"]]
        for row, entry_row in enumerate(index.to_dict("records")):
            assert safe_ids[arrays["rows/sample"][row]] == entry_row["safe_id"]
            assert arrays["rows/promptset_id"][row] == entry_row["promptset_id"]
            entry = cache.entry(entry_row["safe_id"])
            position = int(np.flatnonzero(entry.promptset_ids == entry_row["promptset_id"])[0])
            expected_logits = np.clip(entry.logits[position].astype(np.float32), -clip, clip)
            np.testing.assert_array_equal(arrays["inputs"][row, 0], expected_logits.astype(np.float16))
            record = load_promptsets(root, split, entry_row["safe_id"])
            promptset = next(s for s in record["promptsets"] if s["promptset_id"] == entry_row["promptset_id"])
            maps = expected_prompt_maps(promptset["points_256"], promptset["labels"], record["gaussian_sigma"])
            np.testing.assert_allclose(arrays["inputs"][row, 1:].astype(np.float32), maps, atol=1e-3)
            target = expected_target(mask_file(packed_project, entry_row), entry_row["image_h"], entry_row["image_w"])
            np.testing.assert_array_equal(arrays["targets"][row, 0], target)
    # The sample whose mask is 120 x 160 for a 60 x 80 image went through the resize.
    resized = [r for s in SPLITS for r in training_index.load_index(root, s).to_dict("records") if r["safe_id"] == RESIZED_MASK_SAMPLE]
    assert resized and (resized[0]["mask_h"], resized[0]["image_h"]) == (120, 60)


def test_pack_resumes_after_sigkill_and_equals_uninterrupted(packed_project, tmp_path):
    root = copy_project(packed_project, tmp_path, keep=("manifests", "prompt_sets", "sam_cache"))
    run_on(packed_project, root, "build_training_indices.py")
    killed = run_on(packed_project, root, "pack_to_hdf5.py", check=False,
                    env={"PIPELINE_TEST_KILL_AFTER_UNITS": "2"})
    assert killed.returncode == -signal.SIGKILL
    partial = root / "training_data" / "train.h5.partial"
    assert partial.is_file() and not (root / "training_data" / "train.h5").exists()
    with h5py.File(partial, "r") as handle:
        complete = handle["rows/complete"][:].astype(bool)
        samples_done = np.unique(handle["rows/sample"][:][complete])
    assert len(samples_done) == 2 and not complete.all()

    resumed = run_on(packed_project, root, "pack_to_hdf5.py")
    assert "resuming" in resumed.stdout and not partial.exists()
    total_samples = len(packing.PackPlan.from_index("train", (root / "training_data" / "train_index.csv").read_bytes(),
                                                    packing.PackSettings(20.0, 127, False)).safe_ids)
    assert f"train_done: {total_samples - 2}" in resumed.stdout
    for split in SPLITS:
        got, got_attrs = packed_arrays(root / "training_data" / f"{split}.h5")
        want, want_attrs = packed_arrays(packed_project["root"] / "training_data" / f"{split}.h5")
        assert got_attrs["fingerprint"] == want_attrs["fingerprint"]
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{split}: {name}")


def test_pack_rerun_skips_and_changed_clip_needs_force(packed_project, tmp_path):
    root = copy_project(packed_project, tmp_path)
    data = root / "training_data"
    before = {k: v for k, v in file_state(data).items() if k.name != "config.resolved.yaml"}
    rerun = run_on(packed_project, root, "pack_to_hdf5.py")
    assert rerun.stdout.count("is complete, skipped") == 3
    assert {k: v for k, v in file_state(data).items() if k.name != "config.resolved.yaml"} == before

    refused = run_on(packed_project, root, "pack_to_hdf5.py", "--set", "training.logit_clip=5", check=False)
    assert refused.returncode == 2 and "training.logit_clip" in refused.stderr and "--force" in refused.stderr
    assert {k: v for k, v in file_state(data).items() if k.name != "config.resolved.yaml"} == before

    run_on(packed_project, root, "pack_to_hdf5.py", "--set", "training.logit_clip=5",
           "--set", "head.use_image_embedding=true", "--force")
    cache = sam_cache.SamCache(root / "sam_cache")
    arrays, attrs = packed_arrays(data / "train.h5")
    assert attrs["logit_clip"] == 5.0 and np.abs(arrays["inputs"][:, 0]).max() == 5.0
    # One embedding per sample, equal to the cached one.
    safe_ids = [s.decode() for s in arrays["samples/safe_id"]]
    assert arrays["samples/embedding"].shape == (len(safe_ids), 8, 4, 4)
    for number, safe_id in enumerate(safe_ids):
        np.testing.assert_array_equal(arrays["samples/embedding"][number], cache.entry(safe_id).features["image_embed"])
    dataset = packed_reader.PackedSplitDataset(data / "train.h5", in_memory=False, with_embeddings=True)
    item = dataset[len(dataset) - 1]
    np.testing.assert_array_equal(item["image_embedding"].numpy(),
                                  cache.entry(item["safe_id"]).features["image_embed"].astype(np.float32))


def test_failed_sample_leaves_partial_then_only_it_is_packed(packed_project, tmp_path):
    root = copy_project(packed_project, tmp_path)
    for packed in (root / "training_data").glob("*.h5"):
        packed.unlink()
    index = training_index.load_index(root, "train")
    victim = index.iloc[len(index) - 1]
    mask = root.parent / "saved_mask.png"
    shutil.move(mask_file(packed_project, victim), mask)  # the fixture's data folder: restored right after
    try:
        failed = run_on(packed_project, root, "pack_to_hdf5.py", check=False)
    finally:
        shutil.move(mask, mask_file(packed_project, victim))
    assert failed.returncode == 2 and "not packed completely" in failed.stderr
    assert f"failed: {victim['safe_id']}" in failed.stdout and "train_status: incomplete" in failed.stdout
    assert (root / "training_data" / "train.h5.partial").is_file()
    resumed = run_on(packed_project, root, "pack_to_hdf5.py")
    assert "train_done: 1" in resumed.stdout and "train_status: packed" in resumed.stdout
    got, _ = packed_arrays(root / "training_data" / "train.h5")
    want, _ = packed_arrays(packed_project["root"] / "training_data" / "train.h5")
    np.testing.assert_array_equal(got["inputs"], want["inputs"])
    np.testing.assert_array_equal(got["targets"], want["targets"])


# --------------------------------------------------------------------------- the Dataset


def test_dataset_in_memory_and_from_disk_agree_and_work_with_workers(packed_project):
    path = packed_project["root"] / "training_data" / "train.h5"
    in_memory = packed_reader.PackedSplitDataset(path, in_memory=True)
    from_disk = packed_reader.PackedSplitDataset(path, in_memory="false")
    assert in_memory.in_memory and not from_disk.in_memory and len(in_memory) == len(from_disk) > 4
    arrays, _ = packed_arrays(path)
    for i in range(len(in_memory)):
        a, b = in_memory[i], from_disk[i]
        assert a.keys() == b.keys() == {"inputs", "target", "index", "safe_id", "promptset_id"}
        assert a["inputs"].dtype == torch.float32 and a["inputs"].shape == (3, 256, 256)
        assert a["target"].shape == (1, 256, 256)
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
        np.testing.assert_array_equal(a["inputs"].numpy(), arrays["inputs"][i].astype(np.float32))
        assert a["safe_id"] == from_disk.index["safe_id"][i] and a["index"] == i

    loader = DataLoader(from_disk, batch_size=3, shuffle=True, num_workers=2,
                        generator=torch.Generator().manual_seed(0))
    seen = {}
    for batch in loader:
        for position, row in enumerate(batch["index"].tolist()):
            seen[row] = batch["inputs"][position]
    assert sorted(seen) == list(range(len(from_disk)))
    for row, inputs in seen.items():
        assert torch.equal(inputs, in_memory[row]["inputs"])


@pytest.mark.parametrize("in_memory", [True, False])
def test_batch_at_once_loader_equals_item_wise_items(packed_project, in_memory):
    """``PackedBatches`` (what head / variance training use) gives the rows of the sampler's batches,
    stacked, in the stored dtypes; as float32 they equal the item-wise dataset's items."""
    path = packed_project["root"] / "training_data" / "train.h5"
    items = packed_reader.PackedSplitDataset(path, in_memory=True)
    batches = packed_reader.PackedBatches(packed_reader.PackedSplitDataset(path, in_memory=in_memory))
    loader = DataLoader(batches, batch_size=4, shuffle=True, num_workers=2, collate_fn=packed_reader.collate_batch,
                        generator=torch.Generator().manual_seed(0))
    item_loader = DataLoader(items, batch_size=4, shuffle=True, num_workers=0,
                             generator=torch.Generator().manual_seed(0))
    seen = []
    for batch, item_batch in zip(loader, item_loader, strict=True):
        assert batch["inputs"].dtype == torch.float16 and batch["target"].dtype == torch.uint8
        assert batch["inputs"].shape == (len(batch["index"]), 3, 256, 256)
        assert batch["target"].shape == (len(batch["index"]), 1, 256, 256)
        assert torch.equal(batch["index"], item_batch["index"])  # same sampler order
        as_float = packed_reader.as_float32(batch)
        assert torch.equal(as_float["inputs"], item_batch["inputs"])
        assert torch.equal(as_float["target"], item_batch["target"])
        assert batch["safe_id"] == list(item_batch["safe_id"])
        assert torch.equal(batch["promptset_id"], item_batch["promptset_id"])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(len(items)))


def test_in_memory_policy_and_refused_files(packed_project, tmp_path):
    assert packed_reader.resolve_in_memory("auto", 1024) is True
    assert packed_reader.resolve_in_memory("auto", 1 << 62) is False
    assert packed_reader.resolve_in_memory(True, 1 << 62) is True and packed_reader.resolve_in_memory("false", 1) is False
    with pytest.raises(training_index.PackingError, match="training.in_memory"):
        packed_reader.resolve_in_memory("sometimes", 1)
    with pytest.raises(training_index.PackingError, match="run pack_to_hdf5.py"):
        packed_reader.PackedSplitDataset(tmp_path / "train.h5")
    with pytest.raises(training_index.PackingError, match="without image embeddings"):
        packed_reader.PackedSplitDataset(packed_project["root"] / "training_data" / "val.h5", with_embeddings=True)
    partial = tmp_path / "val.h5"
    shutil.copy(packed_project["root"] / "training_data" / "val.h5", partial)
    with h5py.File(partial, "r+") as handle:
        handle["rows/complete"][0] = 0
    with pytest.raises(training_index.PackingError, match="not every row is packed"):
        packed_reader.PackedSplitDataset(partial)
