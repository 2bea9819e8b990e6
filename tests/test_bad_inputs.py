"""Bad inputs across the stages: each is one line ``error: ...`` (exit code 2) naming the file or key,
or a row of the invalid-samples table; none leaves a traceback, changes an earlier result or writes
outside the project root.

Most cases call a stage script's ``main()`` in this process (``sys.argv`` patched, ``SystemExit``
caught): an exception escaping ``main`` is exactly the traceback a user would see. ``SUBPROCESS_CASES``
run a few of them as real processes, to check the exit code and stderr a user gets.

Projects (module fixtures, built once): ``staged`` is the demo (3 scenes per group) through stages 1-2;
``packed`` is that project cut to one sample per split and run through stages 3-4.5. A case works on
a copy of its project (``Workspace``), whose files are hashed before and after. The machinery
(calling stages, copying and hashing projects) is in ``tests/helpers/stage_calls.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from modules.cache.sam_cache import SamCache
from modules.core.config import load_config
from modules.data.manifest_checksums import record_manifest_checksums
from modules.data.sample_files import DataRoots
from tests.conftest import DEMO_CHECKPOINT, small_demo_config
from tests.helpers.stage_calls import (SMALL, Outcome, Workspace, assert_one_error_line, build_staged, call_stage,
                                       copy_workspace, file_hashes, keep_first_rows, run_subprocess)

@pytest.fixture(scope="module")
def projects(tmp_path_factory) -> dict[str, Workspace]:
    if not DEMO_CHECKPOINT.is_file():
        pytest.skip(f"{DEMO_CHECKPOINT} is missing (tools/train_demo_backbone.py makes it)")
    base = tmp_path_factory.mktemp("bad_inputs")
    staged = build_staged(base / "staged")
    packed = copy_workspace(staged, base / "packed")
    keep_first_rows(packed, 1, 1, 1)
    for stage in ("precompute_sam_outputs", "build_training_indices", "pack_to_hdf5"):
        outcome = call_stage(stage, "--config", str(packed.config))
        assert outcome.code == 0, outcome.stderr[-3000:]
    return {"staged": staged, "packed": packed}


# --------------------------------------------------------------------------- one-line error cases


@dataclass(frozen=True)
class ErrorCase:
    """A bad input given to ``script`` on a copy of ``project`` (``None``: an empty folder with a
    config only). ``prepare(workspace)`` makes the input bad and returns the command line (the
    config is added unless the returned list names ``--config``); the one error line must hold
    every text of ``expect``."""

    id: str
    script: str
    project: str | None
    prepare: Callable[[Workspace], list[str]]
    expect: tuple[str, ...]


def overrides(*items: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: [arg for item in items for arg in ("--set", item)]


def args(*items: str) -> Callable[[Workspace], list[str]]:
    return lambda ws: list(items)


def edit_config(edit: Callable[[dict], None]) -> Callable[[Workspace], list[str]]:
    def prepare(ws: Workspace) -> list[str]:
        config = yaml.safe_load(ws.config.read_text())
        edit(config)
        ws.config.write_text(yaml.safe_dump(config))
        return []

    return prepare


def write_config_text(text: bytes | str) -> Callable[[Workspace], list[str]]:
    def prepare(ws: Workspace) -> list[str]:
        ws.config.write_bytes(text if isinstance(text, bytes) else text.encode())
        return []

    return prepare


def checkpoint_file(make: Callable[[Path], None]) -> Callable[[Workspace], list[str]]:
    def prepare(ws: Workspace) -> list[str]:
        path = ws.folder / "checkpoint.pt"
        make(path)
        return ["--set", f"sam.checkpoint={path}"]

    return prepare


def truncated_copy_of_demo_checkpoint(path: Path) -> None:
    path.write_bytes(DEMO_CHECKPOINT.read_bytes()[: DEMO_CHECKPOINT.stat().st_size // 2])


def edit_promptset(edit: Callable[[dict], dict | str], others: int = 0) -> Callable[[Workspace], list[str]]:
    """Keep the first train sample and ``others`` validation samples (stage 3 has that many images
    to encode) and replace the train sample's prompt-set JSON by ``edit(record)`` (a dict is dumped)."""

    def prepare(ws: Workspace) -> list[str]:
        keep_first_rows(ws, 1, others, 0)
        path = ws.first_promptset()
        edited = edit(json.loads(path.read_text()))
        path.write_text(edited if isinstance(edited, str) else json.dumps(edited))
        return []

    return prepare


