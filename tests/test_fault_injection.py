"""Fault injection: every stage SIGKILLed at seeded random points, then rerun plainly; and damaged bytes
in every kind of artifact.

One tiny demo project (3 scenes per group, 2 prompt sets per image, 2 epochs, 2 evaluated samples)
runs every stage once, uninterrupted, in ``run_pipeline.py``'s order; a copy of the project is kept
before and after each stage. For each stage and seed the project before the stage is restored, the
stage is killed (seed 0: through the ``PIPELINE_TEST_KILL_AFTER_UNITS`` hook after a drawn number of
units, where the stage has units; otherwise, and for seed 1, with SIGKILL after a drawn delay inside
the stage's measured run time, so kills also land inside writes), then rerun with the same command
(no ``--force``; training gets ``run_pipeline.py``'s ``--resume-if-exists``). The rerun must exit 0,
leave the whole project equal to the uninterrupted one (``assert_same_tree``: per artifact kind, bit
for bit: the pipeline is deterministic on CPU with one thread), compute exactly the units the killed
run had not finished (counted on disk after the kill), keep the files the killed run had already
finished untouched, leave no temporary file that could be read as an artifact, and write nothing
outside the project root (the stages' ``HOME`` and ``TMPDIR`` stay empty, the work folder holds only
the config and the project).

Stage runs are forked from one server process that imported the stage modules once
(``tests/helpers/forked_stages.py``): each is a real process killed by a real SIGKILL, without the
~7 s import cost of a fresh interpreter per run.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import struct
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from modules.core.stage import KILL_HOOK_ENV
from modules.training.guard import GUARD_FILE
from modules.training.run_state import BEST_FILE
from modules.cache.cache_writers import KILL_AFTER_IMAGES_ENV
from tests.conftest import DEMO_CHECKPOINT, small_demo_config
from tests.helpers.forked_stages import StageServer
from tests.helpers.precompute_fixtures import write_tiny_dataset

RUN = ("--run_id", "v1")
#: ``run_pipeline.py``'s stages and arguments, in its order; the name keys the copies of the project.
STAGES = [
    ("manifests", "build_manifests.py", ()),
    ("promptsets", "generate_promptsets.py", ()),
    ("sam_cache", "precompute_sam_outputs.py", ()),
    ("sanity", "visualize_sanity.py", ("--n", "1", "--split", "train")),
    ("indices", "build_training_indices.py", ()),
    ("packing", "pack_to_hdf5.py", ()),
    ("head", "train_head.py", ("--model", "head", *RUN, "--resume-if-exists")),
    ("variance", "train_head.py", ("--model", "variance", *RUN, "--resume-if-exists")),
    ("laplace", "fit_laplace.py", RUN),
    ("fusion", "train_head.py", ("--model", "fusion", *RUN, "--resume-if-exists")),
    ("evaluation", "evaluate_uncertainty.py", RUN),
]
GROUPS, PER_GROUP, EPOCHS, FUSION_EPOCHS, EVAL_SAMPLES = ("cats", "dogs"), 3, 2, 1, 2
SAMPLES = PER_GROUP * len(GROUPS)
#: The stage's unit-count kill hook (environment variable) and how many units it counts.
#: ``ctx.run_units`` arms the hook per call, i.e. per split: stages 2 and 4.5 are killed in 'train'.
UNIT_HOOKS = {"promptsets": (KILL_HOOK_ENV, SAMPLES // 3), "sam_cache": (KILL_AFTER_IMAGES_ENV, SAMPLES),
              "packing": (KILL_HOOK_ENV, SAMPLES // 3),
              "head": (KILL_HOOK_ENV, EPOCHS), "variance": (KILL_HOOK_ENV, EPOCHS),
              "fusion": (KILL_HOOK_ENV, FUSION_EPOCHS), "evaluation": (KILL_HOOK_ENV, EVAL_SAMPLES)}
SEEDS = (0, 1)
#: History fields that measure time, not results.
TIMING_KEYS = {"epoch_time_s", "compute_s", "data_wait_s", "data_wait_fraction"}
TMP_FILE = re.compile(r"^\..+\.tmp$")


# --------------------------------------------------------------------------- comparing projects


def project_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """``relative path -> path`` of every artifact under ``root``, and the leftover temporary files
    (``.<name>.<random>.tmp`` of an atomic write cut short)."""
    files, temporary = {}, []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or relative.startswith(".cache/"):
            continue
        if TMP_FILE.match(path.name):
            temporary.append(relative)
        else:
            files[relative] = path
    return files, temporary


def _strip_timing(value):
    if isinstance(value, dict):
        return {k: _strip_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_strip_timing(v) for v in value]
    return value


def assert_same_content(got: Path, want: Path, name: str) -> None:
    """Equality per artifact kind: tensors of ``.pt`` files, datasets and attributes of HDF5 files,
    parsed JSON (timings left out), bytes for everything else (CSV, YAML, PNG, images)."""
    if got.suffix == ".pt":
        a, b = (torch.load(p, map_location="cpu", weights_only=True) for p in (got, want))
        assert_same_object(a, b, name)
    elif got.suffix == ".h5":
        with h5py.File(got, "r", locking=False) as a, h5py.File(want, "r", locking=False) as b:
            assert dict(a.attrs) == dict(b.attrs), name
            names = []
            a.visit(lambda key: names.append(key) if isinstance(a[key], h5py.Dataset) else None)
            assert sorted(names) == sorted(k for k in _datasets(b)), name
            for key in names:
                np.testing.assert_array_equal(a[key][()], b[key][()], err_msg=f"{name}: {key}")
    elif got.suffix == ".json":
        assert _strip_timing(json.loads(got.read_text())) == _strip_timing(json.loads(want.read_text())), name
    else:
        assert got.read_bytes() == want.read_bytes(), name


def _datasets(handle) -> list[str]:
    names = []
    handle.visit(lambda key: names.append(key) if isinstance(handle[key], h5py.Dataset) else None)
    return names


def assert_same_object(a, b, name: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), name
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), name
        for key in a:
            assert_same_object(a[key], b[key], f"{name}[{key}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), name
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_object(x, y, f"{name}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), name
    else:
        assert a == b, name


def assert_same_tree(got: Path, want: Path) -> list[str]:
    """The same artifacts with the same content; returns the leftover temporary files."""
    got_files, temporary = project_files(got)
    want_files, _ = project_files(want)
    assert sorted(got_files) == sorted(want_files)
    for relative, path in got_files.items():
        assert_same_content(path, want_files[relative], relative)
    return temporary


def file_ids(files: dict[str, Path]) -> dict[str, tuple[int, int]]:
    return {relative: (path.stat().st_ino, path.stat().st_mtime_ns) for relative, path in files.items()}


# --------------------------------------------------------------------------- the project


class FaultProject:
    """The work folder (config + project, always at the same absolute path, as the artifacts record
    absolute paths), the server, and copies of the project around each stage."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.work = folder / "work"
        self.root = self.work / "project"
        self.home, self.tmp = folder / "home", folder / "tmp"
        for path in (self.work, self.home, self.tmp):
            path.mkdir(parents=True)
        images, masks = write_tiny_dataset(self.root / "data", groups=GROUPS, per_group=PER_GROUP)
        self.config = small_demo_config(self.work, {
            "data.images_root": str(images), "data.masks_root": str(masks), "data.min_image_side": 16,
            "data.split_fractions": [0.34, 0.33, 0.33], "demo.enabled": False,
            "prompt_generation.num_promptsets_train": 2, "prompt_generation.num_promptsets_val": 2,
            "prompt_generation.num_promptsets_test": 2, "training.num_epochs": EPOCHS,
            "fusion.num_epochs": FUSION_EPOCHS, "fusion.max_train_rows": 4, "laplace.num_samples": 4,
            "laplace.prior_precision_grid": [0.01, 1.0], "laplace.temperature_grid": [1.0, 100.0],
            "evaluation.strategies": ["raw_sam", "variance_network"],
            "sam.encoder_batch_size": 2,  # a stage-3 kill then leaves the earlier batches finished
            "evaluation.max_samples": EVAL_SAMPLES, "evaluation.qualitative_per_domain": 0})
        self.server = StageServer(folder / "logs", env={"OMP_NUM_THREADS": "1", "HOME": str(self.home),
                                                        "TMPDIR": str(self.tmp)})
        self.seconds: dict[str, float] = {}
        # What the server's own imports left there (matplotlib's font cache): the stages add nothing.
        self.home_before = sorted(self.home.rglob("*"))

    def copy(self, name: str) -> Path:
        return self.folder / "copies" / name

    def restore(self, name: str) -> None:
        """Make the project what it was at copy ``name``."""
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.copytree(self.copy(name), self.root, symlinks=True)

    def run(self, script: str, *args: str, **kwargs):
        return self.server.run(script, self.config, *args, **kwargs)

    def assert_nothing_outside(self) -> None:
        assert sorted(p.name for p in self.work.iterdir()) == ["config.yaml", "project"]
        assert sorted(self.home.rglob("*")) == self.home_before and not any(self.tmp.iterdir())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> FaultProject:
    if not DEMO_CHECKPOINT.is_file():
        pytest.skip(f"{DEMO_CHECKPOINT} is missing (tools/train_demo_backbone.py makes it)")
    fault = FaultProject(tmp_path_factory.mktemp("fault_injection"))
    shutil.copytree(fault.root, fault.copy("start"))
    for name, script, args in STAGES:
        result = fault.run(script, *args)
        assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
        fault.seconds[name] = result.seconds
        shutil.copytree(fault.root, fault.copy(name), symlinks=True)
    print("uninterrupted stage times (s):", {k: round(v, 2) for k, v in fault.seconds.items()})
    fault.assert_nothing_outside()
    yield fault
    fault.server.close()


