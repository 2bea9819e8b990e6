"""Stage 4.5: pack each split's head inputs and targets into one HDF5 file.

Writes ``<project_root>/training_data/<split>.h5`` (via ``<split>.h5.partial``, resumable row by
row); a split whose file is complete and was packed from the same inputs is skipped.
"""

import modules.core.script_start  # noqa: F401  (first: see its docstring)
from modules.core import paths
from modules.core.stage import default_argument_parser, stage_context
from modules.stages import pack_to_hdf5


def main() -> None:
    args = default_argument_parser(__doc__.splitlines()[0]).parse_args()
    with stage_context("pack_to_hdf5", args, output_dir=paths.TRAINING_DATA_DIR) as ctx:
        pack_to_hdf5.run_stage(ctx)


if __name__ == "__main__":
    main()
