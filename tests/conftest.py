"""Session fixtures: the demo pipeline run once, at small scale, through the real stage scripts.

``packed_project``   demo data (6 scenes per group), stages 1-4.5 with the shipped demo backbone.
``trained_project``  + the MAP head (run ``v1``), the variance network (``v1``) and the Laplace (``v1``).
``fusion_project``   + the dense embedding fusion module (``v1``).

Each fixture returns a ``PipelineProject``; tests that write must use their own run ids or copy
the project, so the shared folders stay as the fixtures left them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from modules.core.config import apply_overrides, load_config
from tests.stage_runner import REPO, run_stage

DEMO_CHECKPOINT = REPO / "assets" / "demo_backbone" / "demo_tiny.pt"


@dataclass
class PipelineProject:
    folder: Path
    config: Path

    @property
    def root(self) -> Path:
        return self.folder / "project"

    def run(self, script: str, *args: str, **kwargs):
        return run_stage(script, self.config, *args, **kwargs)

    def load_config(self, *overrides: str):
        return load_config(self.config, list(overrides))


#: Stages 1-4.5: what every later stage reads.
PREPARE_STAGES = ("build_manifests.py", "generate_promptsets.py", "precompute_sam_outputs.py",
                  "build_training_indices.py", "pack_to_hdf5.py")


def small_demo_config(folder: Path, overrides: dict | None = None) -> Path:
    """The small demo config in ``folder``; ``overrides`` maps dotted keys (``"demo.scenes_per_group"``)
    to values."""
    import yaml

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["data"].update(images_root=str(folder / "data" / "images"), masks_root=str(folder / "data" / "masks"),
                          project_root=str(folder / "project"))
    config["demo"].update(scenes_per_group=6)
    # The shared fixtures fit on every group (what the other tests' figures assume); the unseen-domain
    # protocol runs on its own copy in tests/test_unseen_domains.py.
    config["data"].update(unseen_groups=[])
    config["prompt_generation"].update(num_promptsets_train=3, num_promptsets_val=2, num_promptsets_test=2,
                                       max_pairs=4)
    config["sam"].update(checkpoint=str(DEMO_CHECKPOINT), device="cpu", num_workers=0)
    # lr 1e-3 (the seed's): with the demo's 5e-3 the fixture's ~70 training rows are overfitted
    # after one epoch and the variance network learns the wrong sign of that head's errors.
    config["training"].update(num_epochs=4, lr=1e-3, batch_size=8, num_workers=0, device="cpu",
                              early_stop_patience=10)
    # The seed head: at lr 1e-3 the default residual head barely moves in 4 epochs, its guard keeps
    # raw SAM, and the variance network trained on raw SAM misses the margin the tests assume
    # (README, "The head against raw SAM"); tests/test_head_guard.py sets head.residual itself.
    config["head"].update(residual=False)
    config["laplace"].update(num_samples=8)
    config["fusion"].update(num_epochs=2, max_train_rows=16)
    config["evaluation"]["tta"].update(transforms=["hflip", "rot90", "brightness"])
    config["evaluation"]["prompt_perturbation"].update(num_samples=3)
    config["evaluation"].update(qualitative_per_domain=1)
    config["evaluation"]["active_prompting"].update(enabled=False)  # tests/test_click_simulation.py turns it on
    config["wandb"].update(enabled=False)
    # JSON is YAML: the pipeline's own ``--set`` parser reads each value back unchanged.
    apply_overrides(config, [f"{dotted}={json.dumps(value)}" for dotted, value in (overrides or {}).items()])
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def prepared_demo_project(folder: Path, overrides: dict | None = None, env: dict | None = None) -> PipelineProject:
    """A small demo project (``small_demo_config`` with ``overrides``) run through ``PREPARE_STAGES``.
    Skips the test when the config still names the bundled demo backbone and it is missing."""
    config = small_demo_config(folder, overrides)
    if "sam.checkpoint" not in (overrides or {}) and not DEMO_CHECKPOINT.is_file():
        pytest.skip(f"{DEMO_CHECKPOINT} is missing (tools/train_demo_backbone.py makes it)")
    project = PipelineProject(folder, config)
    for script in PREPARE_STAGES:
        project.run(script, env=env)
    return project


@pytest.fixture(scope="session")
def packed_project(tmp_path_factory) -> PipelineProject:
    return prepared_demo_project(tmp_path_factory.mktemp("pipeline"))


@pytest.fixture(scope="session")
def trained_project(packed_project) -> PipelineProject:
    packed_project.run("train_head.py", "--model", "head", "--run_id", "v1")
    packed_project.run("train_head.py", "--model", "variance", "--run_id", "v1")
    packed_project.run("fit_laplace.py", "--run_id", "v1")
    return packed_project


@pytest.fixture(scope="session")
def fusion_project(trained_project) -> PipelineProject:
    trained_project.run("train_head.py", "--model", "fusion", "--run_id", "v1")
    return trained_project


#: The fixtures above: every test that uses one of them runs on the same xdist worker.
PIPELINE_FIXTURES = {"packed_project", "trained_project", "fusion_project"}
#: The other files that take minutes (their own demo projects or SAM models; ``.ci/run --durations=50``
#: lists them), longest first: they start next, so no worker is left with a long file at the end.
LONG_FILES = ("test_sam2_pipeline.py", "test_train_and_laplace.py", "test_stale_inputs.py", "test_fault_injection.py",
              "test_backbones.py", "test_unseen_domains.py", "test_demo_backbone.py", "test_verified_reads.py",
              "test_train_demo_backbone.py")


def xdist_group_name(fixture_names, file_name: str) -> str:
    """``pipeline`` for a test that uses a pipeline fixture (directly or through another fixture),
    else its file's name: the session fixtures are built on one worker only, and a file's other
    tests, with their module fixtures, run together on one worker, in parallel with that one."""
    return "pipeline" if PIPELINE_FIXTURES & set(fixture_names) else file_name


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Group the tests for ``pytest -n N --dist loadgroup`` (tools/run_tests.sh, ``xdist_group_name``).
    The ``pipeline`` group is the longest, so it goes first, then the tests of ``LONG_FILES``.
    ``tryfirst``: pytest-xdist's worker reads the ``xdist_group`` marks in this same hook, and a
    mark added after it has read them is ignored."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(xdist_group_name(item.fixturenames, item.path.name)))

    def start_order(item) -> tuple[bool, int]:  # stable sort: file order is kept otherwise
        name = item.path.name
        pipeline = xdist_group_name(item.fixturenames, name) == "pipeline"
        return not pipeline, LONG_FILES.index(name) if name in LONG_FILES else len(LONG_FILES)

    items.sort(key=start_order)


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    """Few cores: the CPUs are shared out among the xdist workers, and this process and the stage
    processes its tests spawn use the same count (``OMP_NUM_THREADS``, kept if already set)."""
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    yield


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Tests that call a tool's ``main`` in-process (benchmarks set ``--threads``) must not change
    the thread count of the tests after them: tests that compare an in-process result with a stage
    subprocess's bit for bit rely on both using the same count (``OMP_NUM_THREADS`` above)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
