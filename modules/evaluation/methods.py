"""The evaluated methods: how each ``evaluation.strategies`` entry is built from the loaded
artifacts, the fusion refinement variants and their ablations, and the ``Predictor`` that runs them
all on one sample.

Only the oracle ablations (``ORACLE_METHODS``, each named so) read the ground truth; the
``Predictor`` hands every other method the ``EvalSample`` alone, which has none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Union

import numpy as np
import torch

from modules.core.config import PipelineConfig
from modules.core.frames import FRAME256
from modules.data.imageio import resize_mask_nearest
from modules.evaluation.runs import Artifacts, EvaluationError
from modules.evaluation.samples import LabelledSample
from modules.laplace.decoder import load_decoder_posterior
from modules.sam.prompting import PROMPT_MODES, Prompts
from modules.scoring.entropy import binary_entropy_from_logits
from modules.uncertainty.prompt_perturbation import PerturbationMagnitudes
from modules.uncertainty.strategies import (EvalSample, LaplaceStrategy, MapHeadStrategy,
                                            OraclePromptPerturbationStrategy, OracleStrategy,
                                            PromptPerturbationStrategy, RawSamStrategy, Strategy, StrategyOutput,
                                            TTAStrategy, VarianceNetworkStrategy)
from modules.uncertainty.decoder_laplace import DecoderLaplaceStrategy
from modules.uncertainty.fusion import SWITCH_FILE, gate_by_predicted_iou, make_uncertainty_source, refine
from modules.uncertainty.tta import build_transforms

#: Logit given to ground-truth foreground (+) and background (-) when the mask is the oracle prompt.
ORACLE_MASK_LOGIT = 10.0


@dataclass(frozen=True)
class StrategyBuilder:
    """How one ``evaluation.strategies`` entry is built, and the artifacts it needs."""

    needs: tuple[str, ...]
    build: Callable[[PipelineConfig, Artifacts], Union[Strategy, OracleStrategy]]


def _build_raw_sam(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    return RawSamStrategy(artifacts.device)


def _build_map_head(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    return MapHeadStrategy(artifacts.head)


def _build_tta(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    tta = cfg.evaluation.tta
    transforms = build_transforms(tta.transforms, cfg.section("evaluation.tta.magnitudes"))
    return TTAStrategy(artifacts.backbone, transforms, cfg.sam.prompt_mode, cfg.sam.multimask_policy,
                       cfg.sam.encoder_batch_size, seed=tta.seed, reuse_cached_features=tta.reuse_cached_features)


def _perturbation_magnitudes(cfg: PipelineConfig) -> PerturbationMagnitudes:
    settings = cfg.evaluation.prompt_perturbation
    return PerturbationMagnitudes(settings.point_noise_px, settings.box_noise_fraction, settings.box_noise_max_px,
                                  settings.reference_side)


def _build_prompt_perturbation(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    settings = cfg.evaluation.prompt_perturbation
    return PromptPerturbationStrategy(artifacts.backbone, settings.num_samples, cfg.sam.prompt_mode,
                                      cfg.sam.multimask_policy, seed=settings.seed,
                                      magnitudes=_perturbation_magnitudes(cfg), label_source=settings.label_source)


def _build_prompt_perturbation_oracle(cfg: PipelineConfig, artifacts: Artifacts) -> OracleStrategy:
    settings = cfg.evaluation.prompt_perturbation
    return OraclePromptPerturbationStrategy(artifacts.backbone, settings.num_samples, cfg.sam.prompt_mode,
                                            cfg.sam.multimask_policy, seed=settings.seed,
                                            magnitudes=_perturbation_magnitudes(cfg))


def _build_laplace(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    """The Laplace strategy of the fitted target: the head's last layer, or SAM's decoder."""
    if cfg.laplace.target == "sam_decoder":
        posterior = load_decoder_posterior(cfg, artifacts.runs.laplace, artifacts.backbone.device)
        return DecoderLaplaceStrategy(artifacts.backbone, posterior, cfg.laplace.num_samples, seed=cfg.laplace.seed,
                                      prompt_mode=cfg.sam.prompt_mode, multimask_policy=cfg.sam.multimask_policy,
                                      predictive=cfg.laplace.predictive)
    return LaplaceStrategy(artifacts.posterior, cfg.laplace.num_samples, seed=cfg.laplace.seed,
                           predictive=cfg.laplace.predictive)


def _build_variance_network(cfg: PipelineConfig, artifacts: Artifacts) -> Strategy:
    return VarianceNetworkStrategy(artifacts.head, artifacts.variance_network,
                                   mc_samples=cfg.evaluation.variance_mc_samples, seed=cfg.training.seed,
                                   loss=cfg.variance.loss)


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
#: The oracle ablations ``evaluation.strategies`` may also list: name -> builder of an ``OracleStrategy``.
ORACLE_BUILDERS: dict[str, StrategyBuilder] = {
    "prompt_perturbation_oracle": StrategyBuilder(("sam_checkpoint",), _build_prompt_perturbation_oracle),
}
#: Every ``evaluation.strategies`` name.
ALL_BUILDERS: dict[str, StrategyBuilder] = {**STRATEGY_BUILDERS, **ORACLE_BUILDERS}


def build_strategy(name: str, cfg: PipelineConfig, artifacts: Artifacts,
                   multimask_policy: str | None = None) -> Strategy:
    """``STRATEGY_BUILDERS[name]`` for prompt sets decoded with ``multimask_policy`` (default
    ``sam.multimask_policy``): the strategies that decode again (TTA, prompt perturbation) keep that
    output too."""
    if multimask_policy is not None and multimask_policy != cfg.sam.multimask_policy:
        cfg = replace(cfg, sam=replace(cfg.sam, multimask_policy=multimask_policy))
    return STRATEGY_BUILDERS[name].build(cfg, artifacts)


def decoder_laplace_refusal(cfg: PipelineConfig, multimask_policy: str) -> str | None:
    """Why the SAM-decoder Laplace cannot score the outputs ``multimask_policy`` keeps (its posterior
    is per mask token, fitted on the tokens ``sam.multimask_policy`` kept), or None where it can or
    the Laplace's target is the head."""
    if cfg.laplace.target != "sam_decoder" or multimask_policy == cfg.sam.multimask_policy:
        return None
    return (f"the SAM-decoder Laplace (laplace.target: sam_decoder) was fitted on the mask tokens of "
            f"sam.multimask_policy {cfg.sam.multimask_policy!r}, not on those of {multimask_policy!r}")


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

    @property
    def oracle(self) -> bool:
        return self.first_pass == "ground_truth"


