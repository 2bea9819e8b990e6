"""Stage 3: run the frozen SAM once per image; cache its features and per-prompt-set logits.

Writes ``<project_root>/sam_cache/<backbone_id>/shard-III-of-NNN.h5`` (one file per shard;
``--num-shards/--shard-index``, torchrun or a SLURM array split the samples). Complete images
are skipped; a damaged shard file is salvaged and only what it lost is recomputed.
"""

import modules.core.script_start  # noqa: F401  (first: see its docstring)
from modules.stages import precompute_sam_outputs as precompute
from modules.core import paths
from modules.core.stage import default_argument_parser, resolve_shard, stage_context


def main() -> None:
    args = default_argument_parser(__doc__.splitlines()[0], sharded=True).parse_args()
    with stage_context("precompute_sam_outputs", args, output_dir=paths.SAM_CACHE_DIR, lock=False) as ctx:
        precompute.run_stage(ctx, resolve_shard(args))


if __name__ == "__main__":
    main()