def before(name: str) -> str:
    names = [stage[0] for stage in STAGES]
    return "start" if name == names[0] else names[names.index(name) - 1]


# --------------------------------------------------------------------------- units on disk and rerun counts


def summary_values(text: str) -> dict[str, str]:
    """The ``  key: value`` closing lines of a stage."""
    return dict(re.findall(r"^  (\w+): (.*)$", text, flags=re.MULTILINE))


def finished_units(name: str, root: Path, reference: Path):
    """What the killed run left finished on disk, in the units the stage skips."""
    if name == "promptsets":
        done = 0
        for path in (reference / "prompt_sets").glob("*/*.json"):
            mine = root / path.relative_to(reference)
            done += mine.is_file() and mine.read_bytes() == path.read_bytes()
        return done
    if name == "sam_cache":
        shards = list((root / "sam_cache").glob("*/shard-*.h5"))
        if not shards:
            return 0
        with h5py.File(shards[0], "r", locking=False) as handle:
            return int(handle["entries/complete"][:].sum())
    if name == "packing":
        per_split = {}
        for split in ("train", "val", "test"):
            final, partial = root / "training_data" / f"{split}.h5", root / "training_data" / f"{split}.h5.partial"
            if final.is_file():
                per_split[split] = "complete"
            elif partial.is_file():
                with h5py.File(partial, "r", locking=False) as handle:
                    complete, sample = handle["rows/complete"][:].astype(bool), handle["rows/sample"][:]
                per_split[split] = sum(bool(complete[sample == s].all()) for s in np.unique(sample))
            else:
                per_split[split] = 0
        return per_split
    if name in ("head", "variance", "fusion"):
        return epoch_history(root, name)
    if name == "evaluation":
        state = root / "reports" / "eval" / "run_v1" / "state.pt"
        return len(torch.load(state, weights_only=True)["done"]) if state.is_file() else 0
    if name == "laplace":
        folder = root / "laplace" / "head" / "run_v1"
        return all((folder / f).is_file() for f in ("laplace_state.pt", "posterior_meta.json", "quality.json",
                                                    "prior_precision_nll.csv", "prior_precision_nll.png"))
    return None