#: Method name -> variant. The unrefined baselines are the ``raw_sam`` (and ``map_head``) strategies.
REFINEMENT_VARIANTS: dict[str, RefinementVariant] = {
    "refined": RefinementVariant("sam", "configured"),
    "refined_constant": RefinementVariant("sam", "constant"),
    "refined_oracle_mask": RefinementVariant("ground_truth", "configured"),
}
#: The unrefined method every refinement row is compared with.
UNREFINED_BASELINE = "raw_sam"
#: The methods that read the ground truth (ablations, each named so).
ORACLE_METHODS = (*ORACLE_BUILDERS, *(name for name, variant in REFINEMENT_VARIANTS.items() if variant.oracle))
#: ``fusion.uncertainty_source`` -> the artifacts it needs.
SOURCE_NEEDS: dict[str, tuple[str, ...]] = {
    "laplace_epistemic": ("head", "head_laplace"),
    "map_entropy": ("head",),
    "variance_network": ("head", "variance"),
    "raw_sam_entropy": (),
    "constant": (),
}


@dataclass(frozen=True)
class RefinementInputs:
    """One sample's shared refinement inputs on the backbone's device: ``features``, ``prompts``
    (chosen by ``sam.prompt_mode``), ``sam_logits`` ``P x 1 x 256 x 256``, ``uncertainty``
    (``Refinement.sources`` key -> ``P x 1 x 256 x 256``) and ``sam_predicted_iou`` ``P``."""

    features: dict[str, torch.Tensor]
    original_hw: tuple[int, int]
    prompts: Prompts
    sam_logits: torch.Tensor
    uncertainty: dict[str, torch.Tensor]
    sam_predicted_iou: torch.Tensor  # P: SAM's predicted IoU of its cached first-pass output


def _no_gate(cfg: PipelineConfig, artifacts: Artifacts) -> float | None:
    return None


