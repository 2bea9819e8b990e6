"""Stage 3 end to end on a tiny project: shapes, decoder consistency, SIGKILL + resume,
truncated shard repair, invalidation by prompt-set md5 and checkpoint, two-shard equivalence."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from modules.cache import sam_cache
from modules.cache.entries import EntryRequest, decoded_entries, decoded_entry, record_prompts
from modules.sam.registry import load_backbone, registered_backbones
from modules.core.config import load_config
from modules.cache.cache_writers import KILL_AFTER_IMAGES_ENV
from modules.stages.precompute_sam_outputs import run_precompute
from modules.core.paths import promptset_path
from modules.data.promptset import load_promptsets, promptset_tensors
from modules.cache.sam_cache import SamCache
from modules.core.stage import Shard
from modules.sam.prompting import Prompts
from tests.helpers.precompute_fixtures import make_project, save_random_checkpoint
from tests.stage_runner import REPO, run_stage

SCRIPT = "precompute_sam_outputs.py"


def sam_overrides(family, model_type, checkpoint):
    return ["--set", f"sam.family={family}", "--set", f"sam.model_type={model_type}",
            "--set", f"sam.checkpoint={checkpoint}"]


def all_arrays(project_root):
    cache = SamCache(project_root)
    result = {}
    for safe_id in cache.sample_ids():
        entry = cache.entry(safe_id, verify=True)
        result[safe_id] = {**{f"f/{k}": v for k, v in entry.features.items()}, "logits": entry.logits,
                           "ids": entry.promptset_ids, "branch": entry.branch_index, "iou": entry.iou_predictions,
                           "hw": np.array(entry.original_hw + entry.input_hw)}
    return result


def assert_caches_equal(a, b):
    assert sorted(a) == sorted(b) and a
    for safe_id in a:
        for name in a[safe_id]:
            np.testing.assert_array_equal(a[safe_id][name], b[safe_id][name], err_msg=f"{safe_id} {name}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny project (4 images, demo_tiny random weights) and its uninterrupted cache."""
    folder = tmp_path_factory.mktemp("stage3")
    checkpoint = save_random_checkpoint("sam", "demo_tiny", folder / "demo_tiny.pt", seed=1)
    config = make_project(folder / "base", per_group=2,
                          overrides={"prompt_generation": {"num_promptsets_train": 3, "num_promptsets_val": 2,
                                                           "num_promptsets_test": 2}})
    pristine = folder / "pristine"  # stages 1-2 only, copied for each scenario
    shutil.copytree(folder / "base" / "project", pristine)
    run_stage(SCRIPT, config, *sam_overrides("sam", "demo_tiny", checkpoint))
    reference = all_arrays(folder / "base" / "project")
    return {"folder": folder, "config": config, "checkpoint": checkpoint, "pristine": pristine,
            "reference": reference}


def fresh_project(demo, name):
    """A copy of the stage-1/2 outputs with its own config; returns (config, project_root)."""
    root = demo["folder"] / name
    shutil.copytree(demo["pristine"], root / "project")
    text = demo["config"].read_text().replace(str(demo["folder"] / "base" / "project"), str(root / "project"))
    config = root / "config.yaml"
    config.write_text(text)
    return config, root / "project"


