"""One interface for every uncertainty strategy of the evaluation stage.

A ``Strategy`` turns one ``EvalSample`` (an image's cache entry, prompt sets and image; never its
ground truth) into a ``StrategyOutput``: the foreground probability and named uncertainty maps
(higher = more uncertain, entropies in nats), each ``P x 256 x 256`` FRAME256, one per prompt set,
on the strategy's device. Stochastic strategies seed per ``(seed, sample key)``, so results never
depend on sample order. ``STRATEGIES`` maps the config names to the classes.

An ``OracleStrategy`` is an ablation that also reads the ground truth (it is handed over as a
separate argument); its name says ``oracle`` and ``ORACLE_STRATEGIES`` lists it apart.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
from torch import nn

from modules.cache.packing import packed_inputs
from modules.cache.sam_cache import CacheEntry
from modules.core.device import resolve_device
from modules.core.errors import PipelineError
from modules.data.promptset import gaussian_prompt_maps, promptset_tensors, sample_key
from modules.laplace.head import HeadInputs
from modules.laplace.posterior import check_predictive, probit_scaled_logit
from modules.scoring.entropy import binary_entropy, binary_entropy_from_logits
from modules.training.models import VarianceNetwork
from modules.core.config import ConfigError, VarianceConfig
from modules.uncertainty.prompt_perturbation import (LABEL_SOURCES, MAGNITUDES_KEY, PerturbationMagnitudes,
                                                     prompt_perturbation_predict)
from modules.uncertainty.tta import ImageTransform, tta_predict

#: The cache feature holding the image embedding (``C x 64 x 64``) a head may consume.
EMBEDDING_FEATURE = "image_embed"


class UncertaintyError(PipelineError):
    """Inconsistent inputs for a strategy (the message names the sample or the setting)."""


# --------------------------------------------------------------------------- statistics


def sample_statistics(probs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-pixel statistics of K probability samples ``K x ...`` (each output has shape ``...``).

    - ``mean_prob``: the mean probability.
    - ``entropy``: binary entropy of ``mean_prob`` (total uncertainty), nats.
    - ``std``: standard deviation of the probabilities over the K samples (population, divisor K;
      0 for K = 1).
    - ``expected_entropy``: mean of the per-sample binary entropies (aleatoric part), nats.
    - ``mutual_information``: ``entropy - expected_entropy`` clamped at 0 (>= 0 by Jensen's
      inequality; the clamp removes float rounding only), nats.
    """
    if probs.ndim < 1 or probs.shape[0] < 1:
        raise ValueError(f"sample_statistics: expected K x ... samples with K >= 1, got shape {tuple(probs.shape)}")
    probs = probs.float().clamp(0.0, 1.0)
    mean_prob = probs.mean(dim=0)
    entropy = binary_entropy(mean_prob)
    expected_entropy = binary_entropy(probs).mean(dim=0)
    return {
        "mean_prob": mean_prob,
        "entropy": entropy,
        "std": probs.std(dim=0, unbiased=False),
        "expected_entropy": expected_entropy,
        "mutual_information": (entropy - expected_entropy).clamp_min(0.0),
    }


# --------------------------------------------------------------------------- inputs and outputs


def head_inputs(cache_logits: torch.Tensor | np.ndarray, record: dict, logit_clip: float) -> torch.Tensor:
    """The prompt-aware head's input ``P x 3 x 256 x 256`` float32 (CPU) for one sample.

    Channel 0: the cached SAM logits ``P x 256 x 256`` clamped to ``[-logit_clip, logit_clip]``
    (``training.logit_clip``); channels 1 and 2: the positive and negative Gaussian prompt maps of the
    record's prompt sets (``promptset.gaussian_prompt_maps`` at the record's ``gaussian_sigma``).
    Built by ``packing.packed_inputs``, so the values (float16-rounded) are exactly those the head and
    the variance network were trained on.
    """
    logits = cache_logits.detach().cpu().numpy() if torch.is_tensor(cache_logits) else np.asarray(cache_logits)
    _, labels, points_256, _ = promptset_tensors(record)
    if logits.ndim != 3 or logits.shape[0] != labels.shape[0]:
        raise UncertaintyError(
            f"{record.get('safe_id', '?')}: cache logits {tuple(logits.shape)} do not match "
            f"{labels.shape[0]} prompt sets"
        )
    prompt_maps = gaussian_prompt_maps(points_256, labels, float(record["gaussian_sigma"]), size=logits.shape[-1])
    return torch.from_numpy(packed_inputs(logits, prompt_maps.numpy(), float(logit_clip))).float()


