"""The decoder-hypernetwork Laplace (``laplace.target: sam_decoder``) as an evaluation strategy."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from modules.laplace.decoder import DecoderHypernetInputs, DecoderLaplaceError, DecoderPosterior, decode_chosen_outputs
from modules.laplace.posterior import check_predictive
from modules.sam.prompting import MULTIMASK_POLICIES
from modules.uncertainty.strategies import EvalSample, Strategy, StrategyOutput, derived_seed


def _same_device(first: torch.device, second: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when 0 is the current one."""
    def index(device: torch.device) -> int | None:
        if device.type == "cuda" and device.index is None:
            return torch.cuda.current_device()
        return device.index

    return first.type == second.type and index(first) == index(second)


class DecoderLaplaceStrategy(Strategy):
    """The decoder-hypernetwork Laplace (``laplace.target: sam_decoder``) as an evaluation strategy.

    Per sample: the prompt decoder re-runs on the cached embedding with the sample's prompt sets
    (``prompt_mode``), the output stage 3 chose is kept (the cache entry's ``branch_index`` under
    ``multimask_policy``), and the posterior of that output's token gives ``mean_prob`` (closed-form
    probit) and, from ``num_samples`` weight draws seeded by ``(seed, sample key)`` or in closed form
    (``predictive``, as ``uncertainty.LaplaceStrategy``), the maps
    ``total_entropy`` (primary, as ``uncertainty.LaplaceStrategy``), ``mutual_information`` (BALD)
    and ``expected_entropy``; each
    ``P x 256 x 256`` FRAME256 float32 on the backbone's device. The posterior must be on that device
    and must have been fitted on the backbone's checkpoint (its means are checked against the
    decoder's weights on the first sample).
    """

    name = "laplace"
    primary_map = "total_entropy"
    MAP_NAMES: ClassVar[tuple[str, ...]] = ("mutual_information", "total_entropy", "expected_entropy")

    def __init__(self, backbone, posterior: DecoderPosterior, num_samples: int, seed: int = 0,
                 prompt_mode: str = "points", multimask_policy: str = "best_iou", predictive: str = "mc") -> None:
        if not _same_device(posterior.device, torch.device(backbone.device)):
            raise DecoderLaplaceError(f"laplace: the posterior is on {posterior.device}, the SAM backbone on "
                                      f"{backbone.device}; load it with device={backbone.device}")
        if int(num_samples) < 1:
            raise DecoderLaplaceError(f"laplace.num_samples: must be at least 1, got {num_samples}")
        self.backbone = backbone
        self.posterior = posterior
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.predictive = check_predictive(predictive)
        self.prompt_mode = prompt_mode
        self.multimask_policy = multimask_policy
        self.device = posterior.device
        self._checked = False

    def decode(self, sample: EvalSample) -> tuple[DecoderHypernetInputs, torch.Tensor]:
        """The sample's hypernetwork inputs and decoder logits ``P x 256 x 256`` at the chosen outputs."""
        expected = MULTIMASK_POLICIES[self.multimask_policy].num_outputs
        cached_outputs = np.asarray(sample.cache_entry.iou_predictions).shape[-1]
        if cached_outputs != expected:
            raise DecoderLaplaceError(f"{sample.safe_id}: the cache holds {cached_outputs} outputs per prompt set, "
                                      f"sam.multimask_policy {self.multimask_policy!r} gives {expected}")
        inputs, logits, final_layers = decode_chosen_outputs(
            self.backbone, sample.features(self.device), sample.original_hw, sample.points, sample.labels,
            sample.boxes, sample.cache_entry.branch_index, self.prompt_mode, self.multimask_policy)
        if not self._checked:
            self.posterior.check_final_layers(final_layers, f"laplace ({self.backbone.checkpoint_path})")
            self._checked = True
        return inputs, logits

    def predict(self, sample: EvalSample) -> StrategyOutput:
        inputs, _ = self.decode(sample)
        result = self.posterior.maps(inputs, self.predictive, self.num_samples,
                                     seed=derived_seed(self.seed, sample.sample_key))
        maps = {name: result[name].float() for name in self.MAP_NAMES}
        return StrategyOutput(result["mean_prob"].float(), maps, self.primary_map)