def test_shapes_dtypes_and_decoder_consistency(demo):
    cache = SamCache(demo["folder"] / "base" / "project")
    assert len(cache) == 4
    backbone = load_backbone("sam", "demo_tiny", demo["checkpoint"], "cpu")
    cfg = load_config(demo["config"])
    for safe_id in cache.sample_ids():
        entry = cache.entry(safe_id)
        assert entry.features["image_embed"].shape == (256, 64, 64)
        assert entry.features["image_embed"].dtype == np.float16
        count = entry.logits.shape[0]
        assert entry.logits.shape == (count, 256, 256) and entry.logits.dtype == np.float16
        assert entry.iou_predictions.shape == (count, 3) and entry.branch_index.shape == (count,)
        np.testing.assert_array_equal(entry.branch_index, entry.iou_predictions.argmax(1))
        split = cache._split[safe_id]
        assert count == getattr(cfg.prompt_generation, f"num_promptsets_{split}")
        assert entry.input_hw == tuple(backbone.input_size(entry.original_hw))
        record = json.loads(promptset_path(demo["folder"] / "base" / "project", split, safe_id).read_text())
        points, labels, _, _ = promptset_tensors(record)
        logits, iou = backbone.decode(entry.features, entry.original_hw, points, labels, None, None, True)
        chosen = logits[torch.arange(count), torch.as_tensor(entry.branch_index, dtype=torch.long)]
        np.testing.assert_allclose(chosen.numpy(), entry.logits.astype(np.float32), atol=2e-2, rtol=1e-2)
        np.testing.assert_allclose(iou.numpy(), entry.iou_predictions, atol=1e-4)
        # A prompt set decoded ALONE gives its cached logits too: padding is canonical, so no
        # prompt set's output depends on which other prompt sets shared the batched call.
        for index in range(count):
            alone, _ = backbone.decode(entry.features, entry.original_hw, points[index:index + 1],
                                       labels[index:index + 1], None, None, True)
            np.testing.assert_allclose(alone[0, int(entry.branch_index[index])].numpy(),
                                       entry.logits[index].astype(np.float32), atol=2e-2, rtol=1e-2)


def test_rerun_skips_everything(demo):
    result = run_stage(SCRIPT, demo["config"], *sam_overrides("sam", "demo_tiny", demo["checkpoint"]))
    assert "skipped: 4" in result.stdout and "done: 0" in result.stdout