@dataclass
class EvalSample:
    """Everything a strategy may read for one image (build it with ``EvalSample.build``): what a
    deployed system has, so no ground truth (the evaluation keeps that apart, for the metrics and
    the oracle ablations only).

    - ``safe_id``, ``sample_id``, ``group``: identity (``sample_id`` seeds stochastic strategies).
    - ``cache_entry``: the ``sam_cache.CacheEntry`` (``features`` name -> ``C x h x w`` float16,
      ``logits`` ``P x 256 x 256`` float16 in FRAME256, ``original_hw``).
    - ``record``: the prompt-set JSON record; ``points`` ``P x N x 2`` / ``boxes`` ``P x 4`` ORIGINAL
      pixels, ``labels`` ``P x N`` (-1 padding), ``points_256`` ``P x N x 2`` FRAME256.
    - ``head_inputs``: ``P x 3 x 256 x 256`` float32 (``head_inputs``).
    - ``image``: ``H x W x 3`` uint8, read on first access through ``image_loader`` and kept.
    """

    safe_id: str
    sample_id: str
    group: str
    cache_entry: CacheEntry
    record: dict
    points: torch.Tensor
    labels: torch.Tensor
    points_256: torch.Tensor
    boxes: torch.Tensor
    head_inputs: torch.Tensor
    image_loader: Callable[[], np.ndarray] | None = None
    _image: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def build(cls, safe_id: str, group: str, cache_entry: CacheEntry, record: dict, logit_clip: float,
              image_loader: Callable[[], np.ndarray] | None = None) -> "EvalSample":
        """Check that cache and prompt sets belong together, then derive the tensors."""
        cached_ids = [int(i) for i in np.asarray(cache_entry.promptset_ids).tolist()]
        record_ids = [int(s["promptset_id"]) for s in record["promptsets"]]
        if cached_ids != record_ids:
            raise UncertaintyError(f"{safe_id}: cached prompt sets {cached_ids} differ from the prompt-set file's "
                                   f"{record_ids}; rerun the SAM precompute stage")
        points, labels, points_256, boxes = promptset_tensors(record)
        return cls(
            safe_id=safe_id, sample_id=str(record["sample_id"]), group=group, cache_entry=cache_entry, record=record,
            points=points, labels=labels, points_256=points_256, boxes=boxes,
            head_inputs=head_inputs(cache_entry.logits, record, logit_clip), image_loader=image_loader,
        )

    @property
    def original_hw(self) -> tuple[int, int]:
        return (int(self.cache_entry.original_hw[0]), int(self.cache_entry.original_hw[1]))

    @property
    def num_promptsets(self) -> int:
        return int(self.labels.shape[0])

    @property
    def sample_key(self) -> int:
        return sample_key(self.sample_id)

    @property
    def image(self) -> np.ndarray:
        if self._image is None:
            if self.image_loader is None:
                raise UncertaintyError(f"{self.safe_id}: this strategy needs the image but no image_loader was given")
            image = self.image_loader()
            if tuple(image.shape[:2]) != self.original_hw:
                raise UncertaintyError(f"{self.safe_id}: image {tuple(image.shape)} differs from the cached size "
                                       f"{self.original_hw}")
            self._image = image
        return self._image

    def features(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The cached encoder features ``name -> 1 x C x h x w`` float32 on ``device``."""
        return {name: torch.from_numpy(np.asarray(value)).float().unsqueeze(0).to(device)
                for name, value in self.cache_entry.features.items()}


@dataclass
class StrategyOutput:
    """``mean_prob`` ``P x 256 x 256`` and ``maps`` name -> ``P x 256 x 256`` (higher = more uncertain),
    FRAME256, float32; ``primary_map`` names the map that stands for the strategy in summaries."""

    mean_prob: torch.Tensor
    maps: dict[str, torch.Tensor]
    primary_map: str

    def __post_init__(self) -> None:
        if self.primary_map not in self.maps:
            raise ValueError(f"StrategyOutput: primary map {self.primary_map!r} not among {list(self.maps)}")
        for name, values in self.maps.items():
            if values.shape != self.mean_prob.shape:
                raise ValueError(f"StrategyOutput: map {name!r} has shape {tuple(values.shape)}, "
                                 f"mean_prob {tuple(self.mean_prob.shape)}")

    @property
    def primary(self) -> torch.Tensor:
        return self.maps[self.primary_map]


def derived_seed(seed: int, sample_key_value: int) -> int:
    """A 63-bit seed for one sample's draws from ``(seed, sample key)``."""
    state = np.random.SeedSequence((int(seed), int(sample_key_value))).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)



