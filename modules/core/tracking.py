"""Experiment tracking: one Weights & Biases run per stage, or a no-op.

``wandb.enabled: false`` gives a ``NullTracker`` and never imports wandb (so nothing touches the
network). Enabled runs default to offline mode and keep every file wandb writes (run folder,
cache, config, artifacts) under ``<project_root>/wandb``. In online mode a failed or slow
connection falls back to offline after ``wandb.init_timeout_s`` instead of hanging.

Lineage (``core.lineage``): stages log their outputs as artifacts and declare the artifacts they read
with ``use_artifact``. wandb records an input only online (an offline run cannot: wandb refuses
``use_artifact`` offline because the input is looked up on the server), so offline runs keep the
declared inputs in their config (``lineage/inputs``) instead.
The default ``group`` (``default_group``) is derived from the resolved project root, so the stages of
one project share a group and two projects never do.
"""

from __future__ import annotations

import hashlib
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

    def log_artifact(self, path, name: str, type: str, aliases: list[str] | None = None,
                     root: str | os.PathLike | None = None) -> None:
        pass

    def use_artifact(self, name: str, type: str) -> None:
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
        self._declared: list[str] = []

    def log(self, metrics, step=None):
        self._run.log(dict(metrics), step=step)

    def log_table(self, name, frame):
        self._run.log({name: self._wandb.Table(dataframe=frame.reset_index(drop=True))})

    def log_image(self, name, path):
        self._run.log({name: self._wandb.Image(str(path))})

    def log_artifact(self, path, name, type, aliases=None, root=None):
        """``path``: a folder, a file, or a list of files (named relative to ``root``)."""
        artifact = self._wandb.Artifact(name=name, type=type)
        if isinstance(path, (list, tuple)):
            for file in path:
                artifact.add_file(str(file), name=Path(file).relative_to(root).as_posix() if root else Path(file).name)
        elif Path(path).is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self._run.log_artifact(artifact, aliases=aliases or [])

    def use_artifact(self, name, type):
        """Declare ``name:latest`` an input of this run (offline: listed in the config, see the module doc)."""
        if self._run.offline:
            self._declared.append(f"{name}:latest")
            self._run.config.update({"lineage/inputs": list(self._declared)}, allow_val_change=True)
            return
        try:
            self._run.use_artifact(f"{name}:latest", type=type)
        except Exception as exc:  # not on the server (its stage ran offline or without W&B): keep going
            log.warning("wandb: input artifact %s:latest not found (%s); lineage lacks it", name, exc)

    def watch(self, model):
        self._run.watch(model, log="all", log_freq=100)

    def summary(self, values):
        for key, value in values.items():
            self._run.summary[key] = value

    def finish(self):
        """Close the run; when this returns its records are on disk (``run-*.wandb``, artifacts)."""
        self._run.finish()
        # finish() returns before wandb's service has written the offline transaction log (seen: a
        # header-only file right after it); shutting the service down waits for the writer. Every stage
        # is its own process and would shut it down at exit anyway, and a later init starts a new one.
        self._wandb.teardown()


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


def default_group(project_root: Path) -> str:
    """``pipeline-<folder name>-<8 hex digits of the resolved root's path>``: one per project."""
    root = Path(project_root).resolve()
    return f"pipeline-{root.name}-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}"


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

    group = wandb_cfg.group or default_group(project_root)
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
