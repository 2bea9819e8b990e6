"""Stage 4: index every (sample, prompt set) whose image is in the SAM cache, per split.

Writes ``<project_root>/training_data/<split>_index.csv``; samples missing from the cache are left
out and counted. A rerun with unchanged inputs rewrites nothing.
"""

import modules.core.script_start  # noqa: F401  (first: see its docstring)
from modules.core import paths
from modules.core.stage import default_argument_parser, stage_context
from modules.stages import build_training_indices


def main() -> None:
    args = default_argument_parser(__doc__.splitlines()[0]).parse_args()
    with stage_context("build_training_indices", args, output_dir=paths.TRAINING_DATA_DIR) as ctx:
        build_training_indices.run_stage(ctx)


if __name__ == "__main__":
    main()