def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _row_embeddings(samples: Sequence[EvalSample], device: torch.device) -> torch.Tensor:
    """Each sample's cached image embedding repeated for its rows: ``sum(P_i) x C x h x w`` float32."""
    embeddings = [torch.from_numpy(np.asarray(sample.cache_entry.features[EMBEDDING_FEATURE])).float().to(device)
                  for sample in samples]
    return torch.cat([embedding.unsqueeze(0).expand(sample.head_inputs.shape[0], -1, -1, -1)
                      for sample, embedding in zip(samples, embeddings)])


def _head_logits(head: nn.Module, sample: EvalSample) -> torch.Tensor:
    """The MAP head's logits ``P x 256 x 256`` float32 on the head's device, autocast off."""
    device = _module_device(head)
    x = sample.head_inputs.to(device)
    embedding = _row_embeddings([sample], device) if getattr(head, "use_image_embedding", False) else None
    with torch.inference_mode(), torch.autocast(device_type=device.type, enabled=False):
        logits = head(x) if embedding is None else head(x, embedding)
    return logits[:, 0].float()


def _stacked_head_logits(head: nn.Module, samples: Sequence[EvalSample]) -> list[torch.Tensor]:
    """``_head_logits`` of several samples, bit for bit, with the layers before the head's
    ``final_conv`` run once on all their ``sum(P_i)`` rows stacked (3 x 3 convolutions: each row's
    result does not depend on the batch) and ``final_conv`` per sample (a 1 x 1 convolution whose
    CPU kernel changes its float rounding with the batch size). Returns ``P_i x 256 x 256`` each.
    A head without ``features`` / ``final_conv`` runs sample by sample."""
    if not (hasattr(head, "features") and hasattr(head, "final_conv")) or len(samples) < 2:
        return [_head_logits(head, sample) for sample in samples]
    device = _module_device(head)
    x = torch.cat([sample.head_inputs for sample in samples]).to(device)
    embedding = _row_embeddings(samples, device) if getattr(head, "use_image_embedding", False) else None
    with torch.inference_mode(), torch.autocast(device_type=device.type, enabled=False):
        features = head.features(x) if embedding is None else head.features(x, embedding)
        return [head.final_conv(rows)[:, 0].float() for rows in torch.split(features, _row_counts(samples))]


def _row_counts(samples: Sequence[EvalSample]) -> list[int]:
    return [sample.num_promptsets for sample in samples]


def _split_output(output: StrategyOutput, samples: Sequence[EvalSample]) -> list[StrategyOutput]:
    """A ``StrategyOutput`` of the samples' rows stacked -> one per sample (``P_i x 256 x 256``)."""
    counts = _row_counts(samples)
    probs = torch.split(output.mean_prob, counts)
    maps = {name: torch.split(values, counts) for name, values in output.maps.items()}
    return [StrategyOutput(probs[i], {name: parts[i] for name, parts in maps.items()}, output.primary_map)
            for i in range(len(samples))]


# --------------------------------------------------------------------------- strategies


class Strategy(ABC):
    """Common interface: ``predict(sample) -> StrategyOutput`` (outputs on ``self.device``)."""

    name: ClassVar[str]
    primary_map: ClassVar[str]
    device: torch.device

    @abstractmethod
    def predict(self, sample: EvalSample) -> StrategyOutput:
        """All prompt sets of ``sample`` at once."""

    def predict_batch(self, samples: Sequence[EvalSample]) -> list[StrategyOutput]:
        """``[predict(sample) for sample in samples]``, bit for bit; a strategy whose work does not
        depend on which image a row belongs to runs those rows of all samples in one pass (the
        click simulation's rounds over several images). Default: sample by sample."""
        return [self.predict(sample) for sample in samples]


