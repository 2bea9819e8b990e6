"""The trained runs the evaluation reads: their ids, their artifact files (md5s go into the stage
fingerprint) and the frozen models loaded from them on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from modules.core.config import PipelineConfig
from modules.core.errors import PipelineError
from modules.core.fileio import cached_file_md5
from modules.core.paths import checkpoint_run_dir, checkpoint_run_ids, laplace_run_dir
from modules.laplace.head import load_head_posterior
from modules.laplace.posterior import STATE_FILE as LAPLACE_STATE_FILE
from modules.sam.base import BackboneError
from modules.sam.registry import configured_checkpoint_md5, load_configured_backbone, verify_checkpoint_archive
from modules.training.checkpoints import load_trained_fusion, load_trained_head, load_trained_variance_network
from modules.training.run_state import BEST_FILE
from modules.uncertainty.fusion import SWITCH_FILE, RefinementSwitch


class EvaluationError(PipelineError):
    """An evaluation input is missing or inconsistent (the message names it)."""


@dataclass(frozen=True)
class RunIds:
    """The trained runs the evaluation reads (``--run_id`` for all, or one override each)."""

    head: str
    variance: str
    laplace: str
    fusion: str

    @classmethod
    def resolve(cls, run_id: str, head: str | None = None, variance: str | None = None,
                laplace: str | None = None, fusion: str | None = None) -> "RunIds":
        return cls(head or run_id, variance or run_id, laplace or run_id, fusion or run_id)

    def __str__(self) -> str:
        ids = {"head": self.head, "variance": self.variance, "laplace": self.laplace, "fusion": self.fusion}
        if len(set(ids.values())) == 1:
            return f"run id {self.head!r}"
        return "run ids " + ", ".join(f"{model} {run_id!r}" for model, run_id in ids.items())


def _head_path(cfg: PipelineConfig, runs: RunIds) -> Path:
    return checkpoint_run_dir(cfg.project_root, "head", runs.head) / BEST_FILE


def _variance_path(cfg: PipelineConfig, runs: RunIds) -> Path:
    return checkpoint_run_dir(cfg.project_root, "variance", runs.variance) / BEST_FILE


def _laplace_path(cfg: PipelineConfig, runs: RunIds) -> Path:
    return laplace_run_dir(cfg.project_root, cfg.laplace.target, runs.laplace) / LAPLACE_STATE_FILE


def _head_laplace_path(cfg: PipelineConfig, runs: RunIds) -> Path:
    """The head's own last-layer Laplace (what ``fusion.uncertainty_source: laplace_epistemic``
    reads in training and evaluation), whatever ``laplace.target`` the Laplace strategy scores."""
    return laplace_run_dir(cfg.project_root, "head", runs.head) / LAPLACE_STATE_FILE


def _fusion_path(cfg: PipelineConfig, runs: RunIds) -> Path:
    return checkpoint_run_dir(cfg.project_root, "fusion", runs.fusion) / BEST_FILE


def _fusion_switch_path(cfg: PipelineConfig, runs: RunIds) -> Path:
    return checkpoint_run_dir(cfg.project_root, "fusion", runs.fusion) / SWITCH_FILE


def trained_head_runs(cfg: PipelineConfig) -> list[str]:
    """The ids of the head runs stage 5 finished in ``cfg``'s project (those with a ``best.pt``),
    sorted; every fitted method reads one."""
    return checkpoint_run_ids(cfg.project_root, "head", BEST_FILE)


#: Artifact name -> the file it is loaded from (its md5 goes into the stage fingerprint).
ARTIFACT_FILES: dict[str, Callable[[PipelineConfig, RunIds], Path]] = {
    "sam_checkpoint": lambda cfg, runs: Path(cfg.sam.checkpoint),
    "head": _head_path,
    "variance": _variance_path,
    "laplace": _laplace_path,
    "head_laplace": _head_laplace_path,
    "fusion": _fusion_path,
    "fusion_switch": _fusion_switch_path,
}


class Artifacts:
    """The frozen models the strategies need, each loaded on first use (the loaders of
    ``training/checkpoints.py``, ``laplace/head.py`` and ``sam/registry.py``).

    ``device``: where the head, its posterior, the variance network and the fusion module run
    (``training.device``); the backbone runs on ``sam.device``.
    """

    def __init__(self, cfg: PipelineConfig, runs: RunIds, device: torch.device) -> None:
        self.cfg, self.runs, self.device = cfg, runs, device

    @cached_property
    def backbone(self):
        sam = self.cfg.sam
        try:
            return load_configured_backbone(sam)
        except BackboneError as exc:
            raise EvaluationError(str(exc)) from None

    @cached_property
    def head(self):
        head, _ = load_trained_head(self.cfg, self.runs.head, self.device)
        return head

    @cached_property
    def posterior(self):
        """The head Laplace posterior of ``runs.laplace`` (the Laplace strategy, target ``head``)."""
        if self.runs.laplace == self.runs.head:
            return self.head_posterior  # loaded once when the refinement reads it too
        _, posterior = load_head_posterior(self.cfg, self.runs.laplace, self.device)
        return posterior

    @cached_property
    def head_posterior(self):
        """The Laplace posterior fitted on the head of ``runs.head`` (the fusion's uncertainty source)."""
        _, posterior = load_head_posterior(self.cfg, self.runs.head, self.device)
        return posterior

    @cached_property
    def variance_network(self):
        return load_trained_variance_network(self.cfg, self.runs.variance, self.device)

    @cached_property
    def fusion(self):
        return load_trained_fusion(self.cfg, self.runs.fusion, self.device)

    @cached_property
    def fusion_switch(self) -> RefinementSwitch:
        """The fusion run's validated refinement switch (``fusion.gate: validated``)."""
        try:
            return RefinementSwitch.load(checkpoint_run_dir(self.cfg.project_root, "fusion", self.runs.fusion))
        except PipelineError as error:
            raise EvaluationError(str(error)) from None


def artifact_md5s(cfg: PipelineConfig, runs: RunIds, names: set[str]) -> dict[str, str]:
    """``name -> md5`` of each needed artifact file; a missing or damaged one (a member of its zip
    archive fails its CRC-32) is a one-line error naming it, before any fingerprint is compared: a
    damaged file must not read as a changed input that ``--force`` would accept."""
    hashes = {}
    for name in sorted(names):
        path = ARTIFACT_FILES[name](cfg, runs)
        if name == "sam_checkpoint" and path.is_dir():  # a Hugging Face model folder
            hashes[name] = configured_checkpoint_md5(path)
            continue
        if not path.is_file():
            raise EvaluationError(f"{path}: missing {name} artifact needed by evaluation.strategies / "
                                  "evaluation.refinement; run its stage first (or pick other run ids)")
        try:
            verify_checkpoint_archive(path)
        except BackboneError as error:
            if name == "sam_checkpoint":
                raise
            raise EvaluationError(str(error).split(";")[0] + f"; rerun the stage that wrote this {name} "
                                  "artifact with --force, or restore the file") from None
        hashes[name] = cached_file_md5(path)
    return hashes
