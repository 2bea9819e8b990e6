"""The pipeline's stages in order, with the arguments each gets, and where the results land.

One table for ``run_pipeline.py`` (stages one after the other) and ``core.slurm_launch`` (stages as
SLURM jobs and job arrays). ``--run_id`` is the run id of every stage that has one: the head, the
variance network and the fusion module (``train_head.py``), the Laplace (``fit_laplace.py``) and the
evaluation, which reads those runs and reports to ``reports/eval/run_<run_id>``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from modules.core.paths import eval_report_dir

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RUN_ID = "v1"


@dataclass(frozen=True)
class StageCall:
    """One stage: ``name`` (as ``stage_context`` runs it, as ``--from`` / ``--only`` take it), its
    script and its own arguments; ``sharded``: it splits across processes (``--num-shards``)."""

    name: str
    script: str
    args: tuple[str, ...] = ()
    sharded: bool = False

    def command(self, shared: list[str], shard: tuple[int, int] | None = None) -> list[str]:
        """The command line: this Python, the script, ``shared`` arguments, its own, and the shard."""
        extra = ["--num-shards", str(shard[1]), "--shard-index", str(shard[0])] if shard else []
        return [sys.executable, str(REPO / self.script), *shared, *self.args, *extra]


def pipeline_stages(run_id: str = DEFAULT_RUN_ID) -> list[StageCall]:
    """Every stage in pipeline order, the trained runs and the evaluation named ``run_id``."""
    run = ("--run_id", run_id)
    return [
        StageCall("build_manifests", "build_manifests.py"),
        StageCall("generate_promptsets", "generate_promptsets.py"),
        StageCall("precompute_sam_outputs", "precompute_sam_outputs.py", sharded=True),
        StageCall("visualize_sanity", "visualize_sanity.py", ("--n", "8", "--split", "train")),
        StageCall("build_training_indices", "build_training_indices.py"),
        StageCall("pack_to_hdf5", "pack_to_hdf5.py"),
        StageCall("train_head", "train_head.py", ("--model", "head", *run, "--resume-if-exists")),
        StageCall("train_variance", "train_head.py", ("--model", "variance", *run, "--resume-if-exists")),
        StageCall("fit_laplace", "fit_laplace.py", run),
        StageCall("train_fusion", "train_head.py", ("--model", "fusion", *run, "--resume-if-exists")),
        StageCall("evaluate_uncertainty", "evaluate_uncertainty.py", run, sharded=True),
    ]


STAGE_NAMES = [call.name for call in pipeline_stages()]


def selected_stages(start: str | None, only: str | None, run_id: str = DEFAULT_RUN_ID) -> list[StageCall]:
    """The stages to run: all, those from ``start`` on, or the comma-separated ``only`` (in pipeline
    order); a ``ValueError`` naming an unknown stage."""
    wanted = [name.strip() for name in only.split(",") if name.strip()] if only else [start] if start else []
    unknown = [name for name in wanted if name not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage {', '.join(unknown)} (stages: {', '.join(STAGE_NAMES)})")
    stages = pipeline_stages(run_id)
    if only:
        return [call for call in stages if call.name in wanted]
    return stages[STAGE_NAMES.index(start):] if start else stages


def result_locations(project_root: Path, run_id: str) -> list[tuple[str, Path]]:
    """(label, path) of what a user reads after a run, those that exist: the evaluation's summary
    and HTML report, and the folder of the W&B offline runs (``wandb sync`` uploads them)."""
    report = eval_report_dir(project_root, f"run_{run_id}")
    wandb_runs = Path(project_root) / "wandb" / "wandb"
    offline = sorted(wandb_runs.glob("offline-run-*")) if wandb_runs.is_dir() else []
    candidates = [("summary", report / "summary.md"), ("HTML report", report / "index.html"),
                  (f"W&B offline runs ({len(offline)}; upload: wandb sync {wandb_runs}/offline-run-*)",
                   wandb_runs if offline else None)]
    return [(label, path) for label, path in candidates if path is not None and path.exists()]