class OracleStrategy(ABC):
    """An ablation that reads the ground truth, which no deployed system has: ``predict(sample,
    ground_truth) -> StrategyOutput``. Its name says ``oracle``; it is reported beside the
    strategies to show what the ground truth would add, never in place of one."""

    name: ClassVar[str]
    primary_map: ClassVar[str]
    device: torch.device

    @abstractmethod
    def predict(self, sample: EvalSample, ground_truth: np.ndarray) -> StrategyOutput:
        """All prompt sets of ``sample`` at once; ``ground_truth``: ``H x W`` bool at ORIGINAL resolution."""


class RawSamStrategy(Strategy):
    """The frozen SAM's own cached prediction; uncertainty = binary entropy of its probability."""

    name = "raw_sam"
    primary_map = "entropy"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = resolve_device(device)

    def predict(self, sample: EvalSample) -> StrategyOutput:
        logits = torch.from_numpy(np.asarray(sample.cache_entry.logits)).float().to(self.device)
        return StrategyOutput(torch.sigmoid(logits), {"entropy": binary_entropy_from_logits(logits)}, self.primary_map)

    def predict_batch(self, samples: Sequence[EvalSample]) -> list[StrategyOutput]:
        """Every sample's rows stacked (the maps are per pixel)."""
        if len(samples) < 2:
            return super().predict_batch(samples)
        logits = torch.from_numpy(np.concatenate([np.asarray(s.cache_entry.logits) for s in samples])).float()
        logits = logits.to(self.device)
        stacked = StrategyOutput(torch.sigmoid(logits), {"entropy": binary_entropy_from_logits(logits)},
                                 self.primary_map)
        return _split_output(stacked, samples)


class MapHeadStrategy(Strategy):
    """The MAP prompt-aware head (``training.models``); uncertainty = binary entropy of its probability."""

    name = "map_head"
    primary_map = "entropy"

    def __init__(self, head: nn.Module) -> None:
        self.head = head.eval()
        self.device = _module_device(head)

    def predict(self, sample: EvalSample) -> StrategyOutput:
        return self._output(_head_logits(self.head, sample))

    def predict_batch(self, samples: Sequence[EvalSample]) -> list[StrategyOutput]:
        """The head's layers before ``final_conv`` on every sample's rows at once (``_stacked_head_logits``)."""
        return [self._output(logits) for logits in _stacked_head_logits(self.head, samples)]

    def _output(self, logits: torch.Tensor) -> StrategyOutput:
        return StrategyOutput(torch.sigmoid(logits), {"entropy": binary_entropy_from_logits(logits)}, self.primary_map)


def _statistics_output(probs: torch.Tensor, primary_map: str) -> StrategyOutput:
    statistics = sample_statistics(probs)
    mean_prob = statistics.pop("mean_prob")
    return StrategyOutput(mean_prob, statistics, primary_map)


class TTAStrategy(Strategy):
    """Test-time augmentation (``tta.tta_predict``) + ``sample_statistics``.

    With ``reuse_cached_features`` the clean pass decodes the cached embedding instead of re-encoding
    the image (the cache must come from the same backbone; the evaluation stage guarantees it).
    """

    name = "tta"
    primary_map = "entropy"

    def __init__(self, backbone, transforms: Sequence[ImageTransform], prompt_mode: str, multimask_policy: str,
                 encoder_batch_size: int, seed: int = 0, reuse_cached_features: bool = True) -> None:
        self.backbone = backbone
        self.transforms = list(transforms)
        self.prompt_mode = prompt_mode
        self.multimask_policy = multimask_policy
        self.encoder_batch_size = int(encoder_batch_size)
        self.seed = int(seed)
        self.reuse_cached_features = bool(reuse_cached_features)
        self.device = backbone.device

    def predict(self, sample: EvalSample) -> StrategyOutput:
        probs = tta_predict(
            self.backbone, sample.image, sample.points, sample.labels, sample.boxes, self.transforms,
            self.prompt_mode, self.multimask_policy, self.encoder_batch_size, seed=self.seed,
            sample_key=sample.sample_key,
            clean_features=sample.cache_entry.features if self.reuse_cached_features else None,
        )
        return _statistics_output(probs, self.primary_map)


