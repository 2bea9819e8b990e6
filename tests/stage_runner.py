"""Run stage scripts as real subprocesses against a config written into a temporary folder.

Each run is its own process, with its own environment, arguments and exit code. By default it is
forked from a server that has already imported torch, torchvision and the SAM packages, one per test
process (``tests/helpers/forked_stages.py``, preload set ``libraries``): that saves 7-12 s of imports
per run on the 2-core CI machine. A run whose environment changes what those libraries read at
start-up starts a fresh interpreter instead, and so does every run under ``STAGE_RUNNER_FORK=0``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tests.helpers.forked_stages import StageServer

REPO = Path(__file__).resolve().parents[1]



def write_config(folder: Path, images_root: Path, masks_root: Path | None, overrides: dict | None = None) -> Path:
    """A config whose project root is ``folder / 'project'``, W&B disabled unless overridden."""
    config = {
        "data": {"images_root": str(images_root), "masks_root": str(masks_root) if masks_root else None,
                 "project_root": str(folder / "project"), "min_image_side": 16},
        "demo": {"enabled": False},
        "prompt_generation": {"num_promptsets_train": 3, "num_promptsets_val": 2, "num_promptsets_test": 2,
                              "max_pairs": 4},
        "wandb": {"enabled": False},
    }
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


_SERVER: StageServer | None = None


def _stage_server() -> StageServer | None:
    """This process's fork server (``preload="libraries"``), started on first use; None when
    ``STAGE_RUNNER_FORK=0``."""
    global _SERVER
    if os.environ.get("STAGE_RUNNER_FORK", "1") == "0":
        return None
    if _SERVER is None or _SERVER.process.poll() is not None:
        logs = Path(tempfile.mkdtemp(prefix="stage-runs-"))
        _SERVER = StageServer(logs, preload="libraries")
        atexit.register(shutil.rmtree, logs, ignore_errors=True)
        atexit.register(_SERVER.close)
    return _SERVER


def run_stage(script: str, config: Path, *extra: str, env: dict | None = None, check: bool = True,
              timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    command = [sys.executable, str(REPO / script), "--config", str(config), *extra]
    server = _stage_server()
    if server is not None and server.accepts(full_env):
        run = server.run(script, config, *extra, env=full_env, timeout=timeout)
        result = subprocess.CompletedProcess(command, run.returncode, run.stdout, run.stderr)
    else:
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
