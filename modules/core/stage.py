"""How a stage runs: the shared CLI, the stage context, fingerprints, and skipping finished work.

Every top-level script does the same three things::

    parser = default_argument_parser("Stage 2: generate seeded prompt sets")
    args = parser.parse_args()
    with stage_context("generate_promptsets", args, output_dir="prompt_sets") as ctx:
        ...  # ctx.cfg, ctx.check_inputs(...), ctx.run_units(...), ctx.tracker

``stage_context`` checks the arguments that name folders (``NAME_ARGUMENTS``), loads and validates
the config (with ``--set`` overrides), checks that the stage's output folder resolves inside the
project root and only then creates it, saves the resolved config beside the outputs, opens the
stage's W&B run, and turns every ``PipelineError`` into one line on stderr and exit code 2.

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
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import yaml
from tqdm.auto import tqdm

from modules.core.config import PipelineConfig, load_config
from modules.core.errors import PipelineError
from modules.core.fileio import atomic_write_json, atomic_write_yaml, file_md5, read_json
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
    so tests can prove that a stage killed at that point resumes to the same result."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0

    @classmethod
    def from_env(cls, variable: str = KILL_HOOK_ENV) -> "KillSwitch | None":
        """The switch armed by ``variable`` (a positive integer), or None when it is unset."""
        limit = int(os.environ.get(variable) or 0)
        return cls(limit) if limit > 0 else None

    def reach(self, count: int) -> None:
        self.count = count
        if count >= self.limit:
            os.kill(os.getpid(), signal.SIGKILL)

    def advance(self, by: int = 1) -> None:
        self.reach(self.count + by)


class StageInputsChanged(PipelineError):
    pass


class UnitError(PipelineError):
    """A work unit that cannot be computed from its (bad) input; counted as failed, not fatal."""


# --------------------------------------------------------------------------- CLI


def default_argument_parser(description: str, sharded: bool = False) -> argparse.ArgumentParser:
    """The arguments every stage script shares; scripts add their own on top (an argument that names
    a folder is called ``--run_id``, ``--<model>_run_id`` or ``--name``: see ``NAME_ARGUMENTS``)."""
    parser = argparse.ArgumentParser(description=description)
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
    if sharded:
        add_shard_arguments(parser)
    return parser


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


def resolve_shard(args: argparse.Namespace | None = None, environ: dict | None = None) -> Shard:
    """The shard of this process: CLI flags, else torchrun (RANK/WORLD_SIZE), else a SLURM array."""
    env = os.environ if environ is None else environ
    count = getattr(args, "num_shards", None) if args is not None else None
    index = getattr(args, "shard_index", None) if args is not None else None
    source = "--num-shards/--shard-index"
    if count is None and index is None:
        if "WORLD_SIZE" in env and "RANK" in env:
            count, index, source = int(env["WORLD_SIZE"]), int(env["RANK"]), "RANK/WORLD_SIZE"
        elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            task_min = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
            index = int(env["SLURM_ARRAY_TASK_ID"]) - task_min
            source = "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT"
        else:
            return Shard()
    if count is None or index is None:
        raise PipelineError("--num-shards and --shard-index must be given together")
    if count < 1 or not 0 <= index < count:
        raise PipelineError(f"{source}: shard index {index} is outside 0..{count - 1}")
    return Shard(index=index, count=count)


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
    """

    name: str
    cfg: PipelineConfig
    args: argparse.Namespace
    output_dir: Path
    tracker: Any = field(default_factory=NullTracker)
    started: float = field(default_factory=time.time)

    @property
    def force(self) -> bool:
        return bool(getattr(self.args, "force", False))

    @property
    def project_root(self) -> Path:
        return self.cfg.project_root

    def path(self, *parts: str) -> Path:
        """A path under the project root (the only place stages write)."""
        return self.project_root.joinpath(*parts)

    # ----------------------------------------------------------- fingerprints

    def check_inputs(self, config_sections: Iterable[str], upstream: dict[str, Any] | None = None,
                     fingerprint_file: str = FINGERPRINT_FILE) -> bool:
        """Record what this stage is computed from; refuse to reuse outputs made from other inputs.

        Returns True when the outputs must be rebuilt from scratch (``--force``, or no previous
        fingerprint), False when earlier outputs are valid and complete units may be skipped.
        """
        current = {
            "stage": self.name,
            "config": {name: self.cfg.section(name) for name in config_sections},
            "upstream": upstream or {},
        }
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
    ) -> UnitCounts:
        """Process every unit not yet complete; a ``UnitError`` marks one unit failed and goes on."""
        counts = UnitCounts()
        kill_switch = KillSwitch.from_env()
        bar = tqdm(units, desc=desc, unit="unit", dynamic_ncols=True, disable=None)
        for i, unit in enumerate(bar, 1):
            if not self.force and is_complete(unit):
                counts.skipped += 1
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
            if i % log_every == 0:
                self.tracker.log(counts.as_dict(metric_prefix))
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
        """Print the stage's closing figures and hand them to the tracker."""
        self.tracker.summary(values)
        for key, value in values.items():
            print(f"  {key}: {value}")


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
                  extra_tracker_config: dict | None = None, track: bool = True) -> Iterator[StageContext]:
    """Set up a stage run (config, output folder, resolved config, W&B) and report errors as one line.

    ``output_dir``: the stage's folder under the project root, or a function of the config giving it;
    it must resolve inside the project root (checked before anything is created).
    ``track=False`` (e.g. DDP ranks other than 0) opens no W&B run.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tracker = NullTracker()
    try:
        check_name_arguments(args)
        cfg = load_config(args.config, args.overrides)
        project_root = cfg.project_root
        out = project_root / (output_dir(cfg) if callable(output_dir) else output_dir)
        ensure_inside(project_root, out, "output folder")
        project_root.mkdir(parents=True, exist_ok=True)
        # Libraries that cache to the home folder write under the project root instead.
        os.environ.setdefault("MPLCONFIGDIR", str(project_root / ".cache" / "matplotlib"))
        out.mkdir(parents=True, exist_ok=True)
        tracker_config = {**cfg.to_dict(), **(extra_tracker_config or {})}
        if track:
            tracker = start_tracker(cfg.wandb, name, project_root, tracker_config)
        ctx = StageContext(name=name, cfg=cfg, args=args, output_dir=out, tracker=tracker)
        print(f"[{name}] project root: {project_root}")
        yield ctx
        ctx.save_resolved_config()
        print(f"[{name}] finished in {time.time() - ctx.started:.1f} s")
    except PipelineError as exc:
        tracker.finish()
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    tracker.finish()