def epoch_history(root: Path, name: str) -> list[dict]:
    """The per-epoch records of the training run ``name`` (empty before its first commit)."""
    state = root / "checkpoints" / name / "run_v1" / "epoch_state.json"
    return json.loads(state.read_text())["history"] if state.is_file() else []


def assert_rerun_did_only_the_rest(name: str, finished, rerun, root: Path) -> None:
    """The rerun's own counts: it computed exactly the units the killed run had not finished."""
    values = summary_values(rerun.stdout)
    if name == "promptsets":
        skipped = sum(int(values[f"{s}_skipped"]) for s in ("train", "val", "test"))
        done = sum(int(values[f"{s}_done"]) for s in ("train", "val", "test"))
        assert (skipped, done) == (finished, SAMPLES - finished), values
    elif name == "sam_cache":
        assert (int(values["skipped"]), int(values["done"])) == (finished, SAMPLES - finished), values
    elif name == "packing":
        for split, state in finished.items():
            if state == "complete":
                assert values[f"{split}_status"] == "skipped", values
            else:
                total = SAMPLES // 3
                assert (int(values[f"{split}_skipped"]), int(values[f"{split}_done"])) == (state, total - state)
    elif name in ("head", "variance", "fusion"):
        # The committed epochs' records (timings included) are kept as they were: those epochs
        # were not trained again; every later epoch was (the fusion module also validates epoch 0).
        history = epoch_history(root, name)
        expected = list(range(0, FUSION_EPOCHS + 1)) if name == "fusion" else list(range(1, EPOCHS + 1))
        assert [record["epoch"] for record in history] == expected
        assert history[:len(finished)] == finished
    elif name == "evaluation":
        if values.get("skipped") == "True":  # nothing left to do: the reports were complete
            assert finished == EVAL_SAMPLES
        else:
            assert f"({finished} done before)" in rerun.stdout
            assert (int(values["skipped"]), int(values["done"])) == (finished, EVAL_SAMPLES - finished), values
    elif name == "laplace":
        assert ("already fitted" in rerun.stdout) == bool(finished), rerun.stdout
        assert ("fitting a diagonal" in rerun.stdout) == (not finished), rerun.stdout