def truncate_text(record: dict) -> str:
    text = json.dumps(record)
    return text[: len(text) // 2]


def replace_text(ws: Workspace, relative: str, text: str) -> list[str]:
    """Overwrite ``relative`` (under the project root) with ``text``; no extra arguments."""
    (ws.root / relative).write_text(text)
    return []


def break_manifest(name: str, text: str) -> Callable[[Workspace], list[str]]:
    """Manifest ``name`` replaced by ``text``, its checksum recorded as if stage 1 had written it (the
    case is the content; a manifest changed behind stage 1's back is ``manifest-csv-edited``)."""

    def prepare(ws: Workspace) -> list[str]:
        replace_text(ws, f"manifests/{name}.csv", text)
        record_manifest_checksums([ws.root / "manifests" / f"{name}.csv"])
        return []

    return prepare


def edit_manifest(name: str, column: str, value) -> Callable[[Workspace], list[str]]:
    """Set ``column`` of the first row of manifest ``name`` to ``value``."""

    def prepare(ws: Workspace) -> list[str]:
        path = ws.root / "manifests" / f"{name}.csv"
        frame = pd.read_csv(path, keep_default_na=False, dtype={"stem": str, "group": str})
        frame.loc[0, column] = value
        path.write_text(frame.to_csv(index=False), encoding="utf-8")
        record_manifest_checksums([path])
        return []

    return prepare


def remove_path(relative: str) -> Callable[[Workspace], list[str]]:
    def prepare(ws: Workspace) -> list[str]:
        shutil.rmtree(ws.root / relative)
        return []

    return prepare


def file_changed_after_stage_1(column: str, damage: Callable[[Path], None]) -> Callable[[Workspace], list[str]]:
    """Keep one train sample and point its manifest ``column`` at a damaged copy of its file (the
    data folder is the fixture's, shared by every case). A mask of other content is a new prompt-set
    source, so stage 2 reads the mask again; stage 3 reads the image."""

    def prepare(ws: Workspace) -> list[str]:
        keep_first_rows(ws, 1, 0, 0)
        path = ws.root / "manifests" / "train.csv"
        frame = pd.read_csv(path, keep_default_na=False, dtype={"stem": str, "group": str})
        roots = DataRoots.from_config(load_config(ws.config).data)
        stored = frame.loc[0, column]
        original = roots.image(stored) if column == "image_path" else roots.mask(stored)
        copy = ws.folder / f"changed{original.suffix}"
        shutil.copyfile(original, copy)
        damage(copy)
        frame.loc[0, column] = str(copy)
        path.write_text(frame.to_csv(index=False), encoding="utf-8")
        record_manifest_checksums([path])
        return []

    return prepare


def truncate_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def own_data_with_demo_enabled(ws: Workspace) -> list[str]:
    group = ws.folder / "own" / "images" / "cats"
    group.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(group / "a.png")
    (ws.folder / "own" / "masks" / "cats").mkdir(parents=True)
    return ["--set", f"data.images_root={ws.folder / 'own' / 'images'}",
            "--set", f"data.masks_root={ws.folder / 'own' / 'masks'}"]


def non_utf8_config_name(ws: Workspace) -> list[str]:
    path = Path(os.fsdecode(bytes(ws.folder) + b"/caf\xe9.yaml"))
    path.write_bytes(b"data: {images_root: [\n")
    return ["--config", str(path)]


def config_in_non_utf8_folder(ws: Workspace) -> list[str]:
    """Relative paths resolve against the config's folder, here one whose name is not UTF-8."""
    folder = Path(os.fsdecode(bytes(ws.folder) + b"/caf\xe9"))
    folder.mkdir()
    (folder / "config.yaml").write_text("data: {project_root: project}\nwandb: {enabled: false}\n")
    return ["--config", str(folder / "config.yaml")]


def no_valid_pair(ws: Workspace) -> list[str]:
    for root in ("images", "masks"):
        (ws.folder / "empty" / root / "g").mkdir(parents=True)
    return ["--set", "demo.enabled=false", "--set", f"data.images_root={ws.folder / 'empty' / 'images'}",
            "--set", f"data.masks_root={ws.folder / 'empty' / 'masks'}"]


def own_pairs(ws: Workspace) -> list[str]:
    """Four valid pairs in ``own/`` and the overrides that make them the data set."""
    for i in range(4):
        for root in ("images", "masks"):
            (ws.folder / "own" / root / "g").mkdir(parents=True, exist_ok=True)
        image(ws.folder / "own" / "images" / "g" / f"s{i}.png")
        mask_png(ws.folder / "own" / "masks" / "g" / f"s{i}.png")
    return ["--set", "demo.enabled=false", "--set", f"data.images_root={ws.folder / 'own' / 'images'}",
            "--set", f"data.masks_root={ws.folder / 'own' / 'masks'}"]


def stage_1_rerun_over_corrupt_manifest(ws: Workspace) -> list[str]:
    argv = ["--config", str(ws.config), *own_pairs(ws)]
    assert call_stage("build_manifests", *argv).code == 0
    (ws.root / "manifests" / "all_samples.csv").write_bytes(b"sample_id,split\n\"unclosed,\xff\n")
    return argv


CUDA = torch.cuda.is_available()

ERROR_CASES = [
    # ---- config file and keys (stage 1 reads the config first; every stage shares the loader)
    ErrorCase("config-missing", "build_manifests", None, args("--config", "nowhere.yaml"),
              ("--config", "nowhere.yaml")),
    ErrorCase("config-is-a-folder", "build_manifests", None, lambda ws: ["--config", str(ws.folder)], ("--config",)),
    ErrorCase("config-invalid-yaml", "build_manifests", None, write_config_text("data: {images_root: [\n"),
              ("config.yaml", "invalid YAML")),
    ErrorCase("config-not-utf8", "build_manifests", None, write_config_text(b"data:\n  images_root: caf\xe9\n"),
              ("config.yaml", "UTF-8")),
    ErrorCase("config-top-level-list", "build_manifests", None, write_config_text("- data\n- sam\n"),
              ("config.yaml", "mapping")),
    ErrorCase("config-name-not-utf8", "build_manifests", None, non_utf8_config_name, ("caf\\xe9.yaml", "invalid YAML")),
    ErrorCase("config-folder-not-utf8", "build_manifests", None, config_in_non_utf8_folder,
              ("data.images_root", "caf\\xe9", "not valid UTF-8")),
    ErrorCase("config-unknown-section", "build_manifests", "staged", edit_config(lambda c: c.update(extra={})),
              ("extra: unknown key",)),
    ErrorCase("config-unknown-key", "build_manifests", "staged",
              edit_config(lambda c: c["data"].update(imagez_root="x")), ("data.imagez_root: unknown key",)),
    ErrorCase("config-section-not-mapping", "build_manifests", "staged", edit_config(lambda c: c.update(training=5)),
              ("training: expected a mapping",)),
    ErrorCase("config-wrong-type-number", "build_manifests", "staged", overrides("training.lr=fast"),
              ("training.lr", "expected a number")),
    ErrorCase("config-wrong-type-bool", "build_manifests", "staged", overrides("demo.enabled=maybe"),
              ("demo.enabled", "true or false")),
    ErrorCase("config-wrong-type-list", "build_manifests", "staged", overrides("data.split_fractions=0.5"),
              ("data.split_fractions", "expected a list")),
    ErrorCase("config-unknown-choice", "build_manifests", "staged", overrides("sam.prompt_mode=lasso"),
              ("sam.prompt_mode", "'lasso'")),
    ErrorCase("config-out-of-range", "build_manifests", "staged", overrides("data.mask_threshold=300"),
              ("data.mask_threshold", "300")),
    ErrorCase("config-fractions-sum", "build_manifests", "staged", overrides("data.split_fractions=[0.5,0.5,0.5]"),
              ("data.split_fractions", "summing to 1")),
    ErrorCase("config-empty-path", "build_manifests", "staged", overrides("data.project_root=''"),
              ("data.project_root", "expected a path")),
    ErrorCase("config-model-type-is-a-path", "precompute_sam_outputs", "staged", overrides("sam.model_type=../x"),
              ("sam.model_type",)),
    # ---- command line
    ErrorCase("set-without-equals", "build_manifests", "staged", args("--set", "training.lr"), ("--set", "KEY=VALUE")),
    ErrorCase("set-malformed-key", "build_manifests", "staged", args("--set", "training..lr=1"),
              ("--set", "malformed key")),
    ErrorCase("set-below-a-value", "build_manifests", "staged", args("--set", "training.lr.x=1"),
              ("--set", "training.lr is not a section")),
    ErrorCase("set-unknown-key", "build_manifests", "staged", overrides("training.lrr=1"),
              ("training.lrr: unknown key",)),
    ErrorCase("unknown-flag", "build_manifests", "staged", args("--forse"), ("--forse",)),
    ErrorCase("unknown-model", "train_head", "packed", args("--model", "transformer"), ("--model", "transformer")),
    ErrorCase("run-id-climbs-out", "train_head", "packed", args("--run_id", "../../x"), ("--run_id", "../../x")),
    ErrorCase("shard-count-not-a-number", "precompute_sam_outputs", "staged", args("--num-shards", "two"),
              ("--num-shards", "two")),
    ErrorCase("shard-index-without-count", "precompute_sam_outputs", "staged", args("--shard-index", "1"),
              ("--num-shards and --shard-index",)),
    ErrorCase("shard-index-out-of-range", "precompute_sam_outputs", "staged",
              args("--num-shards", "2", "--shard-index", "2"), ("--shard-index: 2 is outside 0..1",)),
    # ---- data folders and the demo
    ErrorCase("images-root-missing", "build_manifests", "staged",
              overrides("demo.enabled=false", "data.images_root=nowhere"), ("data.images_root", "nowhere")),
    ErrorCase("masks-root-missing", "build_manifests", "staged",
              lambda ws: ["--set", "demo.enabled=false", "--set", f"data.masks_root={ws.folder / 'nowhere'}"],
              ("data.masks_root", "nowhere")),
    ErrorCase("no-valid-pair", "build_manifests", None, no_valid_pair,
              ("data.images_root", "no valid image/mask pair")),
    ErrorCase("demo-over-own-data", "build_manifests", "staged", own_data_with_demo_enabled,
              ("demo.enabled: false", "a.png")),
    ErrorCase("masks-root-is-images-root", "build_manifests", "staged",
              lambda ws: ["--set", "demo.enabled=false", "--set", f"data.masks_root={ws.folder / 'data' / 'images'}"],
              ("data.masks_root", "data.images_root")),
    # ---- upstream artifacts missing or edited
    ErrorCase("promptsets-before-manifests", "generate_promptsets", "staged", remove_path("manifests"),
              ("train.csv", "build_manifests.py")),
    ErrorCase("manifest-csv-empty", "generate_promptsets", "staged", break_manifest("train", ""), ("train.csv",)),
    ErrorCase("manifest-csv-column-missing", "generate_promptsets", "staged",
              break_manifest("train", "sample_id,split\ncats/a,train\n"), ("train.csv", "safe_id")),
    ErrorCase("manifest-csv-size-zero", "generate_promptsets", "staged", edit_manifest("train", "image_h", 0),
              ("train.csv", "image_h")),
    ErrorCase("manifest-csv-rerun-corrupt", "build_manifests", None, stage_1_rerun_over_corrupt_manifest,
              ("all_samples.csv", "--force")),
    ErrorCase("manifest-csv-edited", "generate_promptsets", "staged",
              lambda ws: replace_text(ws, "manifests/train.csv",
                                      (ws.root / "manifests" / "train.csv").read_text().replace("train", "trains", 1)),
              ("train.csv", "differs from what build_manifests.py wrote")),
    ErrorCase("cache-before-promptsets", "precompute_sam_outputs", "staged", remove_path("prompt_sets"),
              ("generate_promptsets.py",)),
    ErrorCase("promptset-truncated", "precompute_sam_outputs", "staged", edit_promptset(truncate_text, others=1),
              ("1 of 2 images failed", ".json")),
    ErrorCase("promptset-zero-byte", "precompute_sam_outputs", "staged", edit_promptset(lambda r: ""),
              ("failed", ".json")),
    ErrorCase("promptset-edited-points", "precompute_sam_outputs", "staged",
              edit_promptset(lambda r: {**r, "promptsets": [{**r["promptsets"][0], "points": "here"}]}),
              ("failed", ".json", "malformed")),
    ErrorCase("promptset-points-labels-disagree", "precompute_sam_outputs", "staged",
              edit_promptset(lambda r: {**r, "promptsets": [{**r["promptsets"][0], "labels": [1] * 9}]}),
              ("failed", ".json", "malformed")),
    ErrorCase("promptset-no-sets", "precompute_sam_outputs", "staged",
              edit_promptset(lambda r: {**r, "promptsets": []}), ("failed", ".json", "0 prompt sets")),
    ErrorCase("promptset-not-an-object", "precompute_sam_outputs", "staged",
              edit_promptset(lambda r: "[1, 2]"), ("failed", ".json", "malformed")),
    ErrorCase("promptset-too-many-sets", "precompute_sam_outputs", "staged",
              edit_promptset(lambda r: {**r, "promptsets": r["promptsets"] * 3}), ("failed", ".json", "prompt sets")),
    ErrorCase("mask-damaged-after-stage-1", "generate_promptsets", "staged",
              file_changed_after_stage_1("mask_path", truncate_file),
              ("generate_promptsets: 1 of 1 samples failed", "changed.")),
    ErrorCase("image-damaged-after-stage-1", "precompute_sam_outputs", "staged",
              file_changed_after_stage_1("image_path", truncate_file),
              ("precompute_sam_outputs: 1 of 1 images failed", "changed.")),
    ErrorCase("indices-before-cache", "build_training_indices", "staged", args(), ("precompute_sam_outputs.py",)),
    ErrorCase("packing-before-indices", "pack_to_hdf5", "staged", args(), ("build_training_indices.py",)),
    ErrorCase("index-csv-edited", "pack_to_hdf5", "packed",
              lambda ws: replace_text(ws, "training_data/train_index.csv", "sample_id,safe_id\ng/a,g__a\n")
              + ["--force"],
              ("train_index.csv", "not a training index")),
    ErrorCase("packed-split-truncated", "train_head", "packed",
              lambda ws: truncate_file(ws.root / "training_data" / "train.h5") or ["--run_id", "t2"],
              ("train.h5", "pack_to_hdf5.py")),
    ErrorCase("training-before-packing", "train_head", "staged", args("--model", "head", "--run_id", "t1"),
              ("pack_to_hdf5.py",)),
    ErrorCase("variance-without-head", "train_head", "packed", args("--model", "variance", "--run_id", "nohead"),
              ("run_nohead",)),
    ErrorCase("laplace-unknown-run", "fit_laplace", "packed", args("--run_id", "nosuchrun"), ("run_nosuchrun",)),
    ErrorCase("evaluation-without-trained-runs", "evaluate_uncertainty", "packed", args("--run_id", "v7"),
              ("checkpoints", "run_v7", "missing")),
    # ---- the SAM checkpoint and device
    ErrorCase("checkpoint-missing", "precompute_sam_outputs", "staged", overrides("sam.checkpoint=missing.pt"),
              ("sam.checkpoint", "missing.pt")),
    ErrorCase("checkpoint-truncated", "precompute_sam_outputs", "staged",
              checkpoint_file(truncated_copy_of_demo_checkpoint), ("sam.checkpoint", "checkpoint.pt", "truncated")),
    ErrorCase("checkpoint-not-a-checkpoint", "precompute_sam_outputs", "staged",
              checkpoint_file(lambda p: p.write_text("weights: none\n")),
              ("sam.checkpoint", "checkpoint.pt", "not a PyTorch checkpoint")),
    ErrorCase("checkpoint-zero-byte", "precompute_sam_outputs", "staged", checkpoint_file(lambda p: p.write_bytes(b"")),
              ("sam.checkpoint", "checkpoint.pt", "not a PyTorch checkpoint")),
    ErrorCase("checkpoint-is-a-folder", "precompute_sam_outputs", "staged",
              lambda ws: ["--set", f"sam.checkpoint={ws.folder / 'data'}"], ("sam.checkpoint", "data")),
    ErrorCase("checkpoint-of-another-model", "precompute_sam_outputs", "staged",
              checkpoint_file(lambda p: torch.save({"encoder.weight": torch.zeros(2)}, p)),
              ("sam.checkpoint", "checkpoint.pt", "does not match model type 'demo_tiny'")),
    ErrorCase("model-type-unknown", "precompute_sam_outputs", "staged", overrides("sam.model_type=vit_q"),
              ("sam.model_type", "vit_q")),
    ErrorCase("sam-device-cuda-without-cuda", "precompute_sam_outputs", "staged", overrides("sam.device=cuda"),
              ("sam.device", "CUDA is not available")),
    ErrorCase("training-device-cuda-without-cuda", "train_head", "packed",
              args("--set", "training.device=cuda", "--run_id", "gpu"), ("training.device", "CUDA is not available")),
]
#: Cases that need a machine without CUDA.
NEEDS_NO_CUDA = {"sam-device-cuda-without-cuda", "training-device-cuda-without-cuda"}
#: Cases also run as real subprocesses (exit code and stderr as a user sees them).
SUBPROCESS_CASES = {"unknown-flag", "demo-over-own-data", "config-folder-not-utf8"}


def prepare_case(case: ErrorCase, projects: dict, tmp_path: Path) -> tuple[Workspace, list[str]]:
    if case.project is None:
        ws = Workspace(tmp_path / "case")
        ws.folder.mkdir()
        small_demo_config(ws.folder, SMALL)
    else:
        ws = copy_workspace(projects[case.project], tmp_path / "case")
    argv = case.prepare(ws)
    if "--config" not in argv:
        argv = ["--config", str(ws.config), *argv]
    return ws, argv


def check_case(case: ErrorCase, ws: Workspace, outcome: Outcome, before: dict, outside: dict) -> None:
    assert_one_error_line(outcome, *case.expect)
    after = file_hashes(ws.folder)
    changed = {k for k, v in before.items() if after.get(k) != v}
    assert not changed, f"earlier files changed or deleted: {sorted(changed)[:5]}"
    assert ws.outside_root() == outside, "written outside the project root"


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.id for c in ERROR_CASES])
def test_bad_input_is_one_line_error(case, projects, tmp_path):
    if case.id in NEEDS_NO_CUDA and CUDA:
        pytest.skip("needs a machine without CUDA")
    ws, argv = prepare_case(case, projects, tmp_path)
    before, outside = file_hashes(ws.folder), ws.outside_root()
    check_case(case, ws, call_stage(case.script, *argv), before, outside)


