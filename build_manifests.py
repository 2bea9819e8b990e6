"""Stage 1: scan and validate image/mask pairs, and split them 80/10/10 (fixed after the first run).

Writes ``<project_root>/manifests/{all_samples,train,val,test,invalid_samples}.csv``. With
``demo.enabled`` it first writes the procedural demo data set.
"""

import modules.core.script_start  # noqa: F401  (first: see its docstring)
from modules.core import paths
from modules.core.stage import default_argument_parser, stage_context
from modules.stages import build_manifests


def main() -> None:
    args = default_argument_parser(__doc__.splitlines()[0]).parse_args()
    with stage_context("build_manifests", args, output_dir=paths.MANIFEST_DIR) as ctx:
        build_manifests.run_stage(ctx)


if __name__ == "__main__":
    main()
