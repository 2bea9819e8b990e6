"""Stage 7: compare the uncertainty strategies per domain (``evaluate_uncertainty.py``).

For every sample of ``evaluation.split`` (its cache entry, prompt sets and ground truth) the stage
runs each strategy of ``evaluation.strategies`` (``modules/uncertainty.py``: a mean probability and
named uncertainty maps, ``P x 256 x 256`` FRAME256) and, with ``evaluation.refinement``, the dense
embedding fusion refinement and its ablations (``REFINEMENT_VARIANTS``). Every output is scored at
GROUND-TRUTH resolution: the FRAME256 maps are upsampled bilinearly to the original ``H x W``; the
mask is read at its own resolution and resized (nearest) to the image size when the two differ.

Per (method, uncertainty map, domain) and (method, map, ``overall``) a streaming
``metrics.UncertaintyAccumulator`` collects calibration, error detection, correlation and
sparsification on the device; per mask (one prompt set) a row holds the segmentation and
calibration metrics and the exact uncertainty metrics of the method's primary map. The report
files are written by ``modules/reports.py`` into ``<project_root>/reports/eval/<name>/``.

Resumability: units are samples. The accumulators, the per-mask rows and the finished sample ids
are checkpointed together in one file (``state.pt``, atomic) after a sample whenever the time since
the last checkpoint is at least ``1 / CHECKPOINT_MAX_OVERHEAD`` times what that checkpoint took, so
checkpointing costs at most ~10% of the run; a killed run resumes after the last checkpointed sample
(any later sample is recomputed, never counted twice). A rerun whose inputs are unchanged and
whose samples are all done only rewrites missing report files and loads no model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from modules.scoring import metrics
from modules.core.config import PipelineConfig
from modules.core.errors import PipelineError
from modules.scoring.entropy import binary_entropy_from_logits
from modules.core.fileio import atomic_path, cached_file_md5
from modules.uncertainty.strategies import EvalSample, Strategy, StrategyOutput
from modules.core.device import resolve_device
from modules.core.frames import FRAME256
from modules.core.paths import checkpoint_run_dir, eval_report_dir, laplace_run_dir

log = logging.getLogger("pipeline")

STATE_FILE = "state.pt"
STATE_FORMAT = 1
OVERALL = "overall"
#: Checkpoint the state after a sample once the time since the last checkpoint is at least
#: ``last checkpoint duration / CHECKPOINT_MAX_OVERHEAD``.
CHECKPOINT_MAX_OVERHEAD = 0.1
#: Logit given to ground-truth foreground (+) and background (-) when the mask is the oracle prompt.
ORACLE_MASK_LOGIT = 10.0
#: Lower end of the log-spaced bins of entropy-like maps (values below share the first bin).
LOG_BINNING_FLOOR = 1e-7
#: Map names of ``modules/uncertainty.py`` -> the ``metrics.UNCERTAINTY_RANGES`` entry they follow.
MAP_RANGE_ALIASES = {"total_entropy": "entropy"}
#: Maps whose values crowd near 0 over several decades get log-spaced bins.
LOG_SCALE_MAPS = ("entropy", "expected_entropy", "mutual_information", "std", "variance")


class EvaluationError(PipelineError):
    pass


# --------------------------------------------------------------------------- runs and artifacts


@dataclass(frozen=True)
class RunIds:
    """The trained runs the evaluation reads (``--run_id`` for all, or one override each)."""

    head: str
    variance: str
    laplace: str
    fusion: str

    @classmethod
    def resolve(cls, run_id: str, head: str | None = None, variance: str | None = None,
                laplace: str | None = None, fusion: str | None = None) -> "RunIds":
        return cls(head or run_id, variance or run_id, laplace or run_id, fusion or run_id)


def _head_path(cfg: PipelineConfig, runs: RunIds) -> Path:
    return checkpoint_run_dir(cfg.project_root, "head", runs.head) / "best.pt"


def _variance_path(cfg: PipelineConfig, runs: RunIds) -> Path:
    return checkpoint_run_dir(cfg.project_root, "variance", runs.variance) / "best.pt"


def _laplace_path(cfg: PipelineConfig, runs: RunIds) -> Path:
    return laplace_run_dir(cfg.project_root, cfg.laplace.target, runs.laplace) / "laplace_state.pt"


def _head_laplace_path(cfg: PipelineConfig, runs: RunIds) -> Path:
    """The head's own last-layer Laplace (what ``fusion.uncertainty_source: laplace_epistemic``
    reads in training and evaluation), whatever ``laplace.target`` the Laplace strategy scores."""
    return laplace_run_dir(cfg.project_root, "head", runs.head) / "laplace_state.pt"


def _fusion_path(cfg: PipelineConfig, runs: RunIds) -> Path:
    return checkpoint_run_dir(cfg.project_root, "fusion", runs.fusion) / "best.pt"


#: Artifact name -> the file it is loaded from (its md5 goes into the stage fingerprint).
ARTIFACT_FILES: dict[str, Callable[[PipelineConfig, RunIds], Path]] = {
    "sam_checkpoint": lambda cfg, runs: Path(cfg.sam.checkpoint),
    "head": _head_path,
    "variance": _variance_path,
    "laplace": _laplace_path,
    "head_laplace": _head_laplace_path,
    "fusion": _fusion_path,
}


class Artifacts:
    """The frozen models the strategies need, each loaded on first use.

    ``device``: where the head, its posterior, the variance network and the fusion module run
    (``training.device``); the backbone runs on ``sam.device``.
    """

    def __init__(self, cfg: PipelineConfig, runs: RunIds, device: torch.device) -> None:
        self.cfg, self.runs, self.device = cfg, runs, device

    @cached_property
    def backbone(self):
        from modules.sam.base import BackboneError
        from modules.sam.registry import load_backbone

        sam = self.cfg.sam
        try:
            return load_backbone(sam.family, sam.model_type, sam.checkpoint, sam.device)
        except BackboneError as exc:
            raise EvaluationError(f"sam.checkpoint: {exc}") from None

    @cached_property
    def head(self):
        from modules.stages.train_head import load_trained_head

        head, _ = load_trained_head(self.cfg, self.runs.head, self.device)
        return head

    @cached_property
    def posterior(self):
        """The head Laplace posterior of ``runs.laplace`` (the Laplace strategy, target ``head``)."""
        if self.runs.laplace == self.runs.head:
            return self.head_posterior  # loaded once when the refinement reads it too
        from modules.stages.fit_laplace import load_head_posterior

        _, posterior = load_head_posterior(self.cfg, self.runs.laplace, self.device)
        return posterior

    @cached_property
    def head_posterior(self):
        """The Laplace posterior fitted on the head of ``runs.head`` (the fusion's uncertainty source)."""
        from modules.stages.fit_laplace import load_head_posterior

        _, posterior = load_head_posterior(self.cfg, self.runs.head, self.device)
        return posterior

    @cached_property
    def variance_network(self):
        from modules.stages.train_head import load_trained_variance_network

        return load_trained_variance_network(self.cfg, self.runs.variance, self.device)

    @cached_property
    def fusion(self):
        from modules.stages.train_head import load_trained_fusion

        return load_trained_fusion(self.cfg, self.runs.fusion, self.device)


def artifact_md5s(cfg: PipelineConfig, runs: RunIds, names: set[str]) -> dict[str, str]:
    """``name -> md5`` of each needed artifact file; a missing one is a one-line error naming it."""
    hashes = {}
    for name in sorted(names):
        path = ARTIFACT_FILES[name](cfg, runs)
        if not path.is_file():
            raise EvaluationError(f"{path}: missing {name} artifact needed by evaluation.strategies / "
                                  "evaluation.refinement; run its stage first (or pick other run ids)")
        hashes[name] = cached_file_md5(path)
    return hashes


# --------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class StrategyBuilder:
    """How one ``evaluation.strategies`` entry is built, and the artifacts it needs."""

    needs: tuple[str, ...]
    build: Callable[[PipelineConfig, Artifacts], Strategy]


def _build_raw_sam(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    from modules.uncertainty.strategies import RawSamStrategy

    return RawSamStrategy(artifacts.device)


def _build_map_head(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    from modules.uncertainty.strategies import MapHeadStrategy

    return MapHeadStrategy(artifacts.head)


def _build_tta(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    from modules.uncertainty.tta import build_transforms
    from modules.uncertainty.strategies import TTAStrategy

    tta = cfg.evaluation.tta
    transforms = build_transforms(tta.transforms, cfg.section("evaluation.tta.magnitudes"))
    return TTAStrategy(artifacts.backbone, transforms, cfg.sam.prompt_mode, cfg.sam.multimask_policy,
                       cfg.sam.encoder_batch_size, seed=tta.seed, reuse_cached_features=tta.reuse_cached_features)


def _build_prompt_perturbation(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    from modules.uncertainty.prompt_perturbation import PerturbationMagnitudes
    from modules.uncertainty.strategies import PromptPerturbationStrategy

    settings = cfg.evaluation.prompt_perturbation
    magnitudes = PerturbationMagnitudes(settings.point_noise_px, settings.box_noise_fraction,
                                        settings.box_noise_max_px, settings.reference_side)
    return PromptPerturbationStrategy(artifacts.backbone, settings.num_samples, cfg.sam.prompt_mode,
                                      cfg.sam.multimask_policy, seed=settings.seed, magnitudes=magnitudes)


def _build_laplace(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    """The Laplace strategy of the fitted target: the head's last layer, or SAM's decoder."""
    if cfg.laplace.target == "sam_decoder":
        from modules.laplace.decoder import DecoderLaplaceStrategy, load_decoder_posterior

        posterior = load_decoder_posterior(cfg, artifacts.runs.laplace, artifacts.backbone.device)
        return DecoderLaplaceStrategy(artifacts.backbone, posterior, cfg.laplace.num_samples, seed=cfg.laplace.seed,
                                      prompt_mode=cfg.sam.prompt_mode, multimask_policy=cfg.sam.multimask_policy)
    from modules.uncertainty.strategies import LaplaceStrategy

    return LaplaceStrategy(artifacts.posterior, cfg.laplace.num_samples, seed=cfg.laplace.seed)


def _build_variance_network(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    from modules.uncertainty.strategies import VarianceNetworkStrategy

    return VarianceNetworkStrategy(artifacts.head, artifacts.variance_network,
                                   mc_samples=cfg.evaluation.variance_mc_samples, seed=cfg.training.seed)


#: ``evaluation.strategies`` name -> builder. The backbone-based strategies also need the SAM
#: checkpoint, which every run fingerprints anyway (it names the cache).
STRATEGY_BUILDERS: dict[str, StrategyBuilder] = {
    "raw_sam": StrategyBuilder((), _build_raw_sam),
    "map_head": StrategyBuilder(("head",), _build_map_head),
    "tta": StrategyBuilder(("sam_checkpoint",), _build_tta),
    "prompt_perturbation": StrategyBuilder(("sam_checkpoint",), _build_prompt_perturbation),
    "laplace": StrategyBuilder(("head", "laplace"), _build_laplace),
    "variance_network": StrategyBuilder(("head", "variance"), _build_variance_network),
}


# --------------------------------------------------------------------------- refinement


@dataclass(frozen=True)
class RefinementVariant:
    """One refinement pass: which first-pass mask goes in and which uncertainty map fuses with it.

    ``first_pass``: ``"sam"`` (the cached SAM logits) or ``"ground_truth"`` (the oracle mask prompt,
    +-``ORACLE_MASK_LOGIT``); ``source``: ``"configured"`` (``fusion.uncertainty_source``) or a name
    of ``fusion.UNCERTAINTY_SOURCES``.
    """

    first_pass: str
    source: str


#: Method name -> variant. The unrefined baselines are the ``raw_sam`` (and ``map_head``) strategies.
REFINEMENT_VARIANTS: dict[str, RefinementVariant] = {
    "refined": RefinementVariant("sam", "configured"),
    "refined_constant": RefinementVariant("sam", "constant"),
    "refined_oracle_mask": RefinementVariant("ground_truth", "configured"),
}
#: The unrefined method every refinement row is compared with.
UNREFINED_BASELINE = "raw_sam"
#: ``fusion.uncertainty_source`` -> the artifacts it needs.
SOURCE_NEEDS: dict[str, tuple[str, ...]] = {
    "laplace_epistemic": ("head", "head_laplace"),
    "map_entropy": ("head",),
    "variance_network": ("head", "variance"),
    "raw_sam_entropy": (),
    "constant": (),
}


class Refinement:
    """The fusion refinement variants for one sample, all prompt sets at once (``predict``)."""

    primary_map = "entropy"

    def __init__(self, cfg: PipelineConfig, artifacts: Artifacts) -> None:
        from modules.uncertainty.fusion import make_uncertainty_source
        from modules.sam.prompting import PROMPT_MODES

        self.backbone = artifacts.backbone
        self.fusion = artifacts.fusion.to(self.backbone.device)
        self.select_prompts = PROMPT_MODES[cfg.sam.prompt_mode]
        self.multimask_policy = cfg.fusion.multimask_policy
        self.head_device = artifacts.device
        needed = {variant.source for variant in REFINEMENT_VARIANTS.values()}
        configured = cfg.fusion.uncertainty_source
        self.sources = {}
        for source in needed:
            name = configured if source == "configured" else source
            needs = SOURCE_NEEDS[name]
            self.sources[source] = make_uncertainty_source(
                name,
                head=artifacts.head if "head" in needs else None,
                posterior=artifacts.head_posterior if "head_laplace" in needs else None,
                variance_network=artifacts.variance_network if "variance" in needs else None,
                num_samples=cfg.laplace.num_samples, seed=cfg.laplace.seed,
                log_var_range=(cfg.variance.log_var_min, cfg.variance.log_var_max),
            )

    def predict(self, sample: EvalSample) -> dict[str, StrategyOutput]:
        from modules.sam.prompting import Prompts
        from modules.uncertainty.fusion import refine
        from modules.data.imageio import resize_mask_nearest

        device = self.backbone.device
        inputs = self.select_prompts(sample.points, sample.labels, sample.boxes)
        prompts = Prompts(*(None if t is None else t.to(device) for t in
                            (inputs.point_coords, inputs.point_labels, inputs.boxes)))
        features = sample.features(device)
        sam_logits = torch.from_numpy(np.asarray(sample.cache_entry.logits)).float().to(device).unsqueeze(1)
        gt_256 = torch.from_numpy(resize_mask_nearest(sample.gt_mask, (FRAME256, FRAME256))).to(device)
        first_passes = {
            "sam": sam_logits,
            "ground_truth": torch.where(gt_256, ORACLE_MASK_LOGIT, -ORACLE_MASK_LOGIT)
            .float().expand_as(sam_logits).contiguous(),
        }
        head_inputs = sample.head_inputs.to(self.head_device)
        uncertainty = {name: source(head_inputs).float().to(device).unsqueeze(1)
                       for name, source in self.sources.items()}
        outputs = {}
        for method, variant in REFINEMENT_VARIANTS.items():
            logits, _ = refine(self.backbone, self.fusion, features, sample.original_hw, prompts,
                               first_passes[variant.first_pass], uncertainty[variant.source],
                               multimask_policy=self.multimask_policy)
            logits = logits[:, 0].float()
            outputs[method] = StrategyOutput(torch.sigmoid(logits), {"entropy": binary_entropy_from_logits(logits)},
                                             self.primary_map)
        return outputs


def needed_artifacts(cfg: PipelineConfig) -> set[str]:
    """Names of ``ARTIFACT_FILES`` the configured strategies and refinement read."""
    unknown = [name for name in cfg.evaluation.strategies if name not in STRATEGY_BUILDERS]
    if unknown:
        raise EvaluationError(f"evaluation.strategies: unknown {unknown} (known: {', '.join(STRATEGY_BUILDERS)})")
    if not cfg.evaluation.strategies and not cfg.evaluation.refinement:
        raise EvaluationError("evaluation.strategies: empty and evaluation.refinement is false; nothing to evaluate")
    names = {"sam_checkpoint"}
    for strategy in cfg.evaluation.strategies:
        names.update(STRATEGY_BUILDERS[strategy].needs)
    if cfg.evaluation.refinement:
        names.update(("fusion", *SOURCE_NEEDS[cfg.fusion.uncertainty_source]))
    return names


def method_names(cfg: PipelineConfig) -> list[str]:
    """Evaluated methods in report order: the strategies, then the refinement variants."""
    methods = list(dict.fromkeys(cfg.evaluation.strategies))
    if cfg.evaluation.refinement:
        if UNREFINED_BASELINE not in methods:
            methods.insert(0, UNREFINED_BASELINE)
        methods += list(REFINEMENT_VARIANTS)
    return methods


class Predictor:
    """Every method's ``StrategyOutput`` for one sample (strategies built on first use)."""

    def __init__(self, cfg: PipelineConfig, artifacts: Artifacts) -> None:
        self.cfg, self.artifacts = cfg, artifacts
        strategies = [m for m in method_names(cfg) if m in STRATEGY_BUILDERS]
        self.strategies = {name: STRATEGY_BUILDERS[name].build(cfg, artifacts) for name in strategies}
        self.refinement = Refinement(cfg, artifacts) if cfg.evaluation.refinement else None

    def predict(self, sample: EvalSample) -> dict[str, StrategyOutput]:
        outputs = {name: strategy.predict(sample) for name, strategy in self.strategies.items()}
        if self.refinement is not None:
            outputs.update(self.refinement.predict(sample))
        return outputs


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class EvalUnit:
    """One sample of the split, as the manifest lists it."""

    safe_id: str
    sample_id: str
    group: str
    image_path: str
    mask_path: str
    image_hw: tuple[int, int]


def list_units(cfg: PipelineConfig) -> list[EvalUnit]:
    """The split's samples; with ``evaluation.max_samples`` the first ones taken round-robin over
    the domains (so every domain is represented), in manifest order within a domain."""
    from modules.data.manifest import load_split_manifest

    split = cfg.evaluation.split
    table = load_split_manifest(cfg.project_root, split)
    units = [EvalUnit(str(row["safe_id"]), str(row["sample_id"]), str(row["group"]), str(row["image_path"]),
                      str(row["mask_path"]), (int(row["image_h"]), int(row["image_w"])))
             for row in table.to_dict("records")]
    if not units:
        raise EvaluationError(f"evaluation.split: the {split!r} split has no samples")
    limit = cfg.evaluation.max_samples
    if limit and limit < len(units):
        by_group: dict[str, list[EvalUnit]] = {}
        for unit in units:
            by_group.setdefault(unit.group, []).append(unit)
        queues = list(by_group.values())
        chosen: list[EvalUnit] = []
        while len(chosen) < limit:
            for queue in queues:
                if queue and len(chosen) < limit:
                    chosen.append(queue.pop(0))
        units = chosen
    return units


def read_ground_truth(unit: EvalUnit, threshold: int) -> np.ndarray:
    """``H x W`` bool mask at the image's size (resized nearest when the mask's size differs)."""
    from modules.data.imageio import MaskReadError, read_mask, resize_mask_nearest

    try:
        mask = read_mask(unit.mask_path, threshold=threshold)
    except (MaskReadError, OSError) as exc:
        from modules.core.stage import UnitError

        raise UnitError(f"{unit.mask_path}: {exc}") from None
    if mask.shape != unit.image_hw:
        mask = resize_mask_nearest(mask, unit.image_hw)
    return mask


def load_sample(cfg: PipelineConfig, cache, unit: EvalUnit) -> EvalSample:
    """The ``EvalSample`` of one unit (cache entry, prompt sets, ground truth, lazy image)."""
    from modules.data.imageio import read_image_rgb
    from modules.data.promptset import load_promptsets, promptset_path
    from modules.core.stage import UnitError

    if unit.safe_id not in cache:
        raise UnitError(f"{unit.safe_id}: not in the SAM cache {cache.folder}; rerun precompute_sam_outputs.py")
    path = promptset_path(cfg.project_root, cfg.evaluation.split, unit.safe_id)
    if not path.is_file():
        raise UnitError(f"{path}: missing prompt-set file; rerun generate_promptsets.py")
    record = load_promptsets(cfg.project_root, cfg.evaluation.split, unit.safe_id)
    gt_mask = read_ground_truth(unit, cfg.data.mask_threshold)
    return EvalSample.build(unit.safe_id, unit.group, gt_mask, cache.entry(unit.safe_id), record,
                            cfg.training.logit_clip, image_loader=lambda: read_image_rgb(unit.image_path))


# --------------------------------------------------------------------------- scoring


def map_binning(map_name: str) -> tuple[tuple[float, float], bool]:
    """``(u_range, log_scale)`` of an uncertainty map, from ``metrics.UNCERTAINTY_RANGES``."""
    kind = MAP_RANGE_ALIASES.get(map_name, map_name)
    if kind not in metrics.UNCERTAINTY_RANGES:
        raise EvaluationError(f"{map_name}: no value range for this uncertainty map in metrics.UNCERTAINTY_RANGES")
    low, high = metrics.UNCERTAINTY_RANGES[kind]
    log_scale = kind in LOG_SCALE_MAPS
    return ((max(low, LOG_BINNING_FLOOR) if log_scale else low, high), log_scale)


def upsample(maps: torch.Tensor, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``P x 256 x 256`` FRAME256 maps -> ``P x H x W`` float32 on ``device`` (bilinear, align_corners=False)."""
    maps = maps.to(device=device, dtype=torch.float32).unsqueeze(1)
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[:, 0]


SEGMENTATION_KEYS = ("iou", "dice", "boundary_iou_1pct", "boundary_iou_2pct", "precision", "recall", "mae",
                     "balanced_error_rate")
UNCERTAINTY_KEYS = ("auroc", "aupr", "ueo", "pearson", "spearman", "ause", "aurg", "error_rate")


@dataclass
class ScoredMethod:
    """One method's outputs at ground-truth resolution for one sample (``P x H x W`` each)."""

    prob: torch.Tensor
    maps: dict[str, torch.Tensor]
    primary_map: str


class Scoreboard:
    """Streaming accumulators per (method, map, domain) and the per-mask rows of every method."""

    def __init__(self, ece_bins: int, device: torch.device) -> None:
        self.ece_bins = int(ece_bins)
        self.device = device
        self.accumulators: dict[tuple[str, str, str], metrics.UncertaintyAccumulator] = {}
        self.primary_maps: dict[str, str] = {}
        self.rows: list[dict[str, Any]] = []
        self.done: list[str] = []

    def accumulator(self, method: str, map_name: str, domain: str) -> metrics.UncertaintyAccumulator:
        key = (method, map_name, domain)
        if key not in self.accumulators:
            u_range, log_scale = map_binning(map_name)
            self.accumulators[key] = metrics.UncertaintyAccumulator(u_range, log_scale=log_scale,
                                                                    calibration_bins=self.ece_bins)
        return self.accumulators[key]

    def score_sample(self, sample: EvalSample, outputs: dict[str, StrategyOutput]) -> dict[str, ScoredMethod]:
        """Score every method's output of one sample; returns the upsampled outputs."""
        size = sample.original_hw
        gt = torch.from_numpy(sample.gt_mask).to(self.device)
        gt_stack = gt.expand(sample.num_promptsets, *size)
        promptset_ids = [int(s["promptset_id"]) for s in sample.record["promptsets"]]
        scored = {}
        for method, output in outputs.items():
            prob = upsample(output.mean_prob, size, self.device).clamp_(0.0, 1.0)
            maps = {name: upsample(values, size, self.device) for name, values in output.maps.items()}
            self.primary_maps[method] = output.primary_map
            for name, values in maps.items():
                for domain in (sample.group, OVERALL):
                    self.accumulator(method, name, domain).update(prob, gt_stack, values)
            for index, promptset_id in enumerate(promptset_ids):
                self.rows.append(self._mask_row(sample, method, promptset_id, prob[index], gt,
                                                {name: values[index] for name, values in maps.items()},
                                                output.primary_map))
            scored[method] = ScoredMethod(prob, maps, output.primary_map)
        self.done.append(sample.safe_id)
        return scored

    def _mask_row(self, sample: EvalSample, method: str, promptset_id: int, prob: torch.Tensor, gt: torch.Tensor,
                  maps: dict[str, torch.Tensor], primary_map: str) -> dict[str, Any]:
        calibration = metrics.calibration_metrics(prob, gt, n_bins=self.ece_bins)
        uncertainty = metrics.uncertainty_metrics(prob, gt, maps[primary_map])
        row = {"sample_id": sample.sample_id, "safe_id": sample.safe_id, "group": sample.group,
               "promptset_id": promptset_id, "method": method, "primary_map": primary_map,
               **metrics.segmentation_metrics(prob, gt),
               "ece": calibration["ece"], "brier": calibration["brier"], "nll": calibration["nll"],
               "ece_bins": self.ece_bins}
        row.update({f"u_{key}": uncertainty[key] for key in UNCERTAINTY_KEYS})
        row["mean_uncertainty"] = uncertainty["mean_uncertainty"]
        row.update({f"mean_{name}": float(values.double().mean()) for name, values in maps.items()})
        return row

    # ----------------------------------------------------------- checkpoint

    def state(self) -> dict[str, Any]:
        """Everything needed to resume (tensors on the CPU; loadable with ``weights_only=True``)."""
        return {
            "format": STATE_FORMAT,
            "ece_bins": self.ece_bins,
            "done": list(self.done),
            "rows": list(self.rows),
            "primary_maps": dict(self.primary_maps),
            "accumulators": [{"method": method, "map": map_name, "domain": domain,
                              "state": accumulator_state(accumulator)}
                             for (method, map_name, domain), accumulator in self.accumulators.items()],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT or state.get("ece_bins") != self.ece_bins:
            raise EvaluationError("state.pt: written by another version or with other ece_bins; rerun with --force")
        self.done = list(state["done"])
        self.rows = list(state["rows"])
        self.primary_maps = dict(state["primary_maps"])
        for item in state["accumulators"]:
            restore_accumulator(self.accumulator(item["method"], item["map"], item["domain"]), item["state"],
                                self.device)


# The accumulators of modules/metrics.py have no state_dict API (yet): their state is every tensor
# attribute of their four parts, allocated on the first update. These two helpers read and restore
# exactly those tensors; ``_device`` marks a part as allocated.
_ACCUMULATOR_PARTS = ("calibration", "error_detection", "correlation", "sparsification")
#: Tensors larger than this are stored as (nonzero positions, values): the joint histograms are sparse.
_SPARSE_MIN_ELEMENTS = 4096


def _pack_tensor(tensor: torch.Tensor) -> dict[str, Any]:
    tensor = tensor.detach().cpu()
    if tensor.numel() < _SPARSE_MIN_ELEMENTS:
        return {"dense": tensor.clone()}
    flat = tensor.reshape(-1)
    positions = torch.nonzero(flat, as_tuple=True)[0]
    return {"shape": list(tensor.shape), "positions": positions, "values": flat[positions].clone()}


def _unpack_tensor(packed: dict[str, Any], device: torch.device) -> torch.Tensor:
    if "dense" in packed:
        return packed["dense"].to(device)
    values = packed["values"]
    flat = torch.zeros(math.prod(packed["shape"]), dtype=values.dtype)
    flat[packed["positions"]] = values
    return flat.reshape(packed["shape"]).to(device)


def accumulator_state(accumulator: metrics.UncertaintyAccumulator) -> dict[str, dict[str, Any]]:
    """``part -> tensor name -> packed tensor`` of an ``UncertaintyAccumulator`` (parts never updated left out)."""
    state = {}
    for part in _ACCUMULATOR_PARTS:
        component = getattr(accumulator, part)
        if component._device is not None:
            state[part] = {name: _pack_tensor(value) for name, value in vars(component).items()
                           if torch.is_tensor(value)}
    return state


def restore_accumulator(accumulator: metrics.UncertaintyAccumulator, state: dict[str, dict[str, Any]],
                        device: torch.device) -> None:
    """Load ``accumulator_state`` output into a freshly built accumulator of the same settings."""
    for part, tensors in state.items():
        component = getattr(accumulator, part)
        restored = {name: _unpack_tensor(packed, device) for name, packed in tensors.items()}
        for name, value in restored.items():
            setattr(component, name, value)
        # the device as tensors report it ("cuda:0", not "cuda"), which later updates are compared with
        component._device = next(iter(restored.values())).device


def save_state(path: Path, scoreboard: Scoreboard) -> None:
    with atomic_path(path) as tmp:
        torch.save(scoreboard.state(), tmp)


def load_state_file(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file: start over rather than crash
        log.warning("%s: unreadable evaluation state (%s); starting over", path, exc)
        return None


class CheckpointPolicy:
    """Checkpoint after a sample when the time since the last checkpoint is at least
    ``last checkpoint duration / max_overhead`` (the first sample always checkpoints)."""

    def __init__(self, max_overhead: float = CHECKPOINT_MAX_OVERHEAD) -> None:
        self.max_overhead = max_overhead
        self.last_end = time.perf_counter()
        self.last_duration = 0.0

    def due(self) -> bool:
        return time.perf_counter() - self.last_end >= self.last_duration / self.max_overhead

    def record(self, started: float) -> None:
        self.last_end = time.perf_counter()
        self.last_duration = self.last_end - started


# --------------------------------------------------------------------------- the stage


@dataclass
class QualitativeSelection:
    """The first ``per_domain`` samples of each domain (in unit order) get qualitative panels."""

    per_domain: int
    chosen: set[str] = field(default_factory=set)

    @classmethod
    def from_units(cls, units: list[EvalUnit], per_domain: int) -> "QualitativeSelection":
        counts: dict[str, int] = {}
        selection = cls(per_domain)
        for unit in units:
            if counts.get(unit.group, 0) < per_domain:
                counts[unit.group] = counts.get(unit.group, 0) + 1
                selection.chosen.add(unit.safe_id)
        return selection


def fingerprint_sections() -> list[str]:
    """Config keys whose change invalidates the reports (device and worker settings do not)."""
    return ["evaluation", "sam.family", "sam.model_type", "sam.prompt_mode", "sam.multimask_policy", "laplace",
            "fusion", "head", "variance", "training.logit_clip", "training.seed", "data.mask_threshold"]


def run_stage(ctx, runs: RunIds) -> None:
    """Evaluate every configured method on ``evaluation.split`` and write the reports (module docstring)."""
    from modules.evaluation import reports
    from modules.core.fileio import file_md5
    from modules.data.manifest import manifest_path
    from modules.cache.packing import open_cache

    cfg = ctx.cfg
    folder = ctx.output_dir
    split_manifest = manifest_path(cfg.project_root, cfg.evaluation.split)
    units = list_units(cfg)
    upstream = {"checkpoints": artifact_md5s(cfg, runs, needed_artifacts(cfg)),
                "split_manifest": file_md5(split_manifest)}
    fresh = ctx.check_inputs(fingerprint_sections(), upstream)
    state_path = folder / STATE_FILE
    if fresh:
        reports.remove_reports(folder)
        state_path.unlink(missing_ok=True)

    device = resolve_device(cfg.training.device, key="training.device")
    scoreboard = Scoreboard(cfg.evaluation.ece_bins, device)
    previous = None if fresh else load_state_file(state_path)
    if previous is not None:
        scoreboard.load_state(previous)
    done = set(scoreboard.done)
    remaining = [unit for unit in units if unit.safe_id not in done]
    if not remaining and reports.reports_complete(folder):
        print(f"[{ctx.name}] {folder}: all {len(units)} samples evaluated and reports written; skipped")
        ctx.summary({"skipped": True, "samples": len(units)})
        return
    print(f"[{ctx.name}] {len(units)} samples of {cfg.evaluation.split!r} ({len(done)} done before), "
          f"methods: {', '.join(method_names(cfg))}")

    artifacts = Artifacts(cfg, runs, device)
    predictor: Predictor | None = None  # built on the first sample that needs work
    cache = open_cache(cfg) if remaining else None
    qualitative = QualitativeSelection.from_units(units, cfg.evaluation.qualitative_per_domain)
    checkpoints = CheckpointPolicy()
    methods = method_names(cfg)

    def process(unit: EvalUnit) -> None:
        nonlocal predictor
        if predictor is None:
            predictor = Predictor(cfg, artifacts)
        sample = load_sample(cfg, cache, unit)
        with torch.inference_mode():
            outputs = predictor.predict(sample)
            scored = scoreboard.score_sample(sample, outputs)
        if unit.safe_id in qualitative.chosen:
            reports.write_qualitative_panels(folder, sample, scored, methods)
        if checkpoints.due():
            started = time.perf_counter()
            save_state(state_path, scoreboard)
            checkpoints.record(started)

    counts = ctx.run_units(units, lambda unit: unit.safe_id in done, process, desc="evaluating",
                           unit_name=lambda unit: unit.safe_id)
    save_state(state_path, scoreboard)
    for name, reason in counts.failures[:10]:
        print(f"  failed: {name}: {reason}")
    if not scoreboard.done:
        raise EvaluationError(f"{folder}: no sample could be evaluated ({counts.failed} failed)")
    written = reports.write_reports(folder, scoreboard, methods, list(REFINEMENT_VARIANTS), UNREFINED_BASELINE,
                                    ctx.tracker)
    ctx.summary({"samples": len(scoreboard.done), "masks": len(scoreboard.rows), **counts.as_dict(),
                 **written})
    if counts.failed:
        raise EvaluationError(f"{folder}: {counts.failed} samples failed (listed above); the reports cover the "
                              f"{len(scoreboard.done)} others; fix the inputs and rerun to add them")