@pytest.mark.parametrize("case_id", sorted(SUBPROCESS_CASES))
def test_bad_input_as_a_user_sees_it(case_id, projects, tmp_path):
    case = next(c for c in ERROR_CASES if c.id == case_id)
    ws, argv = prepare_case(case, projects, tmp_path)
    before, outside = file_hashes(ws.folder), ws.outside_root()
    check_case(case, ws, run_subprocess(case.script, *argv), before, outside)


def test_truncated_promptset_keeps_the_other_images(projects, tmp_path):
    """Stage 3 stops with exit code 2 for a truncated prompt-set file, but the other image of the run
    is cached, stage 2 rewrites the truncated file (it is not complete), and a rerun of stage 3
    computes only that image."""
    case = next(c for c in ERROR_CASES if c.id == "promptset-truncated")
    ws, argv = prepare_case(case, projects, tmp_path)
    broken = ws.first_promptset()
    assert_one_error_line(call_stage("precompute_sam_outputs", *argv), broken.name)
    cache = SamCache(ws.root)
    assert len(cache) == 1 and broken.stem not in cache.sample_ids()
    cache.close()
    regenerated = call_stage("generate_promptsets", *argv)
    assert regenerated.code == 0 and "train_done: 1" in regenerated.stdout, regenerated.stdout[-2000:]
    rerun = call_stage("precompute_sam_outputs", *argv)
    assert rerun.code == 0, rerun.stderr[-2000:]
    assert "done: 1" in rerun.stdout and "skipped: 1" in rerun.stdout
    assert len(SamCache(ws.root)) == 2


