"""Stage 7: score every uncertainty strategy and the fusion refinement per domain, and write the
reports (``evaluate_uncertainty.py``).

Units are samples; the scoreboard (accumulators, per-mask rows, finished samples) is checkpointed to
``state.pt`` often enough to cost at most ``CHECKPOINT_MAX_OVERHEAD`` of the run, so a killed run
resumes after its last checkpointed sample, never counting one twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from modules.cache.training_index import open_cache
from modules.core.config import unseen_group_keys
from modules.core.device import resolve_device
from modules.core.fileio import file_md5, remove_file
from modules.core.paths import manifest_path
from modules.data.domains import checked_unseen_groups
from modules.evaluation import reports
from modules.evaluation.methods import (REFINEMENT_VARIANTS, UNREFINED_BASELINE, Predictor, method_names,
                                        needed_artifacts)
from modules.evaluation.runs import Artifacts, EvaluationError, RunIds, artifact_md5s
from modules.evaluation.samples import EvalUnit, list_eval_units, load_sample
from modules.evaluation.scoreboard import STATE_FILE, Scoreboard, load_state_file, save_state

#: Checkpoint the state after a sample once the time since the last checkpoint is at least
#: ``last checkpoint duration / CHECKPOINT_MAX_OVERHEAD``.
CHECKPOINT_MAX_OVERHEAD = 0.1


class CheckpointPolicy:
    """Checkpoint after a sample when the time since the last checkpoint is at least
    ``last checkpoint duration / max_overhead`` (the first sample always checkpoints)."""

    def __init__(self, max_overhead: float = CHECKPOINT_MAX_OVERHEAD) -> None:
        self.max_overhead = max_overhead
        self.last_end = time.perf_counter()
        self.last_duration = 0.0

    def due(self) -> bool:
        return time.perf_counter() - self.last_end >= self.last_duration / self.max_overhead

    def record(self, started: float) -> None:
        self.last_end = time.perf_counter()
        self.last_duration = self.last_end - started


@dataclass
class QualitativeSelection:
    """The first ``per_domain`` samples of each domain (in unit order) get qualitative panels."""

    per_domain: int
    chosen: set[str] = field(default_factory=set)

    @classmethod
    def from_units(cls, units: list[EvalUnit], per_domain: int) -> "QualitativeSelection":
        counts: dict[str, int] = {}
        selection = cls(per_domain)
        for unit in units:
            if counts.get(unit.group, 0) < per_domain:
                counts[unit.group] = counts.get(unit.group, 0) + 1
                selection.chosen.add(unit.safe_id)
        return selection


def fingerprint_sections() -> list[str]:
    """Config keys whose change invalidates the reports (device and worker settings do not)."""
    return ["evaluation", "sam.family", "sam.model_type", "sam.prompt_mode", "sam.multimask_policy", "laplace",
            "fusion", "head", "variance", "training.logit_clip", "training.seed", "data.mask_threshold"]


def run_stage(ctx, runs: RunIds) -> None:
    """Evaluate every configured method on ``evaluation.split`` and write the reports (module docstring)."""
    cfg = ctx.cfg
    folder = ctx.output_dir
    split_manifest = manifest_path(cfg.project_root, cfg.evaluation.split)
    units = list_eval_units(cfg)
    upstream = {"checkpoints": artifact_md5s(cfg, runs, needed_artifacts(cfg)),
                "split_manifest": file_md5(split_manifest)}
    fresh = ctx.check_inputs([*fingerprint_sections(), *unseen_group_keys(cfg)], upstream)
    state_path = folder / STATE_FILE
    if fresh:
        reports.remove_reports(folder)
        remove_file(state_path, folder)

    device = resolve_device(cfg.training.device, key="training.device")
    scoreboard = Scoreboard(cfg.evaluation.ece_bins, device, checked_unseen_groups(cfg),
                            cfg.evaluation.mask_quality_band)
    previous = None if fresh else load_state_file(state_path)
    if previous is not None:
        scoreboard.load_state(previous)
    done = set(scoreboard.done)
    remaining = [unit for unit in units if unit.safe_id not in done]
    if not remaining and reports.reports_complete(folder):
        print(f"[{ctx.name}] {folder}: all {len(units)} samples evaluated and reports written; skipped")
        ctx.summary({"skipped": True, "samples": len(units)})
        return
    print(f"[{ctx.name}] {len(units)} samples of {cfg.evaluation.split!r} ({len(done)} done before), "
          f"methods: {', '.join(method_names(cfg))}")

    artifacts = Artifacts(cfg, runs, device)
    predictor: Predictor | None = None  # built on the first sample that needs work
    cache = open_cache(cfg) if remaining else None
    qualitative = QualitativeSelection.from_units(units, cfg.evaluation.qualitative_per_domain)
    checkpoints = CheckpointPolicy()
    methods = method_names(cfg)

    def process(unit: EvalUnit) -> None:
        nonlocal predictor
        if predictor is None:
            predictor = Predictor(cfg, artifacts)
        sample = load_sample(cfg, cache, unit)
        with torch.inference_mode():
            outputs = predictor.predict(sample)
            scored = scoreboard.score_sample(sample, outputs)
        if unit.safe_id in qualitative.chosen:
            reports.write_qualitative_panels(folder, sample, scored, methods)
        if checkpoints.due():
            started = time.perf_counter()
            save_state(state_path, scoreboard)
            checkpoints.record(started)

    counts = ctx.run_units(units, lambda unit: unit.safe_id in done, process, desc="evaluating",
                           unit_name=lambda unit: unit.safe_id)
    save_state(state_path, scoreboard)
    for name, reason in counts.failures[:10]:
        print(f"  failed: {name}: {reason}")
    if not scoreboard.done:
        raise EvaluationError(f"{folder}: no sample could be evaluated ({counts.failed} failed)")
    written = reports.write_reports(folder, scoreboard, methods, list(REFINEMENT_VARIANTS), UNREFINED_BASELINE,
                                    ctx.tracker, reports.BootstrapSettings.from_config(cfg))
    ctx.summary({"samples": len(scoreboard.done), "masks": len(scoreboard.rows), **counts.as_dict(),
                 **written})
    if counts.failed:
        raise EvaluationError(f"{folder}: {counts.failed} samples failed (listed above); the reports cover the "
                              f"{len(scoreboard.done)} others; fix the inputs and rerun to add them")
