"""Stage 6: fit a last-layer diagonal Laplace on the trained head; prior by evidence, temperature by val NLL.

    python fit_laplace.py --config config.yaml --run_id v1          # head of checkpoints/head/run_v1
    python fit_laplace.py --config config.yaml --run_id v1 --force  # refit

Artifacts go to ``<project_root>/laplace/<target>/run_<id>/``.
"""

import modules.core.script_start  # noqa: F401  (first: see its docstring)
from modules.stages import fit_laplace as laplace_stage
from modules.core import paths
from modules.core.stage import default_argument_parser, stage_context


def main() -> None:
    parser = default_argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--run_id", default="v1", help="the head run (checkpoints/head/run_<id>) to fit on")
    args = parser.parse_args()

    def output_dir(cfg) -> str:
        return paths.laplace_run_relpath(cfg.laplace.target, args.run_id)

    with stage_context("fit_laplace", args, output_dir=output_dir) as ctx:
        laplace_stage.run_stage(ctx, args.run_id)


if __name__ == "__main__":
    main()