# --------------------------------------------------------------------------- invalid-sample rows


def _rng(stem: str) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.md5(os.fsencode(stem)).hexdigest()[:8], 16))


def disc(height: int = 48, width: int = 48) -> np.ndarray:
    rows, cols = np.mgrid[:height, :width]
    return (rows - height / 2) ** 2 + (cols - width / 2) ** 2 <= (min(height, width) / 4) ** 2


def image(path: Path, height: int = 48, width: int = 48) -> None:
    Image.fromarray(_rng(path.stem).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def mask_png(path: Path, mask: np.ndarray | None = None) -> None:
    Image.fromarray((disc() if mask is None else mask).astype(np.uint8) * 255).save(path)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class RowCase:
    """``write(images_group, masks_group, stem)`` writes one bad sample of stem ``stem`` in group
    ``bad``; stage 1 must list it in ``invalid_samples.csv`` with ``reason`` and ``detail`` text."""

    id: str
    write: Callable[[Path, Path, str], None]
    reason: str
    detail: str

    @property
    def stem(self) -> str:
        return self.id


def mask_as(suffix: str, make: Callable[[Path], None]):
    def write(images: Path, masks: Path, stem: str) -> None:
        image(images / f"{stem}.png")
        make(masks / f"{stem}{suffix}")
    return write


def image_as(suffix: str, make: Callable[[Path], None]):
    def write(images: Path, masks: Path, stem: str) -> None:
        make(images / f"{stem}{suffix}")
        mask_png(masks / f"{stem}.png")
    return write


def rgba_alpha_only(path: Path) -> None:
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 3] = disc().astype(np.uint8) * 255
    Image.fromarray(rgba, mode="RGBA").save(path)


