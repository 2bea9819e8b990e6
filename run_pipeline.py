"""Run every stage in order on one config (the README's main command).

Each stage runs as its own process (its own W&B run), skips the work it already finished, and
stops the pipeline with its one-line error if it fails. Extra arguments (``--set``, ``--force``)
are passed to every stage.
"""

import subprocess
import sys
from pathlib import Path

from modules.core.stage import default_argument_parser

REPO = Path(__file__).resolve().parent

RUN_ID = "v1"

STAGES = [
    ("build_manifests.py", []),
    ("generate_promptsets.py", []),
    ("precompute_sam_outputs.py", []),
    ("visualize_sanity.py", ["--n", "8", "--split", "train"]),
    ("build_training_indices.py", []),
    ("pack_to_hdf5.py", []),
    ("train_head.py", ["--model", "head", "--run_id", RUN_ID, "--resume-if-exists"]),
    ("train_head.py", ["--model", "variance", "--run_id", RUN_ID, "--resume-if-exists"]),
    ("fit_laplace.py", ["--run_id", RUN_ID]),
    ("train_head.py", ["--model", "fusion", "--run_id", RUN_ID, "--resume-if-exists"]),
    ("evaluate_uncertainty.py", ["--run_id", RUN_ID]),
]


def main() -> None:
    args = default_argument_parser(__doc__.splitlines()[0]).parse_args()
    shared = ["--config", args.config] + [a for o in args.overrides for a in ("--set", o)]
    if args.force:
        shared.append("--force")
    for script, extra in STAGES:
        print(f"=== {script}", flush=True)
        result = subprocess.run([sys.executable, str(REPO / script), *shared, *extra])
        if result.returncode != 0:
            sys.exit(f"run_pipeline: {script} failed with exit code {result.returncode}")
    print("=== pipeline finished")


if __name__ == "__main__":
    main()
