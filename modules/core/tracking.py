"""Experiment tracking: one Weights & Biases run per stage, or a no-op.

``wandb.enabled: false`` gives a ``NullTracker`` and never imports wandb (so nothing touches the
network). Enabled runs default to offline mode and keep every file wandb writes (run folder,
cache, config, artifacts) under ``<project_root>/wandb``. In online mode a failed or slow
connection falls back to offline after ``wandb.init_timeout_s`` instead of hanging.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class NullTracker:
    """The tracker used when W&B is disabled: every call is accepted and does nothing."""

    enabled = False
    run_dir: Path | None = None

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_table(self, name: str, frame) -> None:
        pass

    def log_image(self, name: str, path: str | os.PathLike) -> None:
        pass

    def log_artifact(self, path, name: str, type: str, aliases: list[str] | None = None) -> None:
        pass

    def watch(self, model) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbTracker(NullTracker):
    enabled = True

    def __init__(self, run, wandb_module):
        self._run = run
        self._wandb = wandb_module
        self.run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None

    def log(self, metrics, step=None):
        self._run.log(dict(metrics), step=step)

    def log_table(self, name, frame):
        self._run.log({name: self._wandb.Table(dataframe=frame.reset_index(drop=True))})

    def log_image(self, name, path):
        self._run.log({name: self._wandb.Image(str(path))})

    def log_artifact(self, path, name, type, aliases=None):
        artifact = self._wandb.Artifact(name=name, type=type)
        path = Path(path)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self._run.log_artifact(artifact, aliases=aliases or [])

    def watch(self, model):
        self._run.watch(model, log="all", log_freq=100)

    def summary(self, values):
        for key, value in values.items():
            self._run.summary[key] = value

    def finish(self):
        self._run.finish()


def wandb_environment(project_root: Path) -> dict[str, str]:
    """Environment variables that keep every wandb file inside the project root."""
    root = Path(project_root) / "wandb"
    return {
        "WANDB_DIR": str(root),
        "WANDB_CACHE_DIR": str(root / "cache"),
        "WANDB_CONFIG_DIR": str(root / "config"),
        "WANDB_DATA_DIR": str(root / "data"),
        "WANDB_ARTIFACT_DIR": str(root / "artifacts"),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
    }


def start_tracker(wandb_cfg, stage: str, project_root: Path, config: dict) -> NullTracker:
    """Open the W&B run of one stage (``job_type`` = stage name, shared ``group``)."""
    if not wandb_cfg.enabled or wandb_cfg.mode == "disabled":
        return NullTracker()
    env = wandb_environment(project_root)
    for path in env.values():
        if path.startswith(str(project_root)):
            Path(path).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    import wandb

    group = wandb_cfg.group or f"pipeline-{Path(project_root).name}"
    kwargs = dict(
        project=wandb_cfg.project,
        entity=wandb_cfg.entity,
        group=group,
        job_type=stage,
        name=f"{stage}",
        config=config,
        dir=env["WANDB_DIR"],
        reinit="finish_previous",
    )
    settings = wandb.Settings(init_timeout=wandb_cfg.init_timeout_s, silent=True, console="off")
    try:
        run = wandb.init(mode=wandb_cfg.mode, settings=settings, **kwargs)
    except Exception as exc:  # network down or slow: keep the run locally instead of failing
        if wandb_cfg.mode != "online":
            raise
        log.warning("wandb online init failed (%s); logging offline under %s", exc, env["WANDB_DIR"])
        run = wandb.init(mode="offline", settings=settings, **kwargs)
    return WandbTracker(run, wandb)