def test_sigkill_hook_then_resume_equals_uninterrupted(demo):
    config, root = fresh_project(demo, "killed")
    args = sam_overrides("sam", "demo_tiny", demo["checkpoint"])
    killed = run_stage(SCRIPT, config, *args, env={KILL_AFTER_IMAGES_ENV: "2"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert len(SamCache(root)) < 4  # the batch being written when killed has no flags
    resumed = run_stage(SCRIPT, config, *args)
    assert "done: 0" not in resumed.stdout
    assert_caches_equal(all_arrays(root), demo["reference"])


def test_sigkill_at_random_moment_then_resume(demo):
    config, root = fresh_project(demo, "random_kill")
    args = sam_overrides("sam", "demo_tiny", demo["checkpoint"])
    process = subprocess.Popen([sys.executable, str(REPO / SCRIPT), "--config", str(config), *args],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(7).uniform(4.0, 9.0))
    process.kill()
    process.wait()
    run_stage(SCRIPT, config, *args)
    assert_caches_equal(all_arrays(root), demo["reference"])


def test_truncated_shard_repaired_and_promptset_change_recomputed(demo, caplog):
    config, root = fresh_project(demo, "repair")
    shutil.copytree(demo["folder"] / "base" / "project" / "sam_cache", root / "sam_cache")
    (shard_file,) = sam_cache.shard_files(next((root / "sam_cache").iterdir()))
    os.truncate(shard_file, shard_file.stat().st_size - 200_000)  # cuts into the last entry's logits
    cfg = load_config(config, ["sam.device=cpu", f"sam.checkpoint={demo['checkpoint']}"])
    backbone = load_backbone("sam", "demo_tiny", demo["checkpoint"], "cpu")
    caplog.set_level(logging.INFO, logger="pipeline.precompute")  # run_precompute logs its messages
    result = run_precompute(cfg, backbone, Shard())
    assert "truncated or corrupt" in caplog.text
    assert 1 <= result.counts.done < 4 and result.counts.done + result.counts.skipped == 4
    assert_caches_equal(all_arrays(root), demo["reference"])

    # A changed prompt-set file invalidates exactly that entry.
    cache = SamCache(root)
    safe_id = cache.sample_ids()[0]
    path = promptset_path(root, cache._split[safe_id], safe_id)
    record = json.loads(path.read_text())
    record["promptsets"] = record["promptsets"][:1]
    path.write_text(json.dumps(record))
    result = run_precompute(cfg, backbone, Shard())
    assert (result.counts.done, result.counts.skipped) == (1, 3)
    after = all_arrays(root)
    assert after[safe_id]["logits"].shape[0] == 1
    assert_caches_equal({k: v for k, v in after.items() if k != safe_id},
                        {k: v for k, v in demo["reference"].items() if k != safe_id})
    entry = SamCache(root).entry(safe_id)
    assert entry.promptset_md5 != demo_md5(demo, cache._split[safe_id], safe_id)
    points, labels, _, _ = promptset_tensors(record)
    logits, _ = backbone.decode(entry.features, entry.original_hw, points, labels, None, None, True)
    np.testing.assert_allclose(logits[0, int(entry.branch_index[0])].numpy(), entry.logits[0].astype(np.float32),
                               atol=2e-2, rtol=1e-2)


def demo_md5(demo, split, safe_id):
    from modules.core.fileio import file_md5

    return file_md5(promptset_path(demo["folder"] / "base" / "project", split, safe_id))


def test_changed_checkpoint_gets_own_folder(demo, tmp_path):
    config, root = fresh_project(demo, "other_checkpoint")
    shutil.copytree(demo["folder"] / "base" / "project" / "sam_cache", root / "sam_cache")
    other = save_random_checkpoint("sam", "demo_tiny", tmp_path / "other.pt", seed=2)
    cfg = load_config(config, ["sam.device=cpu", f"sam.checkpoint={other}"])
    backbone = load_backbone("sam", "demo_tiny", other, "cpu")
    result = run_precompute(cfg, backbone, Shard())
    assert result.counts.done == 4
    folders = sorted(p.name for p in (root / "sam_cache").iterdir() if p.is_dir())
    assert len(folders) == 2 and all(f.startswith("sam-demo_tiny-") for f in folders)
    new = SamCache(root, backbone=result.shard_path.parent.name)
    old = SamCache(root, backbone=next(f for f in folders if f != result.shard_path.parent.name))
    safe_id = new.sample_ids()[0]
    assert not np.array_equal(new.entry(safe_id).logits, old.entry(safe_id).logits)
    assert_caches_equal(all_arrays(old.folder), demo["reference"])


def test_int8_encoder_weights_are_a_changed_input_and_give_a_close_cache(demo):
    """``sam.encoder_int8`` changes the features: a cache made without it stops a rerun with it (and
    the other way round) until ``--force``; the int8 cache stays close to the float one."""
    config, root = fresh_project(demo, "int8")
    shutil.copytree(demo["folder"] / "base" / "project" / "sam_cache", root / "sam_cache")
    model = sam_overrides("sam", "demo_tiny", demo["checkpoint"])
    int8 = ["--set", "sam.encoder_int8=true"]
    refused = run_stage(SCRIPT, config, *model, *int8, check=False)
    assert refused.returncode != 0 and "inputs changed" in refused.stderr and "sam.encoder_int8" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert_caches_equal(all_arrays(root), demo["reference"])  # nothing computed is lost
    result = run_stage(SCRIPT, config, *model, *int8, "--force")
    assert "done: 4" in result.stdout
    quantized = all_arrays(root)
    differ = 0
    for safe_id, arrays in demo["reference"].items():
        for name, reference in arrays.items():
            if name.startswith("f/"):
                scale = float(np.abs(reference).max())
                difference = float(np.abs(quantized[safe_id][name].astype(np.float32) - reference).max())
                assert difference < 0.05 * scale, f"{safe_id} {name}"
                differ += difference > 0
    assert differ  # the int8 weights were used
    back = run_stage(SCRIPT, config, *model, check=False)  # the int8 cache now stops a float run
    assert back.returncode != 0 and "sam.encoder_int8" in back.stderr


def test_bad_inputs_fail_units_not_the_others(demo):
    """A failed unit is reported (exit code 2, one line) after every other unit was cached."""
    config, root = fresh_project(demo, "bad_inputs")
    from modules.data.manifest import load_split_manifest

    train = load_split_manifest(root, "train")
    promptset_path(root, "train", train["safe_id"].iloc[0]).unlink()
    result = run_stage(SCRIPT, config, *sam_overrides("sam", "demo_tiny", demo["checkpoint"]), check=False)
    assert result.returncode == 2, result.stderr
    assert "failed: 1" in result.stdout and "missing or unreadable prompt-set file" in result.stderr
    assert len(SamCache(root)) == 3


def test_two_shards_as_two_processes_equal_one_process(demo):
    config, root = fresh_project(demo, "sharded")
    args = sam_overrides("sam", "demo_tiny", demo["checkpoint"])
    processes = [subprocess.Popen([sys.executable, str(REPO / SCRIPT), "--config", str(config), *args,
                                   "--num-shards", "2", "--shard-index", str(i)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output
    folder = next((root / "sam_cache").iterdir())
    assert [p.name for p in sam_cache.shard_files(folder)] == ["shard-000-of-002.h5", "shard-001-of-002.h5"]
    assert_caches_equal(all_arrays(root), demo["reference"])


def test_loader_workers_and_batch_size_leave_the_cache_unchanged(demo):
    """Two DataLoader worker processes (uint8 pixels and prompt arrays cross their queue) and an
    encoder batch of 3 (a batch mixing images, then a short last batch) write the same cache."""
    config, root = fresh_project(demo, "workers")
    run_stage(SCRIPT, config, *sam_overrides("sam", "demo_tiny", demo["checkpoint"]),
              "--set", "sam.num_workers=2", "--set", "sam.encoder_batch_size=3")
    assert_caches_equal(all_arrays(root), demo["reference"])


def test_the_writer_thread_writes_the_cache_the_writer_process_writes(demo):
    """``sam.cache_writer: thread`` against the default (the reference cache: the writer process, its
    batches decoded into shared memory), here with encoder batches of 3 and a short last batch."""
    config, root = fresh_project(demo, "thread_writer")
    run_stage(SCRIPT, config, *sam_overrides("sam", "demo_tiny", demo["checkpoint"]),
              "--set", "sam.cache_writer=thread", "--set", "sam.encoder_batch_size=3")
    assert_caches_equal(all_arrays(root), demo["reference"])


def test_a_batch_decoded_and_copied_at_once_equals_each_image_on_its_own(demo):
    """``decoded_entries`` (stage 3: a batch's outputs copied to the host in one copy per kind) gives
    every image the entry ``decoded_entry`` gives it alone, byte for byte, with prompt-set counts that
    differ between the images (3, 2, 1), so the batch's rows are split at the right places."""
    cache = SamCache(demo["folder"] / "base" / "project")
    safe_ids = sorted(cache.sample_ids())[:3]
    backbone = load_backbone("sam", "demo_tiny", demo["checkpoint"], "cpu")
    cached = [cache.entry(safe_id, verify=True) for safe_id in safe_ids]
    features = {name: torch.stack([torch.from_numpy(entry.features[name]) for entry in cached])
                for name in cached[0].features}
    requests = []
    for index, (safe_id, entry) in enumerate(zip(safe_ids, cached)):
        split = cache._split[safe_id]
        prompts, ids = record_prompts(load_promptsets(demo["folder"] / "base" / "project", split, safe_id))
        keep = len(ids) - index  # 3, 2, 1 prompt sets
        prompts = Prompts(prompts.point_coords[:keep], prompts.point_labels[:keep], prompts.boxes[:keep])
        requests.append(EntryRequest(entry.original_hw, entry.input_hw, prompts, ids[:keep], safe_id, split))
    assert [len(request.promptset_ids) for request in requests] == [3, 2, 1]

    together = decoded_entries(backbone, features, requests, "points_and_box", "best_iou")

    for index, (request, entry) in enumerate(zip(requests, together)):
        alone = decoded_entry(backbone, {name: value[index:index + 1] for name, value in features.items()},
                              request.original_hw, request.input_hw, request.prompts, request.promptset_ids,
                              "points_and_box", "best_iou", request.safe_id, request.split)
        for field in ("logits", "promptset_ids", "branch_index", "iou_predictions"):
            np.testing.assert_array_equal(getattr(entry, field), getattr(alone, field), err_msg=field)
            assert getattr(entry, field).dtype == getattr(alone, field).dtype
        for name, value in alone.features.items():
            np.testing.assert_array_equal(entry.features[name], value)
            np.testing.assert_array_equal(entry.features[name], cached[index].features[name])
        assert (entry.safe_id, entry.split, entry.original_hw, entry.input_hw) == \
            (alone.safe_id, alone.split, alone.original_hw, alone.input_hw)
        assert entry.logits.shape == (len(request.promptset_ids), 256, 256)


@pytest.mark.skipif(("sam2", "hiera_t") not in registered_backbones(), reason="SAM 2 backbone not registered yet")
def test_sam2_hiera_t_features_and_decoder_consistency(tmp_path):
    checkpoint = save_random_checkpoint("sam2", "hiera_t", tmp_path / "hiera_t.pt", seed=0)
    config = make_project(tmp_path, per_group=1, overrides={"prompt_generation": {"num_promptsets_train": 2}})
    cfg = load_config(config, ["sam.family=sam2", "sam.model_type=hiera_t", f"sam.checkpoint={checkpoint}",
                               "sam.multimask_policy=single", "sam.prompt_mode=points_and_box"])
    backbone = load_backbone("sam2", "hiera_t", checkpoint, "cpu")
    result = run_precompute(cfg, backbone, Shard())
    assert result.counts.done == 2
    cache = SamCache(cfg.project_root)
    shapes = {"image_embed": (256, 64, 64), "high_res_feat0": (32, 256, 256), "high_res_feat1": (64, 128, 128)}
    for safe_id in cache.sample_ids():
        entry = cache.entry(safe_id, verify=True)
        assert {k: v.shape for k, v in entry.features.items()} == shapes
        assert all(v.dtype == np.float16 for v in entry.features.values())
        assert entry.iou_predictions.shape[1] == 1 and not entry.branch_index.any()
        record = json.loads(promptset_path(cfg.project_root, cache._split[safe_id], safe_id).read_text())
        points, labels, _, boxes = promptset_tensors(record)
        logits, _ = backbone.decode(entry.features, entry.original_hw, points, labels, boxes, None, False)
        np.testing.assert_allclose(logits[:, 0].numpy(), entry.logits.astype(np.float32), atol=2e-2, rtol=1e-2)


def _load_bench_precompute():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_precompute", REPO / "benchmarks" / "bench_precompute.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_precompute_benchmark_runs_and_checks_the_cache_it_timed():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_precompute.py"), "--images", "2", "--promptsets", "2",
         "--workers", "0", "--batch-size", "2", "--height", "96", "--width", "128",
         "--encoder-impl", "reference,fast+int8", "--batch-sweep", "1,2"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ("(a) encoder only", "(b) this stage", "(c) naive loop", "verify (2 images)", "b/a", "b/c", "cache:",
                 "fast, int8 weights", "cached logits, fast+int8 vs reference", "encoder batch   2:",
                 "encoder batch sweep (fast+int8): best"):
        assert line in result.stdout, result.stdout
    misordered = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_precompute.py"), "--encoder-impl", "fast+int8,reference"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert misordered.returncode == 2 and "the +int8 paths go last" in misordered.stderr


def test_benchmark_cache_check_fails_for_a_cache_made_with_other_weights(tmp_path):
    import argparse

    from modules.sam.registry import build_sam_model
    from modules.data.sample_files import split_samples

    bench = _load_bench_precompute()
    args = argparse.Namespace(images=2, promptsets=2, height=96, width=128, family="sam", model_type="demo_tiny",
                              device="cpu", batch_size=2, workers=0, cache_writer="process")
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        checkpoints.append(tmp_path / f"weights{seed}.pt")
        torch.save(build_sam_model("sam", "demo_tiny").state_dict(), checkpoints[-1])
    cfg = load_config(bench.make_project(tmp_path, args, checkpoints[0]))
    maker = load_backbone("sam", "demo_tiny", checkpoints[0], "cpu")
    run_precompute(cfg, maker, Shard())
    rows = split_samples(cfg, "train").to_dict("records")

    assert "max |logit - decode(cached embedding)| = 0.0" in bench.verify_cache(maker, cfg, rows, 2)
    other = load_backbone("sam", "demo_tiny", checkpoints[1], "cpu")
    with pytest.raises(SystemExit, match="does not match synchronous passes"):
        bench.verify_cache(other, cfg, rows, 2)
