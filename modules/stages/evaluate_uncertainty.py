"""Stage 7: score every uncertainty strategy and the fusion refinement per domain, and write the
reports (``evaluate_uncertainty.py``).

Units are samples; the scoreboard (accumulators, per-mask rows, finished samples) is checkpointed to
``state.pt`` often enough to cost at most ``CHECKPOINT_MAX_OVERHEAD`` of the run, so a killed run
resumes after its last checkpointed sample, never counting one twice.

Sharded (``--num-shards/--shard-index``, torchrun or a SLURM array: ``core.stage.resolve_shard``),
shard i of n scores the samples ``Shard.select`` gives it, with its own fingerprint, state and lock
under ``shards/`` (``shard-III-of-NNN.pt``), writes its qualitative panels, and when it has gone
through all its samples writes ``shard-III-of-NNN.done.json`` (its state's md5). The shard that
finds every ``.done.json`` of the n shards (the last to finish) merges their states
(``Scoreboard.merge``, then rows and accumulators in unit order) and writes the reports, which equal
a one-process run's; ``--merge`` does the same on its own (after a job array) and names the shards
still missing.

With ``evaluation.active_prompting.enabled``, after scoring its samples a run (or shard) simulates the
interactive segmentation on them (``interactive.simulation``): each image's click trace is written
atomically to ``active_prompting/units/<safe_id>.csv`` (``core.paths.click_trace_path``) and counts
as done once written (``evaluation.active_prompting.batch_images`` unfinished images are simulated
together, each trace written as soon as its batch finishes); the one-process run (or the merge)
concatenates the traces in unit order and writes the click reports
(``interactive.click_metrics.write_click_reports``) before the others.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from modules.cache.sam_cache import SAM_OUTPUT_KEYS, encoder_weight_inputs
from modules.cache.training_index import open_cache
from modules.core.config import unseen_group_keys
from modules.core.device import resolve_device
from modules.core.fileio import atomic_write_csv, atomic_write_json, file_md5, read_json, remove_file, remove_tree
from modules.core.locks import OutputLocked
from modules.core.paths import ACTIVE_PROMPTING_DIR, FINGERPRINT_FILE, click_trace_path, manifest_path
from modules.core.stage import KillSwitch, Shard, UnitCounts, UnitError
from modules.data.domains import checked_unseen_groups
from modules.evaluation import reports
from modules.evaluation.methods import (REFINEMENT_VARIANTS, UNREFINED_BASELINE, Predictor, method_names,
                                        needed_artifacts, refinement_gate_note)
from modules.evaluation.runs import ARTIFACT_FILES, Artifacts, EvaluationError, RunIds, artifact_md5s
from modules.evaluation.samples import EvalUnit, list_eval_units, load_sample
from modules.evaluation.scoreboard import STATE_FILE, Scoreboard, load_state_file, save_state
from modules.interactive.click_metrics import TRACE_COLUMNS, remove_click_reports, write_click_reports
from modules.interactive.simulation import SimulationError, simulated_units, simulation_artifacts, trace_runner

log = logging.getLogger("pipeline")

#: Folder (in the report folder) of the shards' states, fingerprints and completion markers.
SHARDS_DIR = "shards"
_SHARD_FILE = re.compile(r"shard-(\d{3})-of-(\d{3})\.done\.json")

#: Tests set this to SIGKILL the stage once it has written the click traces of n images.
KILL_AFTER_CLICK_IMAGES_ENV = "PIPELINE_TEST_KILL_AFTER_CLICK_IMAGES"

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


def fingerprint_sections(cfg) -> list[str]:
    """Config keys whose change invalidates the reports (device and worker settings do not)."""
    return ["evaluation", *SAM_OUTPUT_KEYS, "laplace", "fusion", "head", "variance", "training.logit_clip",
            "training.seed", "data.mask_threshold", *unseen_group_keys(cfg)]


def new_scoreboard(cfg, device: torch.device) -> Scoreboard:
    """An empty scoreboard with the run's unseen groups (checked) and mask-quality band."""
    return Scoreboard(cfg.evaluation.ece_bins, device, checked_unseen_groups(cfg), cfg.evaluation.mask_quality_band)


def shard_stem(shard: Shard) -> str:
    return f"shard-{shard.index:03d}-of-{shard.count:03d}"


