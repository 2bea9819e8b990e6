"""Stage 7: evaluate every uncertainty strategy and the fusion refinement per domain.

    python evaluate_uncertainty.py --config config.yaml --run_id v1            # head/variance/Laplace/fusion v1
    python evaluate_uncertainty.py --config config.yaml --run_id v1 --fusion_run_id v2 --name ablation
    python evaluate_uncertainty.py --config config.yaml --run_id v1 --force    # recompute from scratch

    python evaluate_uncertainty.py --config config.yaml --run_id v1 --num-shards 4 --shard-index 0   # one of 4
    python evaluate_uncertainty.py --config config.yaml --run_id v1 --merge                          # merge them

Reports go to ``<project_root>/reports/eval/<name>/`` (default name ``run_<run_id>``); a killed run
resumes where it stopped. Shards (flags, torchrun or a SLURM array) each score their samples; the last
to finish merges them into the reports (``--merge`` does it on its own).
"""

import modules.core.script_start  # noqa: F401  (first: see its docstring)
from modules.core import paths
from modules.core.stage import Shard, default_argument_parser, resolve_shard, stage_context
from modules.evaluation.runs import RunIds
from modules.stages.evaluate_uncertainty import run_stage


def main() -> None:
    parser = default_argument_parser(__doc__.splitlines()[0], sharded=True)
    parser.add_argument("--merge", action="store_true", help="only merge the finished shards into the reports "
                        "(shard count: --num-shards, else that of the finished shards)")
    parser.add_argument("--run_id", default="v1", help="the trained runs to evaluate (head, variance, Laplace, fusion)")
    for model in ("head", "variance", "laplace", "fusion"):
        parser.add_argument(f"--{model}_run_id", default=None, help=f"the {model} run (default: --run_id)")
    parser.add_argument("--name", default=None, help="report folder name (default: run_<run_id>)")
    args = parser.parse_args()
    runs = RunIds.resolve(args.run_id, args.head_run_id, args.variance_run_id, args.laplace_run_id,
                          args.fusion_run_id)
    name = args.name or f"run_{args.run_id}"
    merge_count = args.num_shards if args.merge else None
    if args.merge:
        args.num_shards = args.shard_index = None
    with stage_context("evaluate_uncertainty", args, output_dir=lambda cfg: paths.eval_report_relpath(name),
                       extra_tracker_config={"run_ids": vars(runs)}, lock=False) as ctx:
        shard = Shard(0, merge_count or 1) if args.merge else resolve_shard(args)
        if not args.merge and shard.count == 1:
            ctx.hold_lock(ctx.output_dir)
        run_stage(ctx, runs, shard, merge_only=args.merge)


if __name__ == "__main__":
    main()