def la_alpha_only(path: Path) -> None:
    la = np.zeros((48, 48, 2), np.uint8)
    la[..., 1] = disc().astype(np.uint8) * 255
    Image.fromarray(la, mode="LA").save(path)


def jpeg_noise_only(path: Path) -> None:
    noise = _rng(path.stem).integers(0, 90, (48, 48), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=60)


def sixteen_bit_with_eight_bit_levels(path: Path) -> None:
    Image.fromarray(disc().astype(np.uint16) * 255).save(path)


def palette_black_foreground(path: Path) -> None:
    indexed = Image.fromarray(disc().astype(np.uint8), mode="P")
    indexed.putpalette([0, 0, 0, 0, 0, 0] + [0] * (256 * 3 - 6))
    indexed.save(path)


def float_tiff(path: Path) -> None:
    Image.fromarray(np.ones((48, 48), np.float32)).save(path)


def symlink_loop(path: Path) -> None:
    other = path.with_name(path.stem + "_loop" + path.suffix)
    os.symlink(other.name, path)
    os.symlink(path.name, other)


def ambiguous(kind: str):
    def write(images: Path, masks: Path, stem: str) -> None:
        image(images / f"{stem}.png")
        mask_png(masks / f"{stem}.png")
        if kind == "image":
            image(images / f"{stem}.jpg")
        else:
            np.save(masks / f"{stem}.npy", disc())
    return write