def shard_paths(folder: Path, shard: Shard) -> tuple[Path, Path, str]:
    """(state file, completion marker, fingerprint file relative to ``folder``) of one shard."""
    stem = shard_stem(shard)
    return (folder / SHARDS_DIR / f"{stem}.pt", folder / SHARDS_DIR / f"{stem}.done.json",
            f"{SHARDS_DIR}/{stem}{FINGERPRINT_FILE}")


def stage_upstream(cfg, runs: RunIds) -> dict:
    scored = needed_artifacts(cfg)
    simulated = simulation_artifacts(cfg)
    for name in sorted(simulated - scored):
        path = ARTIFACT_FILES[name](cfg, runs)
        if not path.exists():
            raise SimulationError(f"{path}: missing {name} artifact needed by evaluation.active_prompting.policies "
                                  "/ .mask_method; run its stage first, or leave out the policies that read it")
    return {"checkpoints": artifact_md5s(cfg, runs, scored | simulated),
            "split_manifest": file_md5(manifest_path(cfg.project_root, cfg.evaluation.split)),
            **encoder_weight_inputs(cfg.sam.encoder_int8)}  # TTA encodes its augmented images


def run_stage(ctx, runs: RunIds, shard: Shard = Shard(), merge_only: bool = False) -> None:
    """Evaluate every configured method on ``evaluation.split`` and write the reports (module
    docstring); ``shard``: score only this shard's samples, then merge if every shard is done;
    ``merge_only``: only merge the shards' states (``shard.count`` shards) into the reports."""
    if merge_only:
        merge_shards(ctx, runs, shard.count, required=True)
    elif shard.count > 1:
        run_shard(ctx, runs, shard)
    else:
        run_one_process(ctx, runs)


def run_one_process(ctx, runs: RunIds) -> None:
    cfg = ctx.cfg
    folder = ctx.output_dir
    units = list_eval_units(cfg)
    fresh = ctx.check_inputs(fingerprint_sections(cfg), stage_upstream(cfg, runs))
    state_path = folder / STATE_FILE
    if fresh:
        reports.remove_reports(folder)
        remove_file(state_path, folder)
        remove_tree(folder / ACTIVE_PROMPTING_DIR, folder)
    merged = not fresh and not state_path.is_file() and _merged_from(folder) is not None
    scoreboard, counts = (None, None) if merged and reports.reports_complete(folder) else \
        evaluate_units(ctx, runs, units, units, state_path, fresh)
    if scoreboard is None:
        log.info("[%s] %s: all %d samples evaluated and reports written; skipped", ctx.name, folder, len(units))
        ctx.summary({"skipped": True, "samples": len(units)})
        return
    if not scoreboard.done:
        raise EvaluationError(f"{folder}: no sample could be evaluated ({counts.failed} failed)")
    click_counts = simulate_units(ctx, runs, units, units)
    click_report = write_click_outputs(ctx, units)
    write_stage_reports(ctx, runs, scoreboard, {**counts.as_dict(), **click_counts.as_dict("clicks_")}, click_report)
    if counts.failed:
        raise EvaluationError(f"{folder}: {counts.failed} samples failed (listed above); the reports cover the "
                              f"{len(scoreboard.done)} others; fix the inputs and rerun to add them")
    if click_counts.failed:
        raise EvaluationError(f"{folder}: the click simulation failed on {click_counts.failed} samples (listed "
                              "above); fix the inputs and rerun to add them")


