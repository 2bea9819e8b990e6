"""Stage 5: train the prompt-aware head (MAP), the variance network, or the fusion module.

    python train_head.py --config config.yaml --model head --run_id v1
    python train_head.py --config config.yaml --model head --run_id v1 --resume
    python train_head.py --config config.yaml --model head --run_id v1 --sanity_check
    python train_head.py --config config.yaml --model variance --run_id v1        # on the frozen head v1
    torchrun --nproc_per_node 2 train_head.py --config config.yaml --model head --run_id ddp

Checkpoints go to ``<project_root>/checkpoints/<model>/run_<id>/``.
"""

import modules.core.script_start  # noqa: F401  (first: see its docstring)
from modules.core import paths
from modules.core.stage import default_argument_parser, stage_context
from modules.stages import train_head as head_training
from modules.training.checkpoints import has_run


def main() -> None:
    parser = default_argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="head", choices=sorted(head_training.TASKS))
    parser.add_argument("--run_id", default="v1", help="name of the run folder (run_<id>)")
    parser.add_argument("--resume", action="store_true", help="continue the run from its last epoch")
    parser.add_argument("--resume-if-exists", action="store_true",
                        help="resume when the run folder holds a run (a finished run is left as it is), else start")
    parser.add_argument("--sanity_check", action="store_true", help="overfit one small batch and exit")
    parser.add_argument("--head_run_id", default=None, help="the frozen head a variance/fusion run uses (default: --run_id)")
    args = parser.parse_args()
    with stage_context(f"train_{args.model}", args,
                       output_dir=lambda cfg: paths.checkpoint_run_relpath(args.model, args.run_id),
                       main_rank_only=True) as ctx:
        resume = args.resume or (args.resume_if_exists and has_run(ctx.output_dir))
        head_training.run_stage(ctx, args.model, args.run_id, resume, args.sanity_check, args.head_run_id)


if __name__ == "__main__":
    main()