def _plain_gate(cfg: PipelineConfig, artifacts: Artifacts) -> float | None:
    return 0.0


def _validated_gate(cfg: PipelineConfig, artifacts: Artifacts) -> float | None:
    return artifacts.fusion_switch.gate_margin


#: ``fusion.gate`` -> the margin a refined mask's predicted IoU must beat SAM's first pass's by
#: (``fusion.gate_by_predicted_iou``; None: no gate, inf: refinement off).
GATE_MARGINS: dict[str, Callable[[PipelineConfig, Artifacts], float | None]] = {
    "validated": _validated_gate,
    "predicted_iou": _plain_gate,
    "none": _no_gate,
}


def refinement_gate_note(cfg: PipelineConfig, artifacts: Artifacts) -> str:
    """One line for ``refinement.md``: which gate the non-oracle refinement variants went through."""
    gate = cfg.fusion.gate
    if gate == "none":
        return "Gate: none (`fusion.gate: none`): every refined mask is kept."
    if gate == "predicted_iou":
        return ("Gate: `fusion.gate: predicted_iou`: a refined mask is kept where its predicted IoU beats SAM's "
                "first pass's.")
    switch = artifacts.fusion_switch
    if not switch.enabled:
        return ("Gate: `fusion.gate: validated`: the refinement is switched off (it did not beat raw SAM on the "
                f"validation split; `{SWITCH_FILE}` of the fusion run), so `refined` and `refined_constant` are "
                "SAM's first pass.")
    return (f"Gate: `fusion.gate: validated`: a refined mask is kept where its predicted IoU beats SAM's first "
            f"pass's by more than {switch.margin:.4f} (margin chosen on the validation split; `{SWITCH_FILE}` of "
            "the fusion run).")