def rewritten_by_design(name: str, relative: str, root: Path) -> bool:
    """Files a rerun rewrites even when the killed run left them equal to the final ones: the panels
    (never skipped), the evaluation's state and reports, a Laplace fit (one unit: refitted whole
    unless complete), every epoch's training state, fingerprints and resolved configs (rewritten
    only when different, so they stay untouched anyway), and the head's ``best.pt`` while its guard
    has not recorded its decision (the rerun decides again from ``trained_best.pt`` and writes it:
    the same tensors, other bytes)."""
    guard_pending = name == "head" and not (root / relative).with_name(GUARD_FILE).is_file()
    per_epoch = ("last.pt", "optimizer_last.pt", "scaler_last.pt", "scheduler_last.pt", "epoch_state.json")
    own = {"sanity": "reports/debug_panels/", "evaluation": "reports/eval/", "laplace": "laplace/"}
    return (relative.startswith(own.get(name, "\0"))
            or (relative.startswith("checkpoints/") and relative.endswith(per_epoch))
            or relative.endswith((".stage.json", "config.resolved.yaml"))
            or (guard_pending and relative.endswith(f"/{BEST_FILE}")))


def kill_plan(name: str, seed: int, seconds: float) -> tuple[dict, float | None, str]:
    """Seeded: the hook's unit count (seed 0, where the stage has units) or a delay in its run time."""
    rng = random.Random(f"{name}-{seed}")
    if seed == 0 and name in UNIT_HOOKS:
        variable, units = UNIT_HOOKS[name]
        count = rng.randint(1, max(1, units - 1))
        return {variable: str(count)}, None, f"after unit {count}"
    delay = rng.uniform(0.05, 0.95) * seconds
    return {}, delay, f"after {delay:.2f} s"


@pytest.mark.parametrize("name", [stage[0] for stage in STAGES])
def test_sigkill_at_random_points_then_plain_rerun_equals_uninterrupted(project, name):
    script, args = next((s, a) for n, s, a in STAGES if n == name)
    reference = project.copy(name)
    for seed in SEEDS:
        project.restore(before(name))
        env, delay, where = kill_plan(name, seed, project.seconds[name])
        killed = project.run(script, *args, env=env, kill_after_s=delay)
        assert killed.returncode == -9 if delay is None else killed.returncode in (-9, 0), (
            f"{where}: {killed.stderr[-2000:]}")
        assert "Traceback" not in killed.stderr, killed.stderr
        finished = finished_units(name, project.root, reference)
        print(f"[{name} seed {seed}] killed {where}: exit {killed.returncode}, finished on disk: {finished}"
              if name not in ("head", "variance", "fusion") else
              f"[{name} seed {seed}] killed {where}: exit {killed.returncode}, epochs committed: {len(finished)}")
        kept, _ = project_files(project.root)
        kept = {rel: path for rel, path in kept.items() if (reference / rel).is_file()
                and not rewritten_by_design(name, rel, project.root) and _same(path, reference / rel)}
        kept_ids = file_ids(kept)

        rerun = project.run(script, *args)
        assert rerun.returncode == 0, f"{name} killed {where}: {rerun.stderr[-3000:]}"
        assert "Traceback" not in rerun.stderr
        temporary = assert_same_tree(project.root, reference)
        assert all(TMP_FILE.match(Path(t).name) for t in temporary)
        assert not list(project.root.rglob(".pending_epoch_*")), "pending epoch folders left behind"
        assert_rerun_did_only_the_rest(name, finished, rerun, project.root)
        assert file_ids({rel: project.root / rel for rel in kept}) == kept_ids, (
            f"{name} killed {where}: the rerun rewrote files the killed run had finished")
        project.assert_nothing_outside()