def run_shard(ctx, runs: RunIds, shard: Shard) -> None:
    """Score this shard's samples into its own state, mark it done, and merge when every shard is."""
    cfg = ctx.cfg
    folder = ctx.output_dir
    all_units = list_eval_units(cfg)
    units = shard.select(all_units)
    state_path, marker, fingerprint_file = shard_paths(folder, shard)
    ctx.hold_lock(state_path)
    fresh = ctx.check_inputs(fingerprint_sections(cfg), stage_upstream(cfg, runs), fingerprint_file=fingerprint_file)
    remove_file(marker, folder)  # set again once this shard has gone through all its samples
    if fresh:
        remove_file(state_path, folder)
        remove_file(folder / reports.DIGEST_FILE, folder)  # the reports are stale until the next merge
        for unit in units:
            remove_file(click_trace_path(folder, unit.safe_id), folder)
    log.info("[%s] %s: %d of the %d samples", ctx.name, shard.name, len(units), len(all_units))
    scoreboard, counts = evaluate_units(ctx, runs, units, all_units, state_path, fresh, complete_if_done=True)
    if scoreboard is None:  # nothing left: the state on disk is final (kept byte for byte: merged.json)
        previous = load_state_file(state_path)
        done = set(previous["done"]) if previous is not None else set()
        figures = {"skipped": len(units)}
    else:
        done, figures = set(scoreboard.done), counts.as_dict()
    if scoreboard is not None or not state_path.is_file():  # (a shard may have no samples at all)
        save_state(state_path, scoreboard or new_scoreboard(cfg, torch.device("cpu")))
    click_counts = simulate_units(ctx, runs, units, all_units)
    click_failed = {name for name, _ in click_counts.failures}
    failed = [unit.safe_id for unit in units if unit.safe_id not in done or unit.safe_id in click_failed]
    atomic_write_json(marker, {"state_md5": file_md5(state_path), "samples": len(units), "failed": failed})
    ctx.summary({"shard": shard.name, "samples": len(units), **figures})
    merge_shards(ctx, runs, shard.count, required=False)
    if failed:
        raise EvaluationError(f"{folder}: {shard.name}: {len(failed)} samples failed (listed above); fix the "
                              "inputs and rerun this shard to add them")


def evaluate_units(ctx, runs: RunIds, units: list[EvalUnit], all_units: list[EvalUnit], state_path: Path,
                   fresh: bool, complete_if_done: bool = False):
    """Score the ``units`` not in the state at ``state_path`` (checkpointed there); returns the
    scoreboard and the unit counts, or ``(None, None)`` when nothing is left and the reports are
    complete (``complete_if_done``: when nothing is left at all)."""
    cfg = ctx.cfg
    folder = ctx.output_dir
    device = resolve_device(cfg.training.device, key="training.device")
    scoreboard = new_scoreboard(cfg, device)
    previous = None if fresh else load_state_file(state_path)
    if previous is not None:
        scoreboard.load_state(previous)
    done = set(scoreboard.done)
    remaining = [unit for unit in units if unit.safe_id not in done]
    if not remaining and (complete_if_done or reports.reports_complete(folder)):
        return None, None
    log.info("[%s] %d samples of %r (%d done before), methods: %s", ctx.name, len(units), cfg.evaluation.split,
             len(done), ", ".join(method_names(cfg)))

    artifacts = Artifacts(cfg, runs, device)
    predictor: Predictor | None = None  # built on the first sample that needs work
    cache = open_cache(cfg) if remaining else None
    qualitative = QualitativeSelection.from_units(all_units, cfg.evaluation.qualitative_per_domain)
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
            reports.write_qualitative_panels(folder, sample, scored, methods, cfg.sam.prompt_mode)
        if checkpoints.due():
            started = time.perf_counter()
            save_state(state_path, scoreboard)
            checkpoints.record(started)

    counts = ctx.run_units(units, lambda unit: unit.safe_id in done, process, desc="evaluating",
                           unit_name=lambda unit: unit.safe_id, unit_label="samples")
    save_state(state_path, scoreboard)
    for name, reason in counts.failures[:10]:
        log.info("  failed: %s: %s", name, reason)
    return scoreboard, counts


