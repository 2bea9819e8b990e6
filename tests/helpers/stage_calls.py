"""Stage scripts called in this process or as subprocesses, and project copies whose files are hashed:
the machinery of ``tests/test_bad_inputs.py``."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from modules.data.manifest_checksums import record_manifest_checksums
from tests.conftest import small_demo_config
from tests.stage_runner import REPO

#: Overrides of ``small_demo_config`` for the smallest demo: three scenes per group, one per split.
SMALL = {"demo.scenes_per_group": 3, "prompt_generation.num_promptsets_train": 2,
         "prompt_generation.num_promptsets_val": 1, "prompt_generation.num_promptsets_test": 1,
         "prompt_generation.max_pairs": 2, "training.num_epochs": 1}


# --------------------------------------------------------------------------- running stages


_SCRIPTS: dict[str, object] = {}


def script_module(name: str):
    """The top-level script ``<name>.py`` imported as a module (once per test process)."""
    if name not in _SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"stage_script_{name}", REPO / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPTS[name] = module
    return _SCRIPTS[name]


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def call_stage(name: str, *argv: str) -> Outcome:
    """Run ``<name>.py`` with ``argv`` in this process, as its ``__main__`` would, and capture its
    exit code and output. What the stage changes in this process (logging handlers, the
    ``MPLCONFIGDIR`` it points into its project root) is put back afterwards."""
    out, err = io.StringIO(), io.StringIO()
    handlers = list(logging.root.handlers)
    saved_argv, saved_environ, code = sys.argv, dict(os.environ), 0
    sys.argv = [f"{name}.py", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                script_module(name).main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved_argv
        logging.root.handlers[:] = handlers
        os.environ.clear()
        os.environ.update(saved_environ)
    return Outcome(code, out.getvalue(), err.getvalue())


def run_subprocess(name: str, *argv: str) -> Outcome:
    env = {**os.environ, "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, str(REPO / f"{name}.py"), *argv], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=300)
    return Outcome(result.returncode, result.stdout, result.stderr)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error_line(outcome: Outcome, *expected: str) -> str:
    """Exit code 2, no traceback, exactly one ``error:`` line, the last line of stderr, holding every
    ``expected`` text."""
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert outcome.code == 2, (outcome.code, outcome.stderr[-3000:])
    lines = error_lines(outcome.stderr)
    assert len(lines) == 1, outcome.stderr[-3000:]
    assert outcome.stderr.rstrip("\n").splitlines()[-1] == lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- projects


def file_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> md5 of every file under ``folder`` (symlinks as their target text)."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            hashes[key] = "link:" + os.readlink(path)
        elif path.is_file():
            hashes[key] = hashlib.md5(path.read_bytes()).hexdigest()
    return hashes


@dataclass
class Workspace:
    """A case's folder: ``config.yaml``, ``data/`` and ``project/`` (the project root)."""

    folder: Path

    @property
    def config(self) -> Path:
        return self.folder / "config.yaml"

    @property
    def root(self) -> Path:
        return self.folder / "project"

    def outside_root(self) -> dict[str, str]:
        return {k: v for k, v in file_hashes(self.folder).items() if not k.startswith("project")}

    def manifest(self, name: str) -> pd.DataFrame:
        return pd.read_csv(self.root / "manifests" / f"{name}.csv", keep_default_na=False)

    def first_promptset(self) -> Path:
        return sorted((self.root / "prompt_sets" / "train").glob("*.json"))[0]


def build_staged(folder: Path) -> Workspace:
    folder.mkdir(parents=True)
    config = small_demo_config(folder, SMALL)
    for stage in ("build_manifests", "generate_promptsets"):
        outcome = call_stage(stage, "--config", str(config))
        assert outcome.code == 0, outcome.stderr[-3000:]
    return Workspace(folder)


def copy_workspace(source: Workspace, folder: Path) -> Workspace:
    """A copy whose config points at its own data and project (manifests still name the source's
    data files, which no case changes)."""
    shutil.copytree(source.folder / "project", folder / "project", symlinks=True)
    shutil.copytree(source.folder / "data", folder / "data", symlinks=True)
    small_demo_config(folder, SMALL)
    return Workspace(folder)


def keep_first_rows(workspace: Workspace, train: int, val: int, test: int) -> None:
    """Cut the split manifests to their first rows, so that later stages have few images to compute."""
    for split, rows in (("train", train), ("val", val), ("test", test)):
        path = workspace.root / "manifests" / f"{split}.csv"
        frame = pd.read_csv(path, keep_default_na=False, dtype={"stem": str, "group": str})
        path.write_text(frame.head(rows).to_csv(index=False), encoding="utf-8")
        record_manifest_checksums([path])  # as if stage 1 had written the cut manifest