class PromptPerturbationStrategy(Strategy):
    """The original prompt + K-1 jittered copies (``prompt_perturbation``), decoded on the cached
    embedding in one call, + ``sample_statistics``.

    ``label_source`` (``prompt_perturbation.LABEL_SOURCES``) labels the jittered points:
    ``original`` keeps the user's label, ``own_mask`` reads the first pass's mask (the cached SAM
    logits > 0 of the unperturbed prompt set) at the new spot. Neither reads the ground truth; the
    ground-truth re-read of the original systems is ``OraclePromptPerturbationStrategy``.
    """

    name = "prompt_perturbation"
    primary_map = "entropy"

    def __init__(self, backbone, num_samples: int, prompt_mode: str, multimask_policy: str, seed: int = 0,
                 magnitudes: PerturbationMagnitudes = PerturbationMagnitudes(),
                 label_source: str = "original") -> None:
        if label_source not in LABEL_SOURCES:
            raise ConfigError(f"{MAGNITUDES_KEY}.label_source: {label_source!r} is not one of "
                              f"{', '.join(LABEL_SOURCES)}")
        self.backbone = backbone
        self.num_samples = int(num_samples)
        self.prompt_mode = prompt_mode
        self.multimask_policy = multimask_policy
        self.seed = int(seed)
        self.magnitudes = magnitudes
        self.label_source = label_source
        self.device = backbone.device

    def predict(self, sample: EvalSample) -> StrategyOutput:
        first_pass_masks = np.asarray(sample.cache_entry.logits) > 0 if self.label_source == "own_mask" else None
        return self.predict_relabelled(sample, first_pass_masks)

    def predict_relabelled(self, sample: EvalSample, label_masks: np.ndarray | None) -> StrategyOutput:
        """The output with jittered points labelled from ``label_masks`` (``perturbed_prompts``;
        ``None`` keeps the original labels)."""
        probs = prompt_perturbation_predict(
            self.backbone, sample.features(self.device), sample.original_hw, sample.points, sample.labels,
            sample.boxes, self.num_samples, self.prompt_mode, self.multimask_policy,
            seed=self.seed, sample_key=sample.sample_key,
            promptset_ids=[int(s["promptset_id"]) for s in sample.record["promptsets"]], magnitudes=self.magnitudes,
            label_masks=label_masks,
        )
        return _statistics_output(probs, self.primary_map)


class OraclePromptPerturbationStrategy(OracleStrategy):
    """Prompt perturbation as the original systems ran it, each jittered point's label re-read from
    the ground truth at its new spot: an oracle ablation (same jitter, seeds and decoder call as
    ``PromptPerturbationStrategy``)."""

    name = "prompt_perturbation_oracle"
    primary_map = "entropy"

    def __init__(self, backbone, num_samples: int, prompt_mode: str, multimask_policy: str, seed: int = 0,
                 magnitudes: PerturbationMagnitudes = PerturbationMagnitudes()) -> None:
        self.perturbation = PromptPerturbationStrategy(backbone, num_samples, prompt_mode, multimask_policy, seed,
                                                       magnitudes)
        self.device = backbone.device

    def predict(self, sample: EvalSample, ground_truth: np.ndarray) -> StrategyOutput:
        ground_truth = np.asarray(ground_truth, dtype=bool)
        if ground_truth.shape != sample.original_hw:
            raise UncertaintyError(f"{sample.safe_id}: ground-truth mask {ground_truth.shape} differs from the "
                                   f"cached image size {sample.original_hw}")
        return self.perturbation.predict_relabelled(sample, ground_truth)


