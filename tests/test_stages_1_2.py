"""Stages 1 and 2 end to end on real files: validation reasons, split stability, determinism,
resumability after SIGKILL, W&B runs, and the demo data set."""

import hashlib
import json
import signal

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.stage_runner import run_stage, write_config
from tests.wandb_records import offline_runs, read_offline_run


def disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r**2


def save_image(path, array, mode=None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path, **kwargs) if mode else Image.fromarray(array).save(path, **kwargs)


def make_dataset(root, groups=("cats", "dogs"), per_group=6, offset=0):
    """Valid pairs in several formats, seed layout: images/<group>/<stem>, masks/<group>/<stem>."""
    rng = np.random.default_rng(offset)
    images, masks = root / "images", root / "masks"
    for g, group in enumerate(groups):
        for i in range(offset, offset + per_group):
            h, w = 48 + 4 * i, 64
            stem = f"s{i:02d}"
            image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            mask = disc(h, w, h // 2, w // 2, 10 + i % 5)
            kind = (i + g) % 4
            if kind == 0:
                save_image(images / group / f"{stem}.png", image)
                save_image(masks / group / f"{stem}.png", mask.astype(np.uint8) * 255)
            elif kind == 1:  # grayscale image, RGB JPEG mask with compression noise
                save_image(images / group / f"{stem}.jpg", image[..., 0], quality=90)
                rgb = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)
                save_image(masks / group / f"{stem}.jpg", rgb, quality=60)
            elif kind == 2:  # RGBA image, npy mask
                rgba = np.concatenate([image, np.full((h, w, 1), 255, np.uint8)], axis=2)
                save_image(images / group / f"{stem}.png", rgba)
                (masks / group).mkdir(parents=True, exist_ok=True)
                np.save(masks / group / f"{stem}.npy", mask)
            else:  # 0/1 PNG mask
                save_image(images / group / f"{stem}.bmp", image)
                save_image(masks / group / f"{stem}.png", mask.astype(np.uint8))
    return images, masks