class Refinement:
    """The fusion refinement variants for one sample, all prompt sets at once: ``shared_inputs`` builds
    the inputs they share, ``predict`` runs the variants on SAM's first pass and ``predict_oracle``
    the ones that take the ground truth as the first pass."""

    primary_map = "entropy"

    def __init__(self, cfg: PipelineConfig, artifacts: Artifacts) -> None:
        self.backbone = artifacts.backbone
        self.fusion = artifacts.fusion.to(self.backbone.device)
        self.select_prompts = PROMPT_MODES[cfg.sam.prompt_mode]
        self.multimask_policy = cfg.fusion.multimask_policy
        self.gate_margin = GATE_MARGINS[cfg.fusion.gate](cfg, artifacts)
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
                log_var_range=(cfg.variance.log_var_min, cfg.variance.log_var_max), variance_loss=cfg.variance.loss,
                predictive=cfg.laplace.predictive,
            )

    def shared_inputs(self, sample: EvalSample) -> RefinementInputs:
        """What every variant of one sample shares: prompts, features, SAM's first pass and the
        uncertainty maps (all from the sample alone)."""
        device = self.backbone.device
        inputs = self.select_prompts(sample.points, sample.labels, sample.boxes)
        prompts = Prompts(*(None if t is None else t.to(device) for t in
                            (inputs.point_coords, inputs.point_labels, inputs.boxes)))
        sam_logits = torch.from_numpy(np.asarray(sample.cache_entry.logits)).float().to(device).unsqueeze(1)
        head_inputs = sample.head_inputs.to(self.head_device)
        uncertainty = {name: source(head_inputs).float().to(device).unsqueeze(1)
                       for name, source in self.sources.items()}
        return RefinementInputs(sample.features(device), sample.original_hw, prompts, sam_logits, uncertainty,
                                torch.from_numpy(sample.cache_entry.selected_iou_predictions).to(device))

    def predict(self, shared: RefinementInputs) -> dict[str, StrategyOutput]:
        """The variants refining SAM's own first pass, through the gate of ``fusion.gate``: a prompt set
        keeps SAM's first pass unless the refined mask's predicted IoU beats it by more than the gate's
        margin (no ground truth); with the refinement switched off (margin inf) every variant is SAM's
        first pass, exactly, and no refinement pass runs."""
        outputs = {}
        first_pass = shared.sam_logits[:, 0].float()
        for method, variant in REFINEMENT_VARIANTS.items():
            if variant.oracle:
                continue
            if self.gate_margin == math.inf:
                outputs[method] = self._output(first_pass)
                continue
            logits, predicted_iou = self._refine_logits(shared, shared.sam_logits, variant.source)
            if self.gate_margin is not None:
                logits = gate_by_predicted_iou(logits, predicted_iou, first_pass, shared.sam_predicted_iou,
                                               self.gate_margin)
            outputs[method] = self._output(logits)
        return outputs

    def predict_oracle(self, shared: RefinementInputs, ground_truth: np.ndarray) -> dict[str, StrategyOutput]:
        """The oracle variants: the ground truth (``H x W`` bool) as the first-pass mask prompt."""
        gt_256 = torch.from_numpy(resize_mask_nearest(ground_truth, (FRAME256, FRAME256))).to(self.backbone.device)
        oracle_logits = (torch.where(gt_256, ORACLE_MASK_LOGIT, -ORACLE_MASK_LOGIT).float()
                         .expand_as(shared.sam_logits).contiguous())
        return {method: self._output(self._refine_logits(shared, oracle_logits, variant.source)[0])
                for method, variant in REFINEMENT_VARIANTS.items() if variant.oracle}

    def _refine_logits(self, shared: RefinementInputs, first_pass: torch.Tensor,
                       source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Refined logits ``P x 256 x 256`` (FRAME256) and their predicted IoU ``P``."""
        logits, predicted_iou = refine(self.backbone, self.fusion, shared.features, shared.original_hw,
                                       shared.prompts, first_pass, shared.uncertainty[source],
                                       multimask_policy=self.multimask_policy)
        return logits[:, 0].float(), predicted_iou[:, 0].float()

    def _output(self, logits: torch.Tensor) -> StrategyOutput:
        return StrategyOutput(torch.sigmoid(logits), {"entropy": binary_entropy_from_logits(logits)},
                              self.primary_map)


def needed_artifacts(cfg: PipelineConfig) -> set[str]:
    """Names of ``ARTIFACT_FILES`` the configured strategies and refinement read."""
    unknown = [name for name in cfg.evaluation.strategies if name not in ALL_BUILDERS]
    if unknown:
        raise EvaluationError(f"evaluation.strategies: unknown {unknown} (known: {', '.join(ALL_BUILDERS)})")
    if not cfg.evaluation.strategies and not cfg.evaluation.refinement:
        raise EvaluationError("evaluation.strategies: empty and evaluation.refinement is false; nothing to evaluate")
    names = {"sam_checkpoint"}
    for strategy in cfg.evaluation.strategies:
        names.update(ALL_BUILDERS[strategy].needs)
    if cfg.evaluation.refinement:
        names.update(("fusion", *SOURCE_NEEDS[cfg.fusion.uncertainty_source]))
        if cfg.fusion.gate == "validated":
            names.add("fusion_switch")
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
    """Every method's ``StrategyOutput`` for one sample, in ``method_names`` order.

    The ground truth of a ``LabelledSample`` goes to the oracle ablations only; every other method
    gets ``labelled.inputs``, which does not hold it.
    """

    def __init__(self, cfg: PipelineConfig, artifacts: Artifacts) -> None:
        self.cfg, self.artifacts = cfg, artifacts
        self.methods = method_names(cfg)
        self.strategies = {name: STRATEGY_BUILDERS[name].build(cfg, artifacts)
                           for name in self.methods if name in STRATEGY_BUILDERS}
        self.oracles = {name: ORACLE_BUILDERS[name].build(cfg, artifacts)
                        for name in self.methods if name in ORACLE_BUILDERS}
        self.refinement = Refinement(cfg, artifacts) if cfg.evaluation.refinement else None

    def predict(self, labelled: LabelledSample) -> dict[str, StrategyOutput]:
        sample = labelled.inputs
        outputs = {name: strategy.predict(sample) for name, strategy in self.strategies.items()}
        outputs.update({name: oracle.predict(sample, labelled.ground_truth) for name, oracle in self.oracles.items()})
        if self.refinement is not None:
            shared = self.refinement.shared_inputs(sample)
            outputs.update(self.refinement.predict(shared))
            outputs.update(self.refinement.predict_oracle(shared, labelled.ground_truth))
        return {name: outputs[name] for name in self.methods}