def unsupported(kind: str):
    """The image (or the mask) saved as a GIF, which stage 1 does not read; the other file is fine."""
    def write(images: Path, masks: Path, stem: str) -> None:
        if kind == "image":
            Image.fromarray(_rng(stem).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(images / f"{stem}.gif")
            mask_png(masks / f"{stem}.png")
        else:
            image(images / f"{stem}.png")
            Image.fromarray(disc().astype(np.uint8) * 255).save(masks / f"{stem}.gif")
    return write


def small_mask_losing_its_foreground(images: Path, masks: Path, stem: str) -> None:
    image(images / f"{stem}.png", 40, 40)
    mask = np.zeros((80, 80), bool)
    mask[0, 0] = True  # nearest-neighbour resizing to 40 x 40 keeps rows and columns 1, 3, 5, ...
    mask_png(masks / f"{stem}.png", mask)


def non_utf8_name(images: Path, masks: Path, stem: str) -> None:
    name = os.fsdecode(stem.encode() + b"-caf\xe9")
    image(images / f"{name}.png")
    mask_png(masks / f"{name}.png")


ROW_CASES = [
    RowCase("image-random-bytes", image_as(".png", lambda p: p.write_bytes(os.urandom(300))), "unreadable_image",
            "image-random-bytes.png"),
    RowCase("image-truncated", image_as(".png", lambda p: p.write_bytes(png_bytes(
        _rng("t").integers(0, 256, (48, 48, 3), dtype=np.uint8))[:400])), "unreadable_image", "image-truncated.png"),
    RowCase("image-zero-byte", image_as(".jpg", lambda p: p.write_bytes(b"")), "unreadable_image",
            "image-zero-byte.jpg"),
    RowCase("image-text-with-image-extension", image_as(".jpg", lambda p: p.write_text("not an image\n")),
            "unreadable_image", "image-text-with-image-extension.jpg"),
    RowCase("image-float32-tiff", image_as(".tif", float_tiff), "unreadable_image", "mode F"),
    RowCase("image-too-small", image_as(".png", lambda p: image(p, 8, 8)), "image_too_small", "8 x 8"),
    RowCase("image-symlink-loop", image_as(".png", symlink_loop), "missing_image", "no image file"),
    RowCase("mask-truncated", mask_as(".png", lambda p: p.write_bytes(png_bytes(disc().astype(np.uint8) * 255)[:60])),
            "unreadable_mask", "mask-truncated.png"),
    RowCase("mask-zero-byte-npy", mask_as(".npy", lambda p: p.write_bytes(b"")), "unreadable_mask",
            "mask-zero-byte-npy.npy"),
    RowCase("mask-npy-of-strings", mask_as(".npy", lambda p: np.save(p, np.array([["a"]]))), "unreadable_mask",
            "dtype"),
    RowCase("mask-npy-3d", mask_as(".npy", lambda p: np.save(p, disc()[None])), "mask_not_2d", "(1, 48, 48)"),
    RowCase("mask-no-foreground", mask_as(".png", lambda p: mask_png(p, np.zeros((48, 48), bool))), "empty_mask",
            "no foreground"),
    RowCase("mask-all-foreground", mask_as(".png", lambda p: mask_png(p, np.ones((48, 48), bool))), "full_mask",
            "no background"),
    RowCase("mask-rgba-alpha-only", mask_as(".png", rgba_alpha_only), "empty_mask", "no foreground"),
    RowCase("mask-la-alpha-only", mask_as(".png", la_alpha_only), "empty_mask", "no foreground"),
    RowCase("mask-jpeg-noise-only", mask_as(".jpg", jpeg_noise_only), "empty_mask", "no foreground"),
    RowCase("mask-16bit-with-8bit-levels", mask_as(".png", sixteen_bit_with_eight_bit_levels), "empty_mask",
            "no foreground"),
    RowCase("mask-palette-black-foreground", mask_as(".png", palette_black_foreground), "empty_mask", "no foreground"),
    RowCase("mask-symlink-dangling", mask_as(".png", lambda p: os.symlink("gone.png", p)), "missing_mask",
            "no mask file"),
    RowCase("mask-missing", lambda images, masks, stem: image(images / f"{stem}.png"), "missing_mask", "no mask file"),
    RowCase("image-missing", lambda images, masks, stem: mask_png(masks / f"{stem}.png"), "missing_image",
            "no image file"),
    RowCase("image-in-an-unsupported-format", unsupported("image"), "missing_image",
            "found image-in-an-unsupported-format.gif, in a format stage 1 does not read"),
    RowCase("mask-in-an-unsupported-format", unsupported("mask"), "missing_mask",
            "found mask-in-an-unsupported-format.gif, in a format stage 1 does not read"),
    RowCase("duplicate-image-stem", ambiguous("image"), "ambiguous_image", "duplicate-image-stem.jpg"),
    RowCase("duplicate-mask-stem", ambiguous("mask"), "ambiguous_mask", "duplicate-mask-stem.npy"),
    RowCase("mask-of-another-shape", mask_as(".png", lambda p: mask_png(p, disc(48, 24))), "mask_shape_mismatch",
            "48 x 24"),
    RowCase("mask-foreground-lost-at-image-size", small_mask_losing_its_foreground, "empty_mask", "at image size"),
    RowCase("file-name-not-utf8", non_utf8_name, "undecodable_name", "UTF-8"),
]


@pytest.fixture(scope="module")
def invalid_rows(tmp_path_factory) -> tuple[Outcome, pd.DataFrame, Workspace, dict]:
    """Stage 1 once over a data folder with every ``ROW_CASES`` sample (group ``bad``) and two good
    groups; the run that follows is a rerun over the same files."""
    folder = tmp_path_factory.mktemp("rows")
    ws = Workspace(folder)
    images, masks = folder / "data" / "images", folder / "data" / "masks"
    for group in ("good", "bad"):
        (images / group).mkdir(parents=True)
        (masks / group).mkdir(parents=True)
    for i in range(4):
        image(images / "good" / f"s{i}.png")
        mask_png(masks / "good" / f"s{i}.png")
    for case in ROW_CASES:
        case.write(images / "bad", masks / "bad", case.stem)
    # Files of no supported kind and no pair are not samples: no row (the count below).
    (images / "bad" / "notes.txt").write_text("where these came from\n")
    (masks / "bad" / "Thumbs.db").write_bytes(b"\0" * 16)
    small_demo_config(folder, {**SMALL, "demo.enabled": False, "data.min_image_side": 16})
    outside = ws.outside_root()
    outcome = call_stage("build_manifests", "--config", str(ws.config))
    return outcome, ws.manifest("invalid_samples"), ws, outside


def test_stage_1_with_bad_samples_exits_0_writes_only_under_the_root_and_reruns_unchanged(invalid_rows):
    outcome, invalid, ws, outside = invalid_rows
    assert outcome.code == 0 and "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert ws.outside_root() == outside
    valid = ws.manifest("all_samples")
    assert set(valid["group"]) == {"good"} and len(valid) == 4
    assert len(invalid) == len(ROW_CASES)
    before = file_hashes(ws.root)
    rerun = call_stage("build_manifests", "--config", str(ws.config))
    assert rerun.code == 0 and "rewritten: nothing (unchanged)" in rerun.stdout, rerun.stdout[-2000:]
    assert file_hashes(ws.root) == before


@pytest.mark.parametrize("case", ROW_CASES, ids=[c.id for c in ROW_CASES])
def test_bad_sample_is_an_invalid_row(case, invalid_rows):
    outcome, invalid, _, _ = invalid_rows
    assert outcome.code == 0, outcome.stderr[-3000:]
    rows = invalid[invalid["stem"].str.startswith(case.stem)]
    assert len(rows) == 1, invalid[["stem", "reason"]].to_string()
    row = rows.iloc[0]
    assert row["group"] == "bad" and row["reason"] == case.reason, row.to_dict()
    assert case.detail in row["detail"], row["detail"]


def test_the_table_holds_at_least_40_distinct_bad_inputs():
    ids = [c.id for c in ERROR_CASES] + [c.id for c in ROW_CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40
