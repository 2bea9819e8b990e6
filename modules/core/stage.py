"""How a stage runs: the shared CLI, the stage context, fingerprints, and skipping finished work.

Every top-level script does the same three things::

    parser = default_argument_parser("Stage 2: generate seeded prompt sets")
    args = parser.parse_args()
    with stage_context("generate_promptsets", args, output_dir="prompt_sets") as ctx:
        ...  # ctx.cfg, ctx.check_inputs(...), ctx.run_units(...), ctx.tracker

``stage_context`` checks the arguments that name folders (``NAME_ARGUMENTS``), loads and validates
the config (with ``--set`` overrides), checks that the stage's output folder resolves inside the
project root and only then creates it, takes the output's lock (``core.locks``: a second copy of
the stage on the same output refuses) and removes the temporary files a killed run left there,
saves the resolved config beside the outputs, opens the
stage's W&B run, and turns every ``PipelineError``, and every storage fault (a full disk, a read-only
folder: ``fileio.storage_error``) raised anywhere in the stage, into one line on stderr and exit code 2.

Fingerprints: ``ctx.check_inputs(config_sections, upstream)`` records what the stage is computed
from (its config sections and hashes of upstream artifacts) in ``<output>/.stage.json``. A rerun
with different inputs stops with a message naming what changed, unless ``--force`` is given, in
which case the stage starts over. Units (a sample, an image, an epoch) are skipped only when the
caller's ``is_complete`` says so; the stage writes each unit atomically so a half-written unit
never looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NoReturn, Sequence, TypeVar

import yaml

from modules.core import progress
from modules.core.config import PipelineConfig, load_config
from modules.core.console import configure_logging
from modules.core.errors import PipelineError
from modules.core.fileio import (atomic_write_json, atomic_write_yaml, file_md5, read_json,
                                 remove_stale_temporaries, storage_error)
from modules.core.library_caches import point_library_caches
from modules.core.lineage import declare_stage_inputs, log_stage_output
from modules.core.locks import OutputLock
from modules.core.paths import FINGERPRINT_FILE, check_name, ensure_inside
from modules.core.tracking import NullTracker, start_tracker

log = logging.getLogger("pipeline")

Unit = TypeVar("Unit")

# Tests set this to SIGKILL a stage right after its n-th computed unit, to prove resumability.
KILL_HOOK_ENV = "PIPELINE_TEST_KILL_AFTER_UNITS"
RESOLVED_CONFIG_FILE = "config.resolved.yaml"
#: Arguments whose values become folder names: these and every ``--*_run_id`` must be plain names
#: (``core.paths.check_name``); ``stage_context`` refuses any other value before it touches the disk.
NAME_ARGUMENTS = ("run_id", "name")


class KillSwitch:
    """Test hook: SIGKILL this process once a count reaches the number in an environment variable,
    so tests can prove that a stage killed at that point resumes to the same result.

    ``with_parent``: SIGKILL the parent first (a helper process of a stage, such as stage 3's cache
    writer, kills the stage it works for, as if the stage had been killed at that moment)."""

    def __init__(self, limit: int, with_parent: bool = False) -> None:
        self.limit, self.count = limit, 0
        self.with_parent = with_parent

    @classmethod
    def from_env(cls, variable: str = KILL_HOOK_ENV, with_parent: bool = False) -> "KillSwitch | None":
        """The switch armed by ``variable`` (a positive integer), or None when it is unset."""
        limit = int(os.environ.get(variable) or 0)
        return cls(limit, with_parent) if limit > 0 else None

    def reach(self, count: int) -> None:
        self.count = count
        if count >= self.limit:
            if self.with_parent:
                os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

    def advance(self, by: int = 1) -> None:
        self.reach(self.count + by)


class StageInputsChanged(PipelineError):
    pass


class UnitError(PipelineError):
    """A work unit that cannot be computed from its (bad) input; counted as failed, and the stage
    goes on with the other units (``UnitCounts.raise_if_failed`` reports them at the end)."""


class UnitsFailed(PipelineError):
    """Some units of a stage failed; every other unit was computed and kept."""


# --------------------------------------------------------------------------- CLI


class OneLineArgumentParser(argparse.ArgumentParser):
    """``argparse`` reporting a bad command line like every other stage error: one line
    ``error: ...`` on stderr and exit code 2 (argparse's default prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def default_argument_parser(description: str, sharded: bool = False) -> argparse.ArgumentParser:
    """The arguments every stage script shares; scripts add their own on top (an argument that names
    a folder is called ``--run_id``, ``--<model>_run_id`` or ``--name``: see ``NAME_ARGUMENTS``)."""
    parser = OneLineArgumentParser(description=description)
    parser.add_argument("--config", default="config.yaml", help="pipeline config (default: config.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.lr=1e-3 (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="recompute even if finished or inputs changed")
    add_console_arguments(parser)
    if sharded:
        add_shard_arguments(parser)
    return parser


def add_console_arguments(parser: argparse.ArgumentParser) -> None:
    """``--verbose`` and ``--progress-every`` (``core.console``, ``core.progress``)."""
    parser.add_argument("--verbose", action="store_true",
                        help="show DEBUG lines and the third-party warnings hidden by default")
    parser.add_argument("--progress-every", dest="progress_every", type=float, default=progress.DEFAULT_INTERVAL_S,
                        metavar="SECONDS", help="when the output is not a terminal, a progress line of each long "
                        f"loop every SECONDS (default {progress.DEFAULT_INTERVAL_S:g})")


def add_shard_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-shards", type=int, default=None, help="split the work into N shards")
    parser.add_argument("--shard-index", type=int, default=None, help="which shard this process runs")


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def select(self, units: Sequence[Unit]) -> list[Unit]:
        """Deterministic round-robin split of an ordered unit list."""
        return [u for i, u in enumerate(units) if i % self.count == self.index]

    @property
    def name(self) -> str:
        return f"shard{self.index:03d}-of-{self.count:03d}"


def env_int(env: Mapping[str, str], name: str, default: int | None = None, minimum: int = 0) -> int | None:
    """Environment variable ``name`` as an integer >= ``minimum``, ``default`` when it is unset; a
    one-line ``PipelineError`` naming the variable when it holds anything else."""
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise PipelineError(f"environment variable {name}={raw!r}: not an integer") from None
    if value < minimum:
        raise PipelineError(f"environment variable {name}={value}: must be >= {minimum}")
    return value


def resolve_shard(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> Shard:
    """The shard of this process: CLI flags, else torchrun (``RANK``/``WORLD_SIZE``), else a SLURM
    array (``SLURM_ARRAY_TASK_ID``/``_COUNT``/``_MIN``/``_MAX``/``_STEP``). A value that is not an
    integer, is out of range, or contradicts the others is a one-line ``PipelineError`` naming it."""
    env = os.environ if environ is None else environ
    count = getattr(args, "num_shards", None)
    index = getattr(args, "shard_index", None)
    if count is not None or index is not None:
        if count is None or index is None:
            raise PipelineError("--num-shards and --shard-index must be given together")
        if count < 1:
            raise PipelineError(f"--num-shards: {count} must be >= 1")
        if not 0 <= index < count:
            raise PipelineError(f"--shard-index: {index} is outside 0..{count - 1}")
        return Shard(index=index, count=count)
    if "WORLD_SIZE" in env or "RANK" in env:
        return _torchrun_shard(env)
    if "SLURM_ARRAY_TASK_ID" in env or "SLURM_ARRAY_TASK_COUNT" in env:
        return _slurm_array_shard(env)
    return Shard()


def _torchrun_shard(env: Mapping[str, str]) -> Shard:
    for name, other in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if name not in env:
            raise PipelineError(f"environment variable {name} is not set but {other} is: "
                                "set both (torchrun does) or neither")
    count = env_int(env, "WORLD_SIZE", minimum=1)
    index = env_int(env, "RANK")
    if index >= count:
        raise PipelineError(f"environment variable RANK={index}: outside 0..{count - 1} (WORLD_SIZE={count})")
    return Shard(index=index, count=count)


def _slurm_array_shard(env: Mapping[str, str]) -> Shard:
    """The shard of a SLURM array task: array tasks MIN, MIN + STEP, ..., MAX are shards 0 .. COUNT - 1,
    so the array must be a range (``--array=0-7`` or ``--array=0-14:2``), not a list of task ids."""
    for name, other in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                        ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID")):
        if name not in env:
            raise PipelineError(f"environment variable {name} is not set but {other} is: a SLURM array task "
                                "has both")
    task = env_int(env, "SLURM_ARRAY_TASK_ID")
    count = env_int(env, "SLURM_ARRAY_TASK_COUNT", minimum=1)
    first = env_int(env, "SLURM_ARRAY_TASK_MIN", default=0)
    step = env_int(env, "SLURM_ARRAY_TASK_STEP", default=1, minimum=1)
    last = env_int(env, "SLURM_ARRAY_TASK_MAX", default=first + (count - 1) * step)
    if last != first + (count - 1) * step:
        raise PipelineError(
            f"environment variable SLURM_ARRAY_TASK_COUNT={count}: does not match the array range "
            f"SLURM_ARRAY_TASK_MIN={first}..SLURM_ARRAY_TASK_MAX={last} (step {step}); shards need a range "
            "of task ids (--array=0-7 or --array=0-14:2), not a list"
        )
    if not first <= task <= last or (task - first) % step:
        raise PipelineError(f"environment variable SLURM_ARRAY_TASK_ID={task}: not a task of the array "
                            f"{first}-{last}:{step} (SLURM_ARRAY_TASK_MIN/_MAX/_STEP)")
    return Shard(index=(task - first) // step, count=count)


def check_name_arguments(args: argparse.Namespace) -> None:
    """A one-line ``PathError`` naming the flag when a folder-naming argument (``NAME_ARGUMENTS``,
    ``--*_run_id``) given is not a plain name."""
    for dest, value in vars(args).items():
        if value is not None and (dest in NAME_ARGUMENTS or dest.endswith("_run_id")):
            check_name(value, f"--{dest}")


# --------------------------------------------------------------------------- context


@dataclass
class UnitCounts:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self, prefix: str = "") -> dict[str, int]:
        return {f"{prefix}done": self.done, f"{prefix}skipped": self.skipped, f"{prefix}failed": self.failed}

    def add(self, other: "UnitCounts") -> None:
        """Add the counts and failures of another pass (e.g. another split) to these."""
        self.done += other.done
        self.skipped += other.skipped
        self.failed += other.failed
        self.failures.extend(other.failures)

    def raise_if_failed(self, stage: str, unit: str) -> None:
        """Exit code 2 with one line naming the first failed unit and its reason when any unit
        failed. Called after the stage wrote every other unit and printed its summary, so nothing
        computed is lost and a rerun once the input is fixed computes only the failed units; a
        stage that exited 0 has no hole a later stage would silently skip."""
        if not self.failed:
            return
        total = self.done + self.skipped + self.failed
        name, reason = self.failures[0]
        more = f" (and {self.failed - 1} more, listed above)" if self.failed > 1 else ""
        kept = "the others are kept" if total > self.failed else "nothing was computed"
        raise UnitsFailed(f"{stage}: {self.failed} of {total} {unit} failed, first {name}: {reason}{more}; "
                          f"{kept}: fix the input named and rerun")


@dataclass
class StageContext:
    """One run of one stage, handed to its ``run_stage``.

    Attributes:
        name: the stage name (``"precompute_sam_outputs"``, ``"train_head"`` ...), also the W&B job type.
        cfg: the validated config, overrides applied.
        args: the parsed command line (``--force`` and the script's own flags).
        output_dir: the stage's folder under the project root (created), where ``.stage.json`` and
            ``config.resolved.yaml`` are written.
        tracker: the stage's W&B run, or a no-op.
        started: wall-clock start, for the closing line.
        locks: the output locks this run holds (``hold_lock``), released when the stage ends.
    """

    name: str
    cfg: PipelineConfig
    args: argparse.Namespace
    output_dir: Path
    tracker: Any = field(default_factory=NullTracker)
    started: float = field(default_factory=time.time)
    locks: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def force(self) -> bool:
        return bool(getattr(self.args, "force", False))

    @property
    def project_root(self) -> Path:
        return self.cfg.project_root

    def path(self, *parts: str) -> Path:
        """A path under the project root (the only place stages write)."""
        return self.project_root.joinpath(*parts)

    def hold_lock(self, target: Path) -> None:
        """Hold the lock of ``target`` (the output folder, or one output file, under the project root)
        until the stage ends (``core.locks``), and remove the temporary files a killed writer of it
        left; ``OutputLocked`` when another process holds it."""
        self.locks.enter_context(OutputLock.acquire(self.project_root, target))
        removed = (remove_stale_temporaries(target) if target.is_dir()
                   else remove_stale_temporaries(target.parent, target.name))
        report_stale_temporaries(self.name, removed)

    # ----------------------------------------------------------- fingerprints

    def fingerprint(self, config_sections: Iterable[str], upstream: dict[str, Any] | None = None) -> dict[str, Any]:
        """What ``check_inputs`` records: the stage name, its config sections and the upstream hashes."""
        return {"stage": self.name, "config": {name: self.cfg.section(name) for name in config_sections},
                "upstream": upstream or {}}

    def check_inputs(self, config_sections: Iterable[str], upstream: dict[str, Any] | None = None,
                     fingerprint_file: str = FINGERPRINT_FILE) -> bool:
        """Record what this stage is computed from; refuse to reuse outputs made from other inputs.

        Returns True when the outputs must be rebuilt from scratch (``--force``, or no previous
        fingerprint), False when earlier outputs are valid and complete units may be skipped.
        """
        current = self.fingerprint(config_sections, upstream)
        path = self.output_dir / fingerprint_file
        try:
            previous = read_json(path) if path.is_file() else None
        except (OSError, ValueError) as exc:  # damaged bytes: --force starts over and rewrites it
            if not self.force:
                raise StageInputsChanged(f"{path}: unreadable stage fingerprint ({type(exc).__name__}); "
                                         "rerun with --force to recompute the stage's outputs") from None
            previous = None
        if previous is not None and not self.force:
            changed = describe_changes(previous, current)
            if changed:
                raise StageInputsChanged(
                    f"{self.name}: inputs changed since the outputs in {self.output_dir} were made "
                    f"({'; '.join(changed)}); rerun with --force to recompute"
                )
            return False
        if previous != current:
            atomic_write_json(path, current)
        return True

    # ----------------------------------------------------------- units

    def run_units(
        self,
        units: Sequence[Unit],
        is_complete: Callable[[Unit], bool],
        process: Callable[[Unit], Any],
        desc: str,
        unit_name: Callable[[Unit], str] = str,
        log_every: int = 100,
        metric_prefix: str = "",
        unit_label: str = "units",
    ) -> UnitCounts:
        """Process every unit not yet complete; a ``UnitError`` marks one unit failed and goes on.
        Progress (``core.progress``) counts ``unit_label``; ``log_every`` units go to the tracker."""
        counts = UnitCounts()
        kill_switch = KillSwitch.from_env()
        bar = progress.Progress(len(units), desc, unit_label)
        for i, unit in enumerate(units, 1):
            if not self.force and is_complete(unit):
                counts.skipped += 1
                bar.skip()
            else:
                try:
                    process(unit)
                    counts.done += 1
                    if kill_switch:
                        kill_switch.advance()
                except UnitError as exc:
                    counts.failed += 1
                    counts.failures.append((unit_name(unit), str(exc)))
                    log.warning("%s: %s", unit_name(unit), exc)
                bar.update()
            if i % log_every == 0:
                self.tracker.log(counts.as_dict(metric_prefix))
        bar.close()
        self.tracker.log(counts.as_dict(metric_prefix))
        return counts

    # ----------------------------------------------------------- outputs

    def save_resolved_config(self, folder: Path | None = None) -> Path:
        folder = folder or self.output_dir
        path = folder / RESOLVED_CONFIG_FILE
        resolved = self.cfg.to_dict()
        if not path.is_file() or read_yaml_safe(path) != resolved:
            atomic_write_yaml(path, resolved)
        return path

    def summary(self, values: dict[str, Any]) -> None:
        """Log the stage's closing figures (one ``  key: value`` line each) and hand them to the tracker."""
        self.tracker.summary(values)
        if values:
            log.info("[%s] summary:\n%s", self.name, "\n".join(f"  {key}: {value}" for key, value in values.items()))


def report_stale_temporaries(stage: str, removed: list[Path]) -> None:
    """One line about the temporary files a killed run of ``stage`` left and this run removed."""
    if removed:
        shown = ", ".join(p.name for p in removed[:3]) + (", ..." if len(removed) > 3 else "")
        log.info("[%s] removed %d temporary file(s) a killed run left (%s)", stage, len(removed), shown)


def set_progress_interval(seconds: float) -> None:
    """``--progress-every``; a negative value is a one-line error naming the flag."""
    try:
        progress.set_interval(seconds)
    except ValueError:
        raise PipelineError(f"--progress-every: {seconds} must be >= 0 seconds") from None


def read_yaml_safe(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def describe_changes(previous: dict, current: dict) -> list[str]:
    """Human-readable dotted keys that differ between two fingerprints."""
    changes: list[str] = []

    def walk(old: Any, new: Any, key: str) -> None:
        if isinstance(old, dict) and isinstance(new, dict):
            for name in sorted(set(old) | set(new)):
                walk(old.get(name), new.get(name), f"{key}.{name}" if key else str(name))
        elif old != new:
            changes.append(key.replace("config.", "", 1).replace("upstream.", "upstream ", 1))

    walk(previous, current, "")
    return changes[:8]


def upstream_fingerprint(paths: Iterable[Path]) -> dict[str, str]:
    """Content hashes of small upstream artifacts (CSV manifests, JSON), keyed by file name."""
    return {Path(p).name: file_md5(p) for p in paths}


@contextlib.contextmanager
def stage_context(name: str, args: argparse.Namespace, output_dir: str | Callable[[PipelineConfig], str],
                  extra_tracker_config: dict | None = None, lock: bool = True,
                  main_rank_only: bool = False) -> Iterator[StageContext]:
    """Set up a stage run (config, output folder and its lock, resolved config, W&B) and report errors
    as one line.

    ``output_dir``: the stage's folder under the project root, or a function of the config giving it;
    it must resolve inside the project root (checked before anything is created).
    ``lock``: hold the output folder's lock (``core.locks``) for the whole run, taken before anything
    is written there; False when the stage locks finer outputs itself (``StageContext.hold_lock``).
    ``main_rank_only``: the stage may run as several torchrun ranks of one job (``RANK``); only rank
    0 opens a W&B run and takes the lock, the other ranks write nothing of their own.
    """
    configure_logging(getattr(args, "verbose", False))
    tracker = NullTracker()
    project_root = None
    locks = contextlib.ExitStack()
    try:
        main_rank = not main_rank_only or env_int(os.environ, "RANK", default=0) == 0
        set_progress_interval(getattr(args, "progress_every", progress.DEFAULT_INTERVAL_S))
        check_name_arguments(args)
        cfg = load_config(args.config, args.overrides)
        project_root = cfg.project_root
        out = project_root / (output_dir(cfg) if callable(output_dir) else output_dir)
        ensure_inside(project_root, out, "output folder")
        project_root.mkdir(parents=True, exist_ok=True)
        point_library_caches(project_root)  # in-process callers; the scripts did it at import
        out.mkdir(parents=True, exist_ok=True)
        if lock and main_rank:
            locks.enter_context(OutputLock.acquire(project_root, out))
            report_stale_temporaries(name, remove_stale_temporaries(out))
        tracker_config = {**cfg.to_dict(), **(extra_tracker_config or {})}
        if main_rank:
            tracker = start_tracker(cfg.wandb, name, project_root, tracker_config)
            declare_stage_inputs(tracker, name, args, cfg)
        ctx = StageContext(name=name, cfg=cfg, args=args, output_dir=out, tracker=tracker, locks=locks)
        log.info("[%s] project root: %s", name, project_root)
        yield ctx
        ctx.save_resolved_config()
        log_stage_output(tracker, name, out)
        log.info("[%s] finished in %.1f s", name, time.time() - ctx.started)
        sys.stdout.flush()  # stdout may be a file on a full disk: fail here, with the line below
    except (PipelineError, OSError) as exc:
        # A storage fault anywhere (also creating the folders above) is one line like bad input.
        error = storage_error(exc, default_folder=project_root)
        if error is None and not isinstance(exc, PipelineError):
            raise
        tracker.finish()
        with contextlib.suppress(OSError):  # what is left of stdout, before the error line
            sys.stdout.flush()
        print(f"error: {error or exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # Ctrl-C, or a SIGINT that run_pipeline.py passes on
        tracker.finish()
        print(f"error: {name} interrupted; rerun the same command to resume: finished work is kept",
              file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        locks.close()
    tracker.finish()