def simulate_units(ctx, runs: RunIds, units: list[EvalUnit], all_units: list[EvalUnit]) -> UnitCounts:
    """Write the click trace of each of ``units`` that ``evaluation.active_prompting`` simulates
    (chosen among ``all_units``, so shards simulate what one process would) and that has none yet."""
    cfg = ctx.cfg
    folder = ctx.output_dir
    settings = cfg.evaluation.active_prompting
    if not settings.enabled:
        return UnitCounts()
    chosen = {unit.safe_id for unit in simulated_units(all_units, settings.max_samples)}
    todo = [unit for unit in units if unit.safe_id in chosen]
    remaining = [unit for unit in todo if not click_trace_path(folder, unit.safe_id).is_file()]
    log.info("[%s] click simulation: %d samples (%d done before), policies: %s, up to %d clicks", ctx.name,
             len(todo), len(todo) - len(remaining), ", ".join(settings.policies), settings.max_clicks)
    device = resolve_device(cfg.training.device, key="training.device")
    cache = open_cache(cfg) if remaining else None
    simulate = trace_runner(cfg, Artifacts(cfg, runs, device), checked_unseen_groups(cfg))
    kill_switch = KillSwitch.from_env(KILL_AFTER_CLICK_IMAGES_ENV)

    # Units simulated in this run: None once the trace is written, else the unit's error.
    attempted: dict[str, UnitError | None] = {}

    def written(unit: EvalUnit) -> bool:
        return unit.safe_id not in attempted and click_trace_path(folder, unit.safe_id).is_file()

    def simulate_batch(batch: list[EvalUnit]) -> None:
        """Simulate ``batch`` together; each trace is written as soon as the batch finishes (a failing
        batch is retried image by image, so one bad image fails alone)."""
        loaded = []
        for unit in batch:
            try:
                loaded.append((unit, load_sample(cfg, cache, unit)))
            except UnitError as exc:
                attempted[unit.safe_id] = exc
        try:
            traces = simulate([labelled for _, labelled in loaded]) if loaded else []
        except UnitError as exc:
            if len(loaded) == 1:
                attempted[loaded[0][0].safe_id] = exc
                return
            for unit, _ in loaded:
                simulate_batch([unit])
            return
        for (unit, _), trace in zip(loaded, traces):
            atomic_write_csv(click_trace_path(folder, unit.safe_id), trace)
            attempted[unit.safe_id] = None
            if kill_switch:
                kill_switch.advance()

    position = {unit.safe_id: index for index, unit in enumerate(todo)}

    def process(unit: EvalUnit) -> None:
        if unit.safe_id not in attempted:  # start a batch: this unit and the next ones still to simulate
            batch = [unit]
            for other in itertools.islice(todo, position[unit.safe_id] + 1, None):
                if len(batch) == settings.batch_images:
                    break
                if other.safe_id not in attempted and (ctx.force or not written(other)):
                    batch.append(other)
            simulate_batch(batch)
        error = attempted[unit.safe_id]
        if error is not None:
            raise error

    counts = ctx.run_units(todo, written, process, desc="simulating clicks", unit_name=lambda unit: unit.safe_id,
                           unit_label="samples")
    for name, reason in counts.failures[:10]:
        log.info("  click simulation failed: %s: %s", name, reason)
    return counts


