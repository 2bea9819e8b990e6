"""Run every stage in order on one config (the README's main command).

Each stage runs as its own process (its own W&B run), skips the work it already finished, and
stops the pipeline with its one-line error if it fails; the pipeline then exits with the stage's
exit code. Extra arguments (``--set``, ``--force``) are passed to every stage. A stage cannot
outlive the pipeline: it dies with it (even when the pipeline is SIGKILLed), and SIGINT, SIGTERM and
SIGHUP sent to the pipeline are passed on to the running stage (``modules/core/processes.py``).
"""

import sys
from pathlib import Path

from modules.core.processes import run_child
from modules.core.stage import default_argument_parser

REPO = Path(__file__).resolve().parent

RUN_ID = "v1"

#: (stage name, script, its own arguments) in pipeline order; the names are those the stages run
#: under (``stage_context``), as ``--from`` and ``--only`` take them.
STAGES = [
    ("build_manifests", "build_manifests.py", []),
    ("generate_promptsets", "generate_promptsets.py", []),
    ("precompute_sam_outputs", "precompute_sam_outputs.py", []),
    ("visualize_sanity", "visualize_sanity.py", ["--n", "8", "--split", "train"]),
    ("build_training_indices", "build_training_indices.py", []),
    ("pack_to_hdf5", "pack_to_hdf5.py", []),
    ("train_head", "train_head.py", ["--model", "head", "--run_id", RUN_ID, "--resume-if-exists"]),
    ("train_variance", "train_head.py", ["--model", "variance", "--run_id", RUN_ID, "--resume-if-exists"]),
    ("fit_laplace", "fit_laplace.py", ["--run_id", RUN_ID]),
    ("train_fusion", "train_head.py", ["--model", "fusion", "--run_id", RUN_ID, "--resume-if-exists"]),
    ("evaluate_uncertainty", "evaluate_uncertainty.py", ["--run_id", RUN_ID]),
]
STAGE_NAMES = [name for name, _, _ in STAGES]


def selected_stages(start: str | None, only: str | None) -> list[tuple[str, str, list[str]]]:
    """The stages to run: all, those from ``start`` on, or the comma-separated ``only`` (in pipeline
    order); a ``ValueError`` naming an unknown stage."""
    wanted = [name.strip() for name in only.split(",") if name.strip()] if only else [start] if start else []
    unknown = [name for name in wanted if name not in STAGE_NAMES]
    if unknown:
        raise ValueError(f"unknown stage {', '.join(unknown)} (stages: {', '.join(STAGE_NAMES)})")
    if only:
        return [stage for stage in STAGES if stage[0] in wanted]
    return STAGES[STAGE_NAMES.index(start):] if start else list(STAGES)


def main() -> None:
    parser = default_argument_parser(__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--from", dest="start", metavar="STAGE", help="run the stages from this one on")
    which.add_argument("--only", metavar="STAGE[,STAGE]", help="run only these stages (in pipeline order)")
    args = parser.parse_args()
    try:
        stages = selected_stages(args.start, args.only)
    except ValueError as exc:
        parser.error(f"--{'only' if args.only else 'from'}: {exc}")
    shared = ["--config", args.config] + [a for o in args.overrides for a in ("--set", o)]
    if args.force:
        shared.append("--force")
    for _, script, extra in stages:
        print(f"=== {script} {' '.join(extra)}".rstrip(), flush=True)
        ended = run_child([sys.executable, str(REPO / script), *shared, *extra])
        if not ended.ok:
            print(f"run_pipeline: {script} {ended.describe()}", file=sys.stderr, flush=True)
            sys.exit(ended.exit_status)
    print("=== pipeline finished")


if __name__ == "__main__":
    main()
