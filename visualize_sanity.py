"""Sanity panels from the SAM cache: image, ground truth, SAM mask, SAM logits, prompt maps.

Writes ``<project_root>/reports/debug_panels/<split>__<safe_id>.png`` for the first ``--n``
cached samples of ``--split`` (first prompt set of each), everything shown in FRAME256.
"""

import modules.core.script_start  # noqa: F401  (first: see its docstring)
from modules.stages import visualize_sanity
from modules.core import paths
from modules.core.stage import default_argument_parser, stage_context


def main() -> None:
    parser = default_argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="number of samples (default 8)")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    args = parser.parse_args()
    with stage_context("visualize_sanity", args, output_dir=paths.DEBUG_PANELS_DIR) as ctx:
        visualize_sanity.write_sanity_panels(ctx, args.split, args.n)


if __name__ == "__main__":
    main()
