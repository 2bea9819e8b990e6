"""Run every stage in order on one config (the README's main command).

Each stage runs as its own process (its own W&B run), skips the work it already finished, and
stops the pipeline with its one-line error if it fails; the pipeline then exits with the stage's
exit code. Extra arguments (``--set``, ``--force``, ``--verbose``, ``--progress-every``) are passed
to every stage, ``--run_id`` to every stage that has one. A stage cannot outlive the pipeline: it
dies with it (even when the pipeline is SIGKILLed), and SIGINT, SIGTERM and SIGHUP sent to the
pipeline are passed on to the running stage (``modules/core/processes.py``). At the end it names
the evaluation's summary, its HTML report and the W&B offline runs.

``--launcher submitit`` submits the stages as SLURM jobs instead (``modules/core/slurm_launch.py``).
"""

import logging
import sys

from modules.core import slurm_launch
from modules.core.config import load_config
from modules.core.console import configure_logging
from modules.core.errors import PipelineError
from modules.core.paths import check_name
from modules.core.pipeline_plan import DEFAULT_RUN_ID, result_locations, selected_stages
from modules.core.processes import run_child
from modules.core.stage import default_argument_parser

log = logging.getLogger("pipeline")


def shared_arguments(args) -> list[str]:
    """The arguments every stage gets."""
    shared = ["--config", args.config] + [a for o in args.overrides for a in ("--set", o)]
    shared += ["--progress-every", f"{args.progress_every:g}"]
    shared += ["--force"] if args.force else []
    shared += ["--verbose"] if args.verbose else []
    return shared


def report_results(args) -> None:
    """One line per result file a user reads next (those that exist)."""
    try:
        cfg = load_config(args.config, args.overrides)
    except PipelineError:
        return
    for label, path in result_locations(cfg.project_root, args.run_id):
        log.info("%s: %s", label, path)


def main() -> None:
    parser = default_argument_parser(__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--from", dest="start", metavar="STAGE", help="run the stages from this one on")
    which.add_argument("--only", metavar="STAGE[,STAGE]", help="run only these stages (in pipeline order)")
    parser.add_argument("--run_id", default=DEFAULT_RUN_ID, help="run id of the trained models, the Laplace and "
                        f"the evaluation (reports/eval/run_<run_id>; default {DEFAULT_RUN_ID})")
    slurm_launch.add_launcher_arguments(parser)
    args = parser.parse_args()
    configure_logging(args.verbose)
    try:
        check_name(args.run_id, "--run_id")
        stages = selected_stages(args.start, args.only, args.run_id)
    except ValueError as exc:
        parser.error(f"--{'only' if args.only else 'from'}: {exc}")
    except PipelineError as exc:
        parser.error(str(exc))
    shared = shared_arguments(args)
    if args.launcher == "submitit":
        try:
            slurm_launch.launch(stages, shared, args, load_config(args.config, args.overrides).project_root)
        except PipelineError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(2)
    else:
        for call in stages:
            log.info("=== %s", " ".join([call.script, *call.args]))
            ended = run_child(call.command(shared))
            if not ended.ok:
                print(f"run_pipeline: {call.script} {ended.describe()}", file=sys.stderr, flush=True)
                sys.exit(ended.exit_status)
        log.info("=== pipeline finished")
    if args.launcher == "local" or args.submitit_cluster != "slurm":
        report_results(args)


if __name__ == "__main__":
    main()