def add_invalid_samples(images, masks):
    image = np.full((40, 40, 3), 90, np.uint8)
    mask = disc(40, 40, 20, 20, 8).astype(np.uint8) * 255
    save_image(images / "cats" / "truncated.jpg", image, quality=90)
    data = (images / "cats" / "truncated.jpg").read_bytes()
    (images / "cats" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    save_image(masks / "cats" / "truncated.png", mask)
    save_image(images / "cats" / "nomask.png", image)
    save_image(masks / "cats" / "noimage.png", mask)
    save_image(images / "cats" / "empty.png", image)
    save_image(masks / "cats" / "empty.png", np.zeros((40, 40), np.uint8))
    save_image(images / "cats" / "full.png", image)
    save_image(masks / "cats" / "full.png", np.full((40, 40), 255, np.uint8))
    save_image(images / "cats" / "cube.png", image)
    np.save(masks / "cats" / "cube.npy", np.ones((2, 40, 40), bool))
    save_image(images / "cats" / "tiny.png", np.zeros((8, 8, 3), np.uint8))
    save_image(masks / "cats" / "tiny.png", np.pad(np.full((4, 4), 255, np.uint8), 2))
    save_image(images / "cats" / "resized.png", np.zeros((80, 80, 3), np.uint8))
    save_image(masks / "cats" / "resized.png", mask)  # 40x40 mask for an 80x80 image: valid, recorded


def file_state(folder):
    return {p.relative_to(folder): (p.stat().st_mtime_ns, hashlib.md5(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path):
    images, masks = make_dataset(tmp_path / "data")
    add_invalid_samples(images, masks)
    return tmp_path, write_config(tmp_path, images, masks)


def test_manifests_record_every_invalid_reason_and_split_stratified(project):
    tmp_path, config = project
    run_stage("build_manifests.py", config)
    manifests = tmp_path / "project" / "manifests"
    valid = pd.read_csv(manifests / "all_samples.csv", keep_default_na=False)
    invalid = pd.read_csv(manifests / "invalid_samples.csv", keep_default_na=False)
    reasons = dict(zip(invalid["sample_id"], invalid["reason"]))
    assert reasons == {
        "cats/truncated": "unreadable_image", "cats/nomask": "missing_mask", "cats/noimage": "missing_image",
        "cats/empty": "empty_mask", "cats/full": "full_mask", "cats/cube": "mask_not_2d",
        "cats/tiny": "image_too_small",
    }
    assert len(valid) == 13
    resized = valid.set_index("sample_id").loc["cats/resized"]
    assert bool(resized["size_mismatch"]) and resized["mask_h"] == 40 and resized["image_h"] == 80
    for split in ("train", "val", "test"):
        part = pd.read_csv(manifests / f"{split}.csv", keep_default_na=False)
        assert set(part["group"]) == {"cats", "dogs"}
        assert (part["split"] == split).all()
    assert (tmp_path / "project" / "manifests" / "config.resolved.yaml").is_file()


def test_rerun_rewrites_nothing_and_new_files_never_move_old_samples(project):
    tmp_path, config = project
    run_stage("build_manifests.py", config)
    run_stage("generate_promptsets.py", config)
    project_dir = tmp_path / "project"
    before = file_state(project_dir / "manifests") | file_state(project_dir / "prompt_sets")
    rescan = run_stage("build_manifests.py", config)
    second = run_stage("generate_promptsets.py", config)
    n_train = len(pd.read_csv(project_dir / "manifests" / "train.csv"))
    n_valid = len(pd.read_csv(project_dir / "manifests" / "all_samples.csv"))
    assert f"reused_validations: {n_valid}" in rescan.stdout  # only the invalid pairs were validated again
    assert "train_done: 0" in second.stdout and f"train_skipped: {n_train}" in second.stdout
    assert file_state(project_dir / "manifests") | file_state(project_dir / "prompt_sets") == before

    old = pd.read_csv(project_dir / "manifests" / "all_samples.csv", keep_default_na=False)
    make_dataset(tmp_path / "data", groups=("cats", "dogs", "birds"), per_group=4, offset=20)
    # An image edited in place (same size and mask): only its prompt-set file changes, in its
    # recorded source, so stage 3 (which knows the sample by that file's md5) encodes it again.
    edited = tmp_path / "data" / "images" / "cats" / "s00.png"
    save_image(edited, 255 - np.asarray(Image.open(edited)))
    prompt_sets = {p.name: p.read_text() for p in (project_dir / "prompt_sets").rglob("*.json")}
    run_stage("build_manifests.py", config)
    new = pd.read_csv(project_dir / "manifests" / "all_samples.csv", keep_default_na=False)
    merged = old.merge(new, on="sample_id", suffixes=("_old", "_new"))
    assert len(merged) == len(old)
    assert (merged["split_old"] == merged["split_new"]).all()
    assert (merged["safe_id_old"] == merged["safe_id_new"]).all()
    assert len(new) == len(old) + 12 and "birds" in set(new["group"])
    third = run_stage("generate_promptsets.py", config)
    assert "failed: 0" in third.stdout.replace("train_failed", "failed")
    rewritten = {p.name: p.read_text() for p in (project_dir / "prompt_sets").rglob("*.json") if p.name in prompt_sets}
    assert [name for name in prompt_sets if rewritten[name] != prompt_sets[name]] == ["cats__s00.json"]
    before_edit, after_edit = json.loads(prompt_sets["cats__s00.json"]), json.loads(rewritten["cats__s00.json"])
    assert before_edit["source"]["image_md5"] != after_edit["source"]["image_md5"]
    assert before_edit["source"]["mask_md5"] == after_edit["source"]["mask_md5"]
    assert before_edit["promptsets"] == after_edit["promptsets"]


def test_prompt_sets_are_identical_across_runs_and_file_orders(tmp_path):
    images, masks = make_dataset(tmp_path / "a" / "data")
    config_a = write_config(tmp_path / "a", images, masks)
    run_stage("build_manifests.py", config_a)
    run_stage("generate_promptsets.py", config_a)
    # Same files created in a different order (reverse groups), separate project.
    import shutil

    for folder in ("images", "masks"):
        for group in ("dogs", "cats"):
            shutil.copytree(tmp_path / "a" / "data" / folder / group, tmp_path / "b" / "data" / folder / group)
    config_b = write_config(tmp_path / "b", tmp_path / "b" / "data" / "images", tmp_path / "b" / "data" / "masks")
    run_stage("build_manifests.py", config_b)
    run_stage("generate_promptsets.py", config_b)

    import json

    def promptsets(root):
        return {p.name: json.loads(p.read_text())["promptsets"] for p in (root / "project" / "prompt_sets").glob("*/*.json")}

    a, b = promptsets(tmp_path / "a"), promptsets(tmp_path / "b")
    assert a == b and len(a) == 12
    # --force regenerates the same bytes.
    before = file_state(tmp_path / "a" / "project" / "prompt_sets")
    forced = run_stage("generate_promptsets.py", config_a, "--force")
    assert "train_skipped: 0" in forced.stdout
    after = file_state(tmp_path / "a" / "project" / "prompt_sets")
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in before.items()}


def test_interrupted_promptset_run_completes_with_the_same_result(project):
    tmp_path, config = project
    run_stage("build_manifests.py", config)
    run_stage("generate_promptsets.py", config)
    reference = {k: v[1] for k, v in file_state(tmp_path / "project" / "prompt_sets").items() if k.suffix == ".json"}
    import shutil

    shutil.rmtree(tmp_path / "project" / "prompt_sets")
    killed = run_stage("generate_promptsets.py", config, env={"PIPELINE_TEST_KILL_AFTER_UNITS": "4"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    partial = list((tmp_path / "project" / "prompt_sets").rglob("*.json"))
    assert 0 < len(partial) < len(reference)
    run_stage("generate_promptsets.py", config)
    result = {k: v[1] for k, v in file_state(tmp_path / "project" / "prompt_sets").items() if k.suffix == ".json"}
    assert result == reference
    assert not list((tmp_path / "project" / "prompt_sets").rglob("*.tmp"))


def test_changed_prompt_config_is_refused_until_forced(project):
    tmp_path, config = project
    run_stage("build_manifests.py", config)
    run_stage("generate_promptsets.py", config)
    refused = run_stage("generate_promptsets.py", config, "--set", "prompt_generation.prompt_seed=5", check=False)
    assert refused.returncode == 2
    assert "prompt_generation.prompt_seed" in refused.stderr and "--force" in refused.stderr
    run_stage("generate_promptsets.py", config, "--set", "prompt_generation.prompt_seed=5", "--force")


def test_wandb_offline_run_per_stage_with_counts(tmp_path):
    images, masks = make_dataset(tmp_path / "data")
    add_invalid_samples(images, masks)
    config = write_config(tmp_path, images, masks, {"wandb": {"enabled": True, "mode": "offline", "group": "t"}})
    run_stage("build_manifests.py", config)
    run_stage("generate_promptsets.py", config)
    runs = [read_offline_run(d) for d in offline_runs(tmp_path / "project")]
    by_stage = {r["job_type"]: r for r in runs}
    assert set(by_stage) == {"build_manifests", "generate_promptsets"}
    assert all(r["group"] == "t" for r in runs)
    logged = {k: v for h in by_stage["build_manifests"]["history"] for k, v in h.items()}
    assert logged["valid"] == 13 and logged["invalid"] == 7
    tables = {key.split("/")[0] for key in logged if key.endswith("/_type") and logged[key] == "table-file"}
    assert {"per_group", "invalid_samples"} <= tables
    prompt_logged = {k: v for h in by_stage["generate_promptsets"]["history"] for k, v in h.items()}
    assert prompt_logged["train/done"] + prompt_logged["val/done"] + prompt_logged["test/done"] == 13
