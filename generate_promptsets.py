"""Stage 2: draw seeded point/box prompt sets for every sample of every split.

Writes ``<project_root>/prompt_sets/<split>/<safe_id>.json``; samples already done are skipped.
"""

import modules.core.script_start  # noqa: F401  (first: see its docstring)
from modules.core import paths
from modules.core.stage import default_argument_parser, stage_context
from modules.stages import generate_promptsets


def main() -> None:
    args = default_argument_parser(__doc__.splitlines()[0]).parse_args()
    with stage_context("generate_promptsets", args, output_dir=paths.PROMPT_SET_DIR) as ctx:
        generate_promptsets.run_stage(ctx)


if __name__ == "__main__":
    main()
