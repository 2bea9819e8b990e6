"""Fitting the ``sam_decoder`` target: decode a packed split on the cached embeddings, sum the
per-token GGN over the training split, and tune (temperature, prior) on the validation NLL.

The posterior precision is ``GGN / T + prior``; every ``(T, prior)`` pair of
``laplace.temperature_grid x laplace.prior_precision_grid`` is scored in one pass over the validation
split (ties: the first, lowest T, then the lowest prior). Curvature sums are float64; all posterior
math runs in float32 with autocast off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from modules.cache.packed_reader import PackedSplitDataset
from modules.cache.sam_cache import SamCacheError
from modules.cache.training_index import open_cache
from modules.core.config import PipelineConfig
from modules.core.errors import error_line
from modules.core.paths import packed_path
from modules.core.progress import track
from modules.data.promptset import load_promptsets, promptset_path, promptset_tensors
from modules.laplace import posterior as lp
from modules.laplace.decoder import (CURVATURE_BACKEND, TARGET, DecodedRows, DecoderGgnAccumulator,
                                     DecoderLaplaceError, DecoderPosterior, DecoderPosteriorMeta, TokenCurvature,
                                     decode_chosen_outputs)

#: (temperature, prior) pairs whose validation logit variances are evaluated at once (memory:
#: pairs x P x 256 x 256 float32 per image).
PAIRS_PER_CHUNK = 8
#: The decoded validation split is kept in memory for the second pass (quality checks) when it
#: takes at most this many bytes (32 upscaled channels, logits and target per row).
VALIDATION_IN_MEMORY_BYTES = 1 << 30
ROW_BYTES = (32 + 2) * 256 * 256 * 4


# --------------------------------------------------------------------------- reading a split


class SplitRows:
    """The rows of one packed split (stage 4.5), decoded image by image on the cached embeddings.

    Iterating yields one ``DecodedRows`` per image, holding that image's rows in index order with
    their packed targets. The prompts come from the stage-2 prompt-set files, the chosen outputs from
    the SAM cache's ``branch_index``; the decoder runs on the backbone's device.
    """

    def __init__(self, cfg: PipelineConfig, split: str, backbone, cache=None):
        self.cfg, self.split, self.backbone = cfg, split, backbone
        self.packed = PackedSplitDataset(packed_path(cfg.project_root, split), in_memory=cfg.training.in_memory)
        self.cache = cache if cache is not None else open_cache(cfg)
        samples = np.asarray(self.packed.row_sample)
        order = np.argsort(samples, kind="stable")
        boundaries = np.flatnonzero(np.diff(samples[order])) + 1
        self.sample_rows = [rows for rows in np.split(order, boundaries) if rows.size]

    def __len__(self) -> int:
        return len(self.sample_rows)

    @property
    def num_rows(self) -> int:
        return len(self.packed)

    def _record(self, safe_id: str) -> dict:
        try:
            return load_promptsets(self.cfg.project_root, self.split, safe_id)
        except (OSError, ValueError) as error:
            path = promptset_path(self.cfg.project_root, self.split, safe_id)
            raise DecoderLaplaceError(f"{path}: unreadable prompt-set file ({error_line(error)}); "
                                      "rerun generate_promptsets.py") from None

    def decode(self, rows: np.ndarray) -> DecodedRows:
        """The packed rows ``rows`` (all of one image) decoded at their chosen outputs."""
        safe_id = self.packed.sample_safe_ids[int(self.packed.row_sample[rows[0]])]
        try:
            entry = self.cache.entry(safe_id)
        except (KeyError, SamCacheError) as error:
            raise DecoderLaplaceError(f"{self.cache.folder}: {error_line(error)}; "
                                      "rerun precompute_sam_outputs.py") from None
        record = self._record(safe_id)
        record_ids = [int(s["promptset_id"]) for s in record["promptsets"]]
        cached_ids = [int(i) for i in np.asarray(entry.promptset_ids).tolist()]
        if cached_ids != record_ids:
            raise DecoderLaplaceError(f"{safe_id}: cached prompt sets {cached_ids} differ from the prompt-set "
                                      f"file's {record_ids}; rerun precompute_sam_outputs.py")
        promptset_ids = [int(self.packed.promptset_ids[row]) for row in rows]
        missing = sorted(set(promptset_ids) - set(record_ids))
        if missing:
            raise DecoderLaplaceError(f"{safe_id}: packed prompt sets {missing} are not in the SAM cache; "
                                      "rerun build_training_indices.py and pack_to_hdf5.py")
        positions = torch.tensor([record_ids.index(pid) for pid in promptset_ids])
        points, labels, _, boxes = promptset_tensors(record)
        features = {name: torch.from_numpy(np.asarray(value)).float() for name, value in entry.features.items()}
        sam = self.cfg.sam
        inputs, logits, final_layers = decode_chosen_outputs(
            self.backbone, features, entry.original_hw, points[positions], labels[positions], boxes[positions],
            np.asarray(entry.branch_index)[positions.numpy()], sam.prompt_mode, sam.multimask_policy)
        items = self.packed.__getitems__(rows.tolist())
        targets = torch.stack([item["target"][0] for item in items]).to(logits.device)
        if targets.shape != logits.shape:
            raise DecoderLaplaceError(f"{self.packed.path}: targets {tuple(targets.shape)} do not match the decoder "
                                      f"logits {tuple(logits.shape)} of {safe_id}")
        return DecodedRows(safe_id, promptset_ids, inputs, logits, final_layers, targets)

    def __iter__(self) -> Iterator[DecodedRows]:
        for rows in self.sample_rows:
            yield self.decode(rows)


# --------------------------------------------------------------------------- fitting and tuning


def accumulate_curvature(split_rows: SplitRows) -> DecoderGgnAccumulator:
    """The per-token GGN diagonal over every row of ``split_rows`` (the training split)."""
    accumulator = None
    for decoded in track(split_rows, "laplace curvature", unit="samples"):
        if accumulator is None:
            accumulator = DecoderGgnAccumulator(decoded.final_layers)
        accumulator.add(decoded.inputs)
    if accumulator is None:
        raise DecoderLaplaceError(f"{split_rows.packed.path}: the training split is empty")
    return accumulator


@dataclass(frozen=True)
class GridSearchResult:
    """Validation NLL (nats per pixel) of every ``(temperature, prior precision)`` pair.

    ``table`` has the columns ``temperature, prior_precision, val_nll`` in grid order (temperature
    major); ``best`` is the first row with the lowest NLL; ``prior_search`` is the prior grid at the
    chosen temperature (for ``PosteriorMeta`` and the plot).
    """

    table: pd.DataFrame
    temperature: float
    prior_search: lp.PriorSearchResult


def search_temperature_and_prior(
    means: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    curvature: Mapping[int, TokenCurvature],
    validation: Sequence[DecodedRows] | SplitRows,
    prior_grid: Sequence[float],
    temperature_grid: Sequence[float],
    nll_eps: float = lp.DEFAULT_NLL_EPS,
) -> GridSearchResult:
    """Score every ``(T, prior)`` pair by the probit-predictive NLL on ``validation`` in one pass."""
    priors = lp.positive_grid(prior_grid, "laplace.prior_precision_grid", DecoderLaplaceError)
    temperatures = lp.positive_grid(temperature_grid, "laplace.temperature_grid", DecoderLaplaceError)
    pairs = [(t, p) for t in temperatures for p in priors]
    posteriors = [DecoderPosterior.from_curvature(means, curvature, p, t) for t, p in pairs]
    nll_sums = torch.zeros(len(pairs), dtype=torch.float64)
    num_pixels = 0
    for decoded in validation:
        prepared = posteriors[0].prepare(decoded.inputs)
        targets = decoded.targets.to(posteriors[0].device)
        # The logit mean is the same for every pair; only the per-channel variances (P x K) differ.
        channel_mean, _ = posteriors[0].channel_moments(prepared)
        with torch.autocast(device_type=targets.device.type, enabled=False):
            logit_mean = torch.einsum("pkhw,pk->phw", prepared.upscaled, channel_mean)
            upscaled_sq = prepared.upscaled.square()
            for start in range(0, len(pairs), PAIRS_PER_CHUNK):
                chunk = posteriors[start : start + PAIRS_PER_CHUNK]
                channel_var = torch.stack([posterior.channel_moments(prepared)[1] for posterior in chunk])
                logit_var = torch.einsum("pkhw,npk->nphw", upscaled_sq, channel_var)
                probability = lp.binary_probit_probability(logit_mean, logit_var)
                nll = lp.binary_nll(probability, targets, nll_eps).double().sum(dim=(1, 2, 3)).cpu()
                nll_sums[start : start + len(chunk)] += nll
        num_pixels += targets.numel()
    if num_pixels == 0:
        raise DecoderLaplaceError("laplace validation: the validation split is empty")
    nll = (nll_sums / num_pixels).tolist()
    if not all(math.isfinite(value) for value in nll):
        raise DecoderLaplaceError(f"laplace validation: non-finite NLL {nll} (check the cached features for NaN)")
    table = pd.DataFrame([{"temperature": t, "prior_precision": p, "val_nll": value}
                          for (t, p), value in zip(pairs, nll)])
    best = int(np.argmin(nll))
    temperature = pairs[best][0]
    at_temperature = table[table["temperature"] == temperature]
    prior_search = lp.PriorSearchResult(priors, tuple(at_temperature["val_nll"].tolist()), pairs[best][1], num_pixels)
    return GridSearchResult(table, temperature, prior_search)


@torch.no_grad()
def decoder_quality_checks(posterior: DecoderPosterior, validation: Sequence[DecodedRows] | SplitRows,
                           num_samples: int, seed: int, nll_eps: float, predictive: str = "mc") -> dict:
    """Decoder (MAP) vs Laplace NLL/ECE and the mutual-information margin on the decoder's errors;
    ``predictive``: ``laplace.predictive``."""
    quality = lp.PosteriorQualityAccumulator(nll_eps)
    for batch_index, decoded in enumerate(validation):
        targets = decoded.targets.to(posterior.device)
        map_prob = torch.sigmoid(decoded.decoder_logits.to(posterior.device))
        maps = posterior.maps(decoded.inputs, predictive, num_samples, seed=seed + batch_index)
        quality.update(map_prob, maps, targets)
    return quality.compute()


# --------------------------------------------------------------------------- artifacts


def posterior_meta(posterior: DecoderPosterior, accumulator: DecoderGgnAccumulator, search: GridSearchResult,
                   checkpoint_md5: str, sam: Any) -> DecoderPosteriorMeta:
    tokens = [{"token": token, "num_parameters": posterior.posteriors[token].num_weights,
               "n_data": entry.n_pixels, "n_prompts": entry.n_prompts}
              for token, entry in accumulator.curvature.items()]
    return DecoderPosteriorMeta(
        target=TARGET, backend=CURVATURE_BACKEND, num_parameters=posterior.num_weights,
        num_bernoulli_parameters=posterior.num_weights, prior_precision=posterior.prior_precision,
        prior_precision_grid=list(search.prior_search.grid), prior_precision_nll=list(search.prior_search.nll),
        n_data=accumulator.n_pixels, source_checkpoint_md5=checkpoint_md5, temperature=posterior.temperature,
        tuning_nll=search.table.to_dict("records"), sam_family=str(sam.family), sam_model_type=str(sam.model_type),
        prompt_mode=str(sam.prompt_mode), multimask_policy=str(sam.multimask_policy), tokens=tokens,
    )