class LaplaceStrategy(Strategy):
    """A last-layer Laplace posterior of the head (``laplace.posterior.LastLayerPosterior`` or any
    object with ``maps(inputs, predictive, num_samples, seed) -> dict`` of ``mean_prob``,
    ``total_entropy``, ``expected_entropy``, ``mutual_information``, each ``P x 256 x 256``).

    ``mean_prob`` is the posterior's closed-form probit predictive; the maps come from
    ``num_samples`` weight draws seeded per sample (``predictive="mc"``) or from the per-pixel logit
    mean and variance in closed form (``"closed_form"``, ``laplace.predictive``). Primary map:
    ``total_entropy``, the entropy of
    the predictive mean, as for every sampling strategy (TTA, prompt perturbation); its epistemic
    part ``mutual_information`` (BALD) and aleatoric part ``expected_entropy`` are scored beside it.
    """

    name = "laplace"
    primary_map = "total_entropy"
    MAP_NAMES: ClassVar[tuple[str, ...]] = ("mutual_information", "total_entropy", "expected_entropy")

    def __init__(self, posterior, num_samples: int, seed: int = 0, predictive: str = "mc") -> None:
        self.posterior = posterior
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.predictive = check_predictive(predictive)
        self.device = posterior.device

    def predict(self, sample: EvalSample) -> StrategyOutput:
        result = self.posterior.maps(self.posterior_inputs([sample]), self.predictive, self.num_samples,
                                     seed=derived_seed(self.seed, sample.sample_key))
        return self._output(result)

    def predict_batch(self, samples: Sequence[EvalSample]) -> list[StrategyOutput]:
        """``closed_form``: every sample's rows in one pass (the head's features and the per-pixel
        moments do not depend on the batch). ``mc`` draws weights per sample (seeded by its key), so
        it runs sample by sample."""
        if self.predictive != "closed_form" or len(samples) < 2:
            return super().predict_batch(samples)
        result = self.posterior.maps(self.posterior_inputs(samples), self.predictive, self.num_samples)
        return _split_output(self._output(result), samples)

    def posterior_inputs(self, samples: Sequence[EvalSample]) -> HeadInputs:
        """The samples' head inputs stacked (``sum(P_i) x 3 x 256 x 256``), each row with its image's
        embedding when the head reads one."""
        head = getattr(self.posterior, "head", None)
        reads_embedding = head is not None and getattr(head, "use_image_embedding", False)
        embedding = _row_embeddings(samples, self.device) if reads_embedding else None
        x = samples[0].head_inputs if len(samples) == 1 else torch.cat([sample.head_inputs for sample in samples])
        return HeadInputs(x.to(self.device), embedding)

    def _output(self, result: dict[str, torch.Tensor]) -> StrategyOutput:
        maps = {name: result[name].float() for name in self.MAP_NAMES}
        return StrategyOutput(result["mean_prob"].float(), maps, self.primary_map)


@dataclass(frozen=True)
class VarianceReadout:
    """What a variance network's log-variance ``s`` means under the loss it was trained with
    (``variance.loss``), and so how the strategy reads it.

    ``logit_noise``: ``s`` is the log-variance of Gaussian noise on the head's logit (Kendall & Gal),
    so the predictive is ``E[sigmoid(z + sigma * eps)]``; otherwise the head's probability stays the
    prediction. ``primary_map``: the map that stands for the strategy in the evaluation.
    """

    logit_noise: bool
    primary_map: str


#: ``variance.loss`` -> how the trained network's output is read (keys: ``training.losses.LOSSES``).
#: Under the logit-noise model the log-variance alone does not rank errors: the loss is flat in
#: ``s`` where ``|z|`` is large (noise cannot flip a confident logit), so ``s`` may grow there
#: freely; the predictive's entropy weighs ``s`` against ``|z|``, and with a constant ``s`` ranks
#: pixels exactly as the head's own entropy. UncertSAM's residual NLL makes ``s`` the log of the
#: expected squared probability error, itself an error score.
VARIANCE_READOUTS: dict[str, VarianceReadout] = {
    "mc_logit_noise": VarianceReadout(logit_noise=True, primary_map="entropy"),
    "gaussian_residual_nll": VarianceReadout(logit_noise=False, primary_map="log_variance"),
}


def variance_readout(loss: str) -> VarianceReadout:
    """``VARIANCE_READOUTS[loss]``; an unknown name is a one-line ``ConfigError`` naming ``variance.loss``."""
    if loss not in VARIANCE_READOUTS:
        raise ConfigError(f"variance.loss: {loss!r} is not one of {', '.join(VARIANCE_READOUTS)}")
    return VARIANCE_READOUTS[loss]