def _same(a: Path, b: Path) -> bool:
    try:
        assert_same_content(a, b, str(a))
        return True
    except Exception:  # a torn or unfinished file is simply not finished
        return False


# --------------------------------------------------------------------------- damaged artifacts
#
# The SAM cache shards and the packed HDF5 files are covered by tests/test_verified_reads.py.


def flip_bytes(path: Path, count: int = 4) -> None:
    """XOR ``count`` bytes in the middle of ``path``; in a zip archive (``torch.save``), in the middle of
    its largest member's data (flips in the alignment padding between members change nothing)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            info = max(archive.infolist(), key=lambda i: i.file_size)
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        middle = info.header_offset + 30 + name_len + extra_len + info.compress_size // 2
    for i in range(middle, middle + count):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def truncate_half(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


HEAD, VARIANCE, FUSION = (("train_head.py", "--model", model, *RUN, "--resume-if-exists")
                          for model in ("head", "variance", "fusion"))
#: (damaged file, damage, steps): each step is (command, expected) with expected "error" (exit 2, one line
#: ``error: ...`` naming the damaged file) or "ok" (exit 0). After the last "ok" step the project must
#: equal the uninterrupted one (the damage was detected and recomputed); after an "error" nothing
#: but the damaged file may differ from it.
DAMAGE = {
    "manifest_csv": ("manifests/train.csv", flip_bytes,
                     [(("generate_promptsets.py",), "error"), (("build_manifests.py",), "ok"),
                      (("generate_promptsets.py",), "ok")]),
    "promptset_json": ("prompt_sets/train/cats__s00.json", flip_bytes, [(("generate_promptsets.py",), "ok")]),
    "training_index": ("training_data/train_index.csv", flip_bytes,
                       [(("pack_to_hdf5.py",), "error"), (("build_training_indices.py",), "ok"),
                        (("pack_to_hdf5.py",), "ok")]),
    "head_checkpoint": ("checkpoints/head/run_v1/best.pt", flip_bytes,
                        [(HEAD, "error"), (VARIANCE, "error"), (("fit_laplace.py", *RUN), "error")]),
    "head_last_truncated": ("checkpoints/head/run_v1/last.pt", truncate_half, [(HEAD, "error")]),
    "variance_checkpoint": ("checkpoints/variance/run_v1/best.pt", flip_bytes,
                            [(VARIANCE, "error"), (("evaluate_uncertainty.py", *RUN), "error")]),
    "fusion_checkpoint": ("checkpoints/fusion/run_v1/best.pt", flip_bytes,
                          [(FUSION, "error"), (("evaluate_uncertainty.py", *RUN), "error")]),
    "laplace_posterior": ("laplace/head/run_v1/laplace_state.pt", flip_bytes,
                          [(("fit_laplace.py", *RUN), "ok"), (FUSION, "ok")]),
    "stage_fingerprint": ("prompt_sets/.stage.json", truncate_half,
                          [(("generate_promptsets.py",), "error"), (("generate_promptsets.py", "--force"), "ok")]),
    "resolved_config": ("manifests/config.resolved.yaml", flip_bytes, [(("build_manifests.py",), "ok")]),
    "evaluation_report": ("reports/eval/run_v1/per_mask.csv", flip_bytes,
                          [(("evaluate_uncertainty.py", *RUN), "ok")]),
    "evaluation_state": ("reports/eval/run_v1/state.pt", flip_bytes, [(("evaluate_uncertainty.py", *RUN), "ok")]),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_artifact_is_refused_naming_it_or_recomputed(project, kind):
    relative, damage, steps = DAMAGE[kind]
    reference = project.copy(STAGES[-1][0])
    project.restore(STAGES[-1][0])
    damage(project.root / relative)
    for command, expected in steps:
        result = project.run(*command)
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        if expected == "error":
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert result.returncode == 2 and lines[-1].startswith("error: "), result.stderr[-2000:]
            assert Path(relative).name in lines[-1], lines[-1]
        else:
            assert result.returncode == 0, f"{command}: {result.stderr[-3000:]}"
    if expected == "error":  # nothing else was touched
        got, _ = project_files(project.root)
        want, _ = project_files(reference)
        assert sorted(got) == sorted(want)
        for rel, path in got.items():
            if rel != relative:
                assert_same_content(path, want[rel], rel)
    else:
        assert_same_tree(project.root, reference)
    project.assert_nothing_outside()