def read_click_trace(folder: Path, units: list[EvalUnit]) -> pd.DataFrame:
    """The click traces of ``units`` written so far, concatenated in unit order (``TRACE_COLUMNS``)."""
    paths = [click_trace_path(folder, unit.safe_id) for unit in units]
    frames = [pd.read_csv(path, dtype={"safe_id": str, "group": str}) for path in paths if path.is_file()]
    if not frames:
        return pd.DataFrame(columns=list(TRACE_COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(TRACE_COLUMNS)]


def write_click_outputs(ctx, units: list[EvalUnit]):
    """The click reports from every simulated unit's trace (``None`` when the simulation is off)."""
    cfg = ctx.cfg
    settings = cfg.evaluation.active_prompting
    trace = read_click_trace(ctx.output_dir, simulated_units(units, settings.max_samples)) if settings.enabled \
        else None
    if trace is None or trace.empty:
        remove_click_reports(ctx.output_dir)  # an earlier run's, from other settings
        return None
    return write_click_reports(ctx.output_dir, trace, settings.max_clicks,
                               cfg.evaluation.bootstrap_samples, cfg.evaluation.bootstrap_seed, tracker=ctx.tracker)


def write_stage_reports(ctx, runs: RunIds, scoreboard: Scoreboard, figures: dict, click_report=None) -> None:
    """The evaluation reports, with the click simulation's section (``ClickReport``) when there is one."""
    methods = method_names(ctx.cfg)
    provenance = {"run ids": vars(runs), "inputs": sorted(needed_artifacts(ctx.cfg)), "config": ctx.cfg.to_dict()}
    sections = [] if click_report is None else [click_report.section()]
    note = refinement_gate_note(ctx.cfg, Artifacts(ctx.cfg, runs, "cpu")) if ctx.cfg.evaluation.refinement else ""
    written = reports.write_reports(ctx.output_dir, scoreboard, methods, list(REFINEMENT_VARIANTS),
                                    UNREFINED_BASELINE, ctx.tracker, provenance,
                                    reports.BootstrapSettings.from_config(ctx.cfg), sections=sections,
                                    refinement_note=note)
    ctx.summary({"samples": len(scoreboard.done), "masks": len(scoreboard.rows), **figures, **written})


def finished_shard_count(folder: Path) -> int | None:
    """The shard count of the ``.done.json`` markers in ``folder/shards`` (None: none, or several counts)."""
    counts = {int(found[2]) for path in (folder / SHARDS_DIR).glob("*.done.json")
              if (found := _SHARD_FILE.fullmatch(path.name))}
    return counts.pop() if len(counts) == 1 else None


def merge_shards(ctx, runs: RunIds, count: int | None, required: bool) -> bool:
    """Merge the states of the ``count`` shards into the reports (``count`` None: from the markers).
    Returns False, or with ``required`` raises naming them, when shards are missing or were made
    from other inputs; another process merging already is not an error (it writes the same)."""
    cfg = ctx.cfg
    folder = ctx.output_dir
    count = count if count and count > 1 else finished_shard_count(folder)
    if count is None:
        raise EvaluationError(f"{folder / SHARDS_DIR}: no finished shards, or shards of several counts; "
                              "pass --num-shards N with --merge")
    current = ctx.fingerprint(fingerprint_sections(cfg), stage_upstream(cfg, runs))
    missing, stale = [], []
    for index in range(count):
        shard = Shard(index, count)
        state_path, marker, fingerprint_file = shard_paths(folder, shard)
        try:
            recorded = read_json(marker)
            same_inputs = read_json(folder / fingerprint_file) == current
        except (OSError, ValueError):
            missing.append(index)
            continue
        if not state_path.is_file() or file_md5(state_path) != recorded.get("state_md5"):
            missing.append(index)
        elif not same_inputs:
            stale.append(index)
    if missing or stale:
        problem = (f"shards {missing} of {count} have not finished" if missing else
                   f"shards {stale} of {count} were computed from other inputs; rerun them (with --force)")
        if required:
            raise EvaluationError(f"{folder}: cannot merge: {problem}")
        log.info("[%s] merge waits: %s", ctx.name, problem)
        return False
    try:
        ctx.hold_lock(folder / reports.DIGEST_FILE)
    except OutputLocked:
        log.info("[%s] another shard is merging the reports", ctx.name)
        return False
    fingerprint_path = folder / FINGERPRINT_FILE
    if reports.reports_complete(folder) and fingerprint_path.is_file() and read_json(fingerprint_path) == current \
            and _merged_from(folder) == _shard_md5s(folder, count):
        log.info("[%s] %s: the %d shards are merged and the reports written; skipped", ctx.name, folder, count)
        return True
    units = list_eval_units(cfg)
    device = resolve_device(cfg.training.device, key="training.device")
    merged = new_scoreboard(cfg, device)
    failed = []
    for index in range(count):
        state_path, marker, _ = shard_paths(folder, Shard(index, count))
        state = load_state_file(state_path)
        if state is None:
            raise EvaluationError(f"{folder}: shard {index} of {count}: unreadable state; rerun that shard")
        part = new_scoreboard(cfg, device)
        part.load_state(state)
        merged.merge(part)
        failed += read_json(marker).get("failed", [])
    merged.sort_in_unit_order([unit.safe_id for unit in units])
    if not merged.done:
        raise EvaluationError(f"{folder}: no sample could be evaluated ({len(failed)} failed)")
    log.info("[%s] merging %d shards: %d samples, %d masks", ctx.name, count, len(merged.done), len(merged.rows))
    for path in folder.glob("*.png"):  # plots of domains an earlier run had
        remove_file(path, folder)
    remove_file(folder / STATE_FILE, folder)  # a one-process run's state, superseded by the merge
    atomic_write_json(fingerprint_path, current)
    write_stage_reports(ctx, runs, merged, {"shards": count, "failed": len(failed)}, write_click_outputs(ctx, units))
    atomic_write_json(folder / SHARDS_DIR / "merged.json", _shard_md5s(folder, count))
    if failed:
        raise EvaluationError(f"{folder}: {len(failed)} samples failed in the shards (e.g. {failed[0]}); the "
                              f"reports cover the {len(merged.done)} others; fix the inputs and rerun the shards")
    return True


def _shard_md5s(folder: Path, count: int) -> dict[str, str]:
    return {path.name: read_json(path)["state_md5"] for path in
            (shard_paths(folder, Shard(index, count))[1] for index in range(count))}


def _merged_from(folder: Path) -> dict | None:
    try:
        return read_json(folder / SHARDS_DIR / "merged.json")
    except (OSError, ValueError):
        return None