def read_variance(readout: VarianceReadout, logits: torch.Tensor,
                  log_variance: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The predictive probability and the maps (``log_variance``, ``entropy``) of a head's ``logits``
    and a variance network's ``log_variance`` (both ``B x ...``, float32), in closed form: under
    logit noise the probit predictive ``sigmoid(z / sqrt(1 + pi exp(s) / 8))``, else the head's
    probability; ``entropy`` is that probability's."""
    if readout.logit_noise:
        logits = probit_scaled_logit(logits, torch.exp(log_variance))
    return torch.sigmoid(logits), {"log_variance": log_variance, "entropy": binary_entropy_from_logits(logits)}


class VarianceNetworkStrategy(Strategy):
    """The MAP head plus a ``VarianceNetwork`` predicting a log-variance ``s`` per pixel, read as the
    network's training loss says (``VARIANCE_READOUTS``).

    Logit-noise networks (``mc_logit_noise``): ``mc_samples == 0`` (default): ``mean_prob`` is the
    closed-form probit predictive ``sigmoid(z / sqrt(1 + pi exp(s) / 8))`` (the head's mask: the
    sign of ``z`` is kept); ``mc_samples = T > 0``: ``mean_t sigmoid(z + exp(s / 2) * eps_t)`` with
    ``eps_t ~ N(0, 1)`` per pixel, seeded per sample. Primary map: ``entropy`` of ``mean_prob``.
    Residual-NLL networks (``gaussian_residual_nll``): ``mean_prob`` is the head's probability and
    the primary map is ``log_variance``. Maps of both: ``log_variance`` (``s`` itself) and
    ``entropy``; every map ``P x 256 x 256``.
    """

    name = "variance_network"
    primary_map = "entropy"

    def __init__(self, head: nn.Module, variance_net: nn.Module, mc_samples: int = 0, seed: int = 0,
                 loss: str = VarianceConfig.loss) -> None:
        self.head = head.eval()
        self.variance_net = variance_net.eval()
        self.device = _module_device(head)
        if _module_device(variance_net) != self.device:
            raise UncertaintyError(f"variance_network: head on {self.device}, variance network on "
                                   f"{_module_device(variance_net)}; put both on one device")
        if int(mc_samples) < 0:
            raise UncertaintyError(f"variance.mc_samples: must be >= 0, got {mc_samples}")
        self.mc_samples = int(mc_samples)
        self.seed = int(seed)
        self.readout = variance_readout(loss)
        self.primary_map = self.readout.primary_map

    def predict(self, sample: EvalSample) -> StrategyOutput:
        return self._output(sample, _head_logits(self.head, sample))

    def predict_batch(self, samples: Sequence[EvalSample]) -> list[StrategyOutput]:
        """The head's part stacked (``_stacked_head_logits``); the variance network, whose last layer
        is a 1 x 1 convolution too, and the per-sample noise run sample by sample."""
        return [self._output(sample, logits)
                for sample, logits in zip(samples, _stacked_head_logits(self.head, samples))]

    def _output(self, sample: EvalSample, logits: torch.Tensor) -> StrategyOutput:
        inputs = VarianceNetwork.build_inputs(sample.head_inputs.to(self.device), logits.unsqueeze(1))
        with torch.inference_mode(), torch.autocast(device_type=self.device.type, enabled=False):
            log_variance = self.variance_net(inputs)[:, 0].float()
        if not self.readout.logit_noise or self.mc_samples == 0:
            return StrategyOutput(*read_variance(self.readout, logits, log_variance), self.primary_map)
        generator = torch.Generator(device=self.device).manual_seed(derived_seed(self.seed, sample.sample_key))
        noise = torch.randn((self.mc_samples, *logits.shape), generator=generator, device=self.device)
        mean_prob = torch.sigmoid(logits + torch.exp(0.5 * log_variance) * noise).mean(dim=0)
        return StrategyOutput(mean_prob, {"log_variance": log_variance, "entropy": binary_entropy(mean_prob)},
                              self.primary_map)


#: Strategy name (as in the config) -> class.
STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (RawSamStrategy, MapHeadStrategy, TTAStrategy, PromptPerturbationStrategy, LaplaceStrategy,
                VarianceNetworkStrategy)
}
#: Oracle ablation name (as in the config) -> class.
ORACLE_STRATEGIES: dict[str, type[OracleStrategy]] = {cls.name: cls for cls in (OraclePromptPerturbationStrategy,)}
