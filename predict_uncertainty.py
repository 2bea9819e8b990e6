"""SAM's mask and the fitted uncertainty of one image for your prompts (a PNG overlay, the maps, a JSON).

    python predict_uncertainty.py --config config.yaml --image photo.jpg --point 310,220 --point 40,35,0
    python predict_uncertainty.py --config config.yaml --image photo.jpg --box 250,160,420,300 --run_id v1
    python predict_uncertainty.py --config config.yaml --image photo.jpg --prompts prompts.json   # many prompt sets

``--point X,Y[,LABEL]`` (repeatable; label 1 positive, the default, or 0 negative) and ``--box
X0,Y0,X1,Y1`` are ORIGINAL pixels (x to the right, y down, inclusive). ``--prompts FILE``: a JSON list
of prompt sets ``{"points": [[x, y], ...], "labels": [1, 0, ...], "box": [x0, y0, x1, y1] or null}``,
decoded together. Files go to ``<project_root>/predictions/<image stem>/`` (or ``--out``, inside the
project root): ``overlay.png``, ``probability.npy``/``.png``, ``<method>_<map>.npy``/``.png`` and
``prediction.json`` (SAM's predicted IoU, mask-quality scores, the suggested next click per policy).
"""

import modules.core.script_start  # noqa: F401  (first: see its docstring)
from pathlib import Path

from modules.core import paths
from modules.core.stage import default_argument_parser, stage_context
from modules.evaluation.runs import RunIds
from modules.interactive.predictor import PREDICTOR_METHODS, UncertainPredictor
from modules.sam.prompting import MULTIMASK_POLICIES
from modules.stages.predict_uncertainty import check_prediction_inputs, promptsets_from_arguments, run_command


def main() -> None:
    parser = default_argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]",
                        help="a click in ORIGINAL pixels, label 1 (default) or 0 (repeatable)")
    parser.add_argument("--box", default=None, metavar="X0,Y0,X1,Y1", help="a box in ORIGINAL pixels (inclusive)")
    parser.add_argument("--prompts", default=None, metavar="FILE", help="a JSON list of prompt sets (batched)")
    parser.add_argument("--methods", default=None, help="comma-separated, of: " + ", ".join(PREDICTOR_METHODS)
                        + " (default: every cheap method whose runs exist)")
    parser.add_argument("--out", default=None, help="output folder inside the project root "
                        "(default: predictions/<image stem>)")
    parser.add_argument("--multimask_policy", default=None, choices=sorted(MULTIMASK_POLICIES),
                        help="decoder output kept (default: sam.multimask_policy, what stage 3 cached); single: "
                        "SAM's single-mask output, which SAM and SAM 2 return for more than one prompt")
    parser.add_argument("--run_id", default="v1", help="the trained runs (head, variance, Laplace, fusion)")
    for model in ("head", "variance", "laplace", "fusion"):
        parser.add_argument(f"--{model}_run_id", default=None, help=f"the {model} run (default: --run_id)")
    args = parser.parse_args()
    args.overrides.append("wandb.enabled=false")  # one image is not an experiment to track
    runs = RunIds.resolve(args.run_id, args.head_run_id, args.variance_run_id, args.laplace_run_id,
                          args.fusion_run_id)
    output = args.out or paths.prediction_relpath(Path(args.image).stem)
    with stage_context("predict_uncertainty", args, output_dir=output) as ctx:
        check_prediction_inputs(args.image)
        promptsets = promptsets_from_arguments(args.point, args.box, args.prompts)
        methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
        run_command(ctx, args.image, promptsets, UncertainPredictor(ctx.cfg, runs, methods), args.multimask_policy)


if __name__ == "__main__":
    main()
