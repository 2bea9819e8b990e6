"""The pipeline's W&B lineage: the artifacts each stage consumes and the record it leaves.

manifests -> promptsets -> sam_cache -> training_index -> packed -> head / variance -> laplace ->
fusion -> evaluation. ``stage_context`` declares a stage's inputs when its run opens
(``declare_stage_inputs``) and logs its output record when it finishes (``log_stage_output``). The
record of a data stage is small on purpose (the stage's fingerprint and resolved config, not the
data): enough for the graph and for seeing what a version was made from. The trained models, the
Laplace posteriors and the evaluation report are logged by their stages under the names below.
"""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path

#: Output record of each data stage: (artifact name, type). Other stages log their own outputs.
DATA_STAGE_OUTPUTS: dict[str, tuple[str, str]] = {
    "build_manifests": ("manifests", "dataset"),
    "generate_promptsets": ("promptsets", "promptsets"),
    "precompute_sam_outputs": ("sam_cache", "sam_cache"),
    "build_training_indices": ("training_index", "training_index"),
    "pack_to_hdf5": ("packed", "packed"),
}
#: The small files of an output folder that make up its record (those present).
RECORD_FILES = (".stage.json", "config.resolved.yaml")


def model_artifact(model: str, run_id: str) -> tuple[str, str]:
    """The artifact ``train_head.py --model <model>`` logs (its best checkpoint)."""
    return f"{model}-run_{run_id}", "model"


def laplace_artifact(target: str, run_id: str) -> tuple[str, str]:
    """The artifact ``fit_laplace.py`` logs for ``laplace.target``."""
    return f"laplace-{target}-run_{run_id}", "laplace"


def evaluation_artifact(report_name: str) -> tuple[str, str]:
    """The artifact of one evaluation report folder (``reports/eval/<report_name>``)."""
    return f"evaluation-{report_name}", "evaluation"


def _run_id(args: Namespace, model: str) -> str:
    return getattr(args, f"{model}_run_id", None) or getattr(args, "run_id", None) or "v1"


def stage_inputs(stage: str, args: Namespace, cfg) -> list[tuple[str, str]]:
    """``[(artifact name, type)]`` that ``stage`` reads, for its arguments and config."""
    if stage == "generate_promptsets":
        return [DATA_STAGE_OUTPUTS["build_manifests"]]
    if stage in ("precompute_sam_outputs",):
        return [DATA_STAGE_OUTPUTS["build_manifests"], DATA_STAGE_OUTPUTS["generate_promptsets"]]
    if stage in ("build_training_indices", "visualize_sanity"):
        return [DATA_STAGE_OUTPUTS["precompute_sam_outputs"]]
    if stage == "pack_to_hdf5":
        return [DATA_STAGE_OUTPUTS["build_training_indices"], DATA_STAGE_OUTPUTS["precompute_sam_outputs"]]
    if stage.startswith("train_"):
        inputs = [DATA_STAGE_OUTPUTS["pack_to_hdf5"]]
        if stage != "train_head":  # the variance network and the fusion module sit on a frozen head
            inputs.append(model_artifact("head", _run_id(args, "head")))
        if stage == "train_fusion" and cfg.fusion.uncertainty_source == "laplace_epistemic":
            inputs.append(laplace_artifact("head", _run_id(args, "head")))
        return inputs
    if stage == "fit_laplace":
        return [DATA_STAGE_OUTPUTS["pack_to_hdf5"], model_artifact("head", _run_id(args, "head"))]
    if stage == "evaluate_uncertainty":  # + the trained models it reads: ``evaluation_model_inputs``
        return [DATA_STAGE_OUTPUTS["generate_promptsets"], DATA_STAGE_OUTPUTS["precompute_sam_outputs"]]
    return []


def evaluation_model_inputs(needed: list[str], run_ids: dict[str, str], laplace_target: str) -> list[tuple[str, str]]:
    """The trained artifacts an evaluation reads: ``needed``, the evaluation's names for them
    (``evaluation.methods.needed_artifacts``), ``run_ids`` its ``RunIds`` as a dict."""
    named = {"head": lambda: model_artifact("head", run_ids["head"]),
             "variance": lambda: model_artifact("variance", run_ids["variance"]),
             "fusion": lambda: model_artifact("fusion", run_ids["fusion"]),
             "laplace": lambda: laplace_artifact(laplace_target, run_ids["laplace"]),
             "head_laplace": lambda: laplace_artifact("head", run_ids["head"])}
    return [named[name]() for name in sorted(needed) if name in named]


def declare_stage_inputs(tracker, stage: str, args: Namespace, cfg) -> None:
    """``tracker.use_artifact`` for every input of ``stage``."""
    for name, kind in stage_inputs(stage, args, cfg):
        tracker.use_artifact(name, kind)


def log_stage_output(tracker, stage: str, output_dir: Path) -> None:
    """Log the record of a finished data stage (its ``RECORD_FILES`` in ``output_dir``)."""
    if stage not in DATA_STAGE_OUTPUTS:
        return
    files = [Path(output_dir) / name for name in RECORD_FILES if (Path(output_dir) / name).is_file()]
    if files:
        name, kind = DATA_STAGE_OUTPUTS[stage]
        tracker.log_artifact(files, name=name, type=kind, root=output_dir)
