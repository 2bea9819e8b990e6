"""Run stage scripts as real subprocesses against a config written into a temporary folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

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


def run_stage(script: str, config: Path, *extra: str, env: dict | None = None, check: bool = True,
              timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    result = subprocess.run([sys.executable, str(REPO / script), "--config", str(config), *extra],
                            capture_output=True, text=True, cwd=REPO, env=full_env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result
