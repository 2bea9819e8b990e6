"""Stage 6, ``laplace.target: sam_decoder``: a diagonal Laplace on the SAM / SAM 2 mask decoder's
hypernetwork last layer, fitted by re-running only the prompt decoder on the cached image embeddings.

The target. For prompt set ``p`` the decoder's logit at pixel ``x`` (FRAME256) is
``z = (W_t h + b_t) . u(x)`` with ``t`` the mask token of the output stage 3 chose for ``p``
(``sam.multimask_policy``: ``best_iou`` = the multimask token 1..3 with the highest predicted IoU,
``single`` = token 0, or the token SAM 2's stability fallback switched to), ``W_t: K x J`` (32 x 256)
and ``b_t: K`` the last ``nn.Linear`` of token ``t``'s hypernetwork MLP, ``h: J`` that MLP's
penultimate activation and ``u(x): K`` the upscaled decoder features (``DecoderFeatures`` in
``modules/sam/base.py``). Each token has its own last layer, so the posterior is keyed by token:
one diagonal Gaussian over ``[vec(W_t), b_t]`` (8224 values) per mask token, each with the GGN of
the training rows whose chosen output used that token (``DecoderPosterior``). Every mask token of the
decoder gets a posterior: a token that stage 3 never chose on the training split has no curvature and
keeps the prior (the exact Laplace posterior of parameters without data), so a test image whose chosen
output uses it still gets a prediction; the stage lists such tokens. One prior precision and one
likelihood temperature are shared by all tokens and tuned jointly on the validation NLL.

Likelihood and curvature. Every pixel is one Bernoulli observation, as for the head target. Its
per-pixel feature is ``phi = [vec(outer(u, h)), u]`` (``K*J + K = 8224`` values): laplace-torch 0.3
has no binary likelihood, and its 2-logit mapping (see ``modules/laplace_posterior.py``) would need
that 8224-wide feature materialised for each of the 65536 pixels of a mask (~2.2 GB per prompt set).
The Bernoulli GGN diagonal factorises instead,
``diag_W[k, j] = sum_pix p (1 - p) u_k^2 h_j^2`` and ``diag_b[k] = sum_pix p (1 - p) u_k^2``, and is
computed in closed form (``laplace_posterior.hypernet_ggn_diagonal``; equal to laplace-torch's GGN on
a small case, tested there, and to a brute-force per-pixel sum, tested here). The GGN is taken at the
frozen MAP weights; targets do not enter it. Curvature sums are accumulated in float64.

Temperature and prior. As for the head: the posterior precision is ``GGN / T + prior`` and the pair
``(T, prior)`` minimising the validation NLL of the probit predictive over
``laplace.temperature_grid x laplace.prior_precision_grid`` is kept (ties: the first, lowest T,
then lowest prior). All pairs are scored in ONE pass over the validation split (the decoder runs once
per validation image, not once per pair).

Artifacts in ``<project_root>/laplace/sam_decoder/run_<id>/`` (as the head target):
``laplace_state.pt`` (per token: MAP weight and bias, posterior variances, the raw GGN diagonal; plus
the chosen prior and temperature; plain tensors, ``torch.load(weights_only=True)``),
``laplace_config.yaml`` (the ``laplace`` config section), ``posterior_meta.json``
(``DecoderPosteriorMeta``: target, number of parameters, chosen prior precision and temperature, the
grids and their NLLs, n_data = training pixels, the md5 of the SAM checkpoint, library versions, the
per-token table), ``prior_precision_nll.csv`` / ``.png`` and ``quality.json`` (validation NLL/ECE of
the Laplace predictive against the decoder's own probability, and the mean mutual information on the
pixels the decoder gets wrong against those it gets right). The fit is skipped when the artifacts
exist and were fitted on the same SAM checkpoint (md5); another checkpoint is an error until
``--force`` refits.

Frames and units: every map is ``P x 256 x 256`` FRAME256 (the ORIGINAL image stretched to 256 x 256);
entropies and mutual information in nats. All posterior math runs in float32 with autocast off; the
decoder itself runs as ``Backbone.decode_features`` runs it (bf16 autocast on CUDA).
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from modules.laplace import posterior as lp
from modules.core.config import PipelineConfig
from modules.core.fileio import (atomic_write_bytes, atomic_write_csv, atomic_write_json, atomic_write_yaml,
                            cached_file_md5, read_json)
from modules.sam.prompting import MULTIMASK_POLICIES, Prompts, decode_selected
from modules.uncertainty.strategies import EvalSample, Strategy, StrategyOutput, _derived_seed
from modules.core.errors import error_line
from modules.core.paths import laplace_run_dir

TARGET = "sam_decoder"
#: ``posterior_meta.json``'s ``backend`` for this target: the closed-form factorised GGN diagonal.
CURVATURE_BACKEND = "closed_form_ggn"
STATE_FORMAT_VERSION = 1
#: (temperature, prior) pairs whose validation logit variances are evaluated at once (memory:
#: pairs x P x 256 x 256 float32 per image).
PAIRS_PER_CHUNK = 8
#: The decoded validation split is kept in memory for the second pass (quality checks) when it
#: takes at most this many bytes (about 9 MB per row: 32 upscaled channels, logits, target).
VALIDATION_IN_MEMORY_BYTES = 1 << 30
ROW_BYTES = (32 + 2) * 256 * 256 * 4


class DecoderLaplaceError(lp.LaplacePosteriorError):
    """Bad input, configuration or artifact for the decoder Laplace (one line naming the culprit)."""


def _same_device(first: torch.device, second: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when 0 is the current one."""
    def index(device: torch.device) -> int | None:
        if device.type == "cuda" and device.index is None:
            return torch.cuda.current_device()
        return device.index

    return first.type == second.type and index(first) == index(second)


def _positive_grid(values: Sequence[float], key: str) -> tuple[float, ...]:
    grid = tuple(float(value) for value in values)
    if not grid or any(not math.isfinite(value) or value <= 0 for value in grid):
        raise DecoderLaplaceError(f"{key}: need a non-empty list of positive values, got {list(values)}")
    return grid


# --------------------------------------------------------------------------- inputs


class DecoderHypernetInputs(NamedTuple):
    """The hypernetwork last layer's inputs for ``P`` prompt sets.

    - ``upscaled``: ``P x K x H x W`` upscaled decoder features ``u`` (FRAME256, ``K = 32``).
    - ``tokens``: ``P x J`` penultimate hypernetwork activation ``h`` of the chosen output (``J = 256``).
    - ``token_indices``: ``P`` int64, the mask token of the chosen output (0..3).
    """

    upscaled: torch.Tensor
    tokens: torch.Tensor
    token_indices: torch.Tensor

    def subset(self, rows: torch.Tensor) -> lp.HypernetInputs:
        """The rows ``rows`` (index tensor) as the single-token ``HypernetInputs``."""
        return lp.HypernetInputs(self.upscaled[rows], self.tokens[rows])


def token_groups(token_indices: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(token, rows holding it)]`` for the tokens present in ``token_indices`` (``P``), ascending."""
    token_indices = token_indices.reshape(-1)
    return [(int(token), torch.nonzero(token_indices == token).reshape(-1))
            for token in torch.unique(token_indices).tolist()]


@dataclass
class DecodedRows:
    """One image's prompt sets decoded on its cached embedding, at the output stage 3 chose.

    - ``inputs``: ``DecoderHypernetInputs`` (P prompt sets).
    - ``decoder_logits``: ``P x 256 x 256`` float32 FRAME256, the decoder's own (MAP) logits.
    - ``final_layers``: the decoder's hypernetwork last ``nn.Linear`` per mask token (live, frozen).
    - ``targets``: ``P x 256 x 256`` float32 0/1 FRAME256 ground truth, or None.
    """

    safe_id: str
    promptset_ids: list[int]
    inputs: DecoderHypernetInputs
    decoder_logits: torch.Tensor
    final_layers: tuple[nn.Linear, ...]
    targets: torch.Tensor | None = None


def decode_chosen_outputs(
    backbone,
    features: Mapping[str, torch.Tensor],
    original_hw: tuple[int, int],
    points: torch.Tensor,
    labels: torch.Tensor,
    boxes: torch.Tensor,
    branch_index: torch.Tensor | np.ndarray,
    prompt_mode: str,
    multimask_policy: str,
) -> tuple[DecoderHypernetInputs, torch.Tensor, tuple[nn.Linear, ...]]:
    """Re-run the prompt decoder and keep, per prompt set, the output stage 3 chose.

    ``features``: the cached encoder features (``C x h x w`` or ``1 x C x h x w``); prompts in the
    ORIGINAL frame (``points P x N x 2``, ``labels P x N`` with -1 padding, ``boxes P x 4``), used as
    ``sam.prompt_mode`` says; ``branch_index``: ``P`` the output index stage 3 kept (the cache's
    ``branch_index``). Returns the hypernetwork inputs, the decoder's logits ``P x 256 x 256`` of the
    chosen outputs and the final layers.
    """
    def cached_branch(logits: torch.Tensor, iou_predictions: torch.Tensor) -> torch.Tensor:
        num_sets, num_outputs = iou_predictions.shape
        branch = torch.as_tensor(np.asarray(branch_index), dtype=torch.int64).reshape(-1).to(logits.device)
        if branch.numel() != num_sets or bool(((branch < 0) | (branch >= num_outputs)).any()):
            raise DecoderLaplaceError(
                f"sam.multimask_policy: cached branch indices {branch.tolist()} do not fit {num_sets} prompt sets x "
                f"{num_outputs} outputs of policy {multimask_policy!r}; rerun precompute_sam_outputs.py")
        return branch

    selected = decode_selected(backbone, features, original_hw, Prompts(points, labels, boxes), prompt_mode,
                               multimask_policy, unrolled=True, choose=cached_branch)
    decoded, branch = selected.unrolled, selected.branch
    rows = torch.arange(branch.shape[0], device=branch.device)
    with torch.no_grad():
        inputs = DecoderHypernetInputs(
            decoded.upscaled_features.float().clone(),
            decoded.hyper_hidden[rows, branch].float().clone(),
            decoded.token_indices[rows, branch].to(torch.int64).clone(),
        )
        logits = selected.logits.float().clone()
    return inputs, logits, tuple(decoded.final_layers)


# --------------------------------------------------------------------------- the token-keyed posterior


def final_layer_means(final_layers: Sequence[nn.Linear]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``token -> (W: K x J, b: K)`` float32 detached copies of the hypernetwork last layers."""
    return {token: (layer.weight.detach().float().clone(), layer.bias.detach().float().clone())
            for token, layer in enumerate(final_layers)}


@dataclass
class TokenCurvature:
    """The Bernoulli GGN diagonal of one token's last layer summed over the training rows using it.

    ``ggn_weight``: ``K x J`` float64, ``ggn_bias``: ``K`` float64, ``n_pixels``: pixels summed over,
    ``n_prompts``: prompt sets (rows) that used the token.
    """

    ggn_weight: torch.Tensor
    ggn_bias: torch.Tensor
    n_pixels: int = 0
    n_prompts: int = 0


class DecoderGgnAccumulator:
    """Sums the factorised GGN diagonal per mask token at the MAP weights of ``final_layers``.

    ``add(inputs)`` takes any ``DecoderHypernetInputs`` (any ``H x W``); each prompt set contributes to
    the token it used. Every token of the decoder has an entry (zero curvature if never used).
    """

    def __init__(self, final_layers: Sequence[nn.Linear]):
        self.means = final_layer_means(final_layers)
        self.curvature = {
            token: TokenCurvature(torch.zeros(weight.shape, dtype=torch.float64, device=weight.device),
                                  torch.zeros(bias.shape, dtype=torch.float64, device=bias.device))
            for token, (weight, bias) in self.means.items()
        }

    def add(self, inputs: DecoderHypernetInputs) -> None:
        for token, rows in token_groups(inputs.token_indices.to(inputs.upscaled.device)):
            if token not in self.means:
                raise DecoderLaplaceError(f"decoder inputs: mask token {token} does not exist "
                                          f"(the decoder has {len(self.means)})")
            weight, bias = self.means[token]
            subset = inputs.subset(rows.to(inputs.upscaled.device))
            ggn_weight, ggn_bias, n_pixels = lp.hypernet_ggn_from_batches(weight, bias, [subset])
            entry = self.curvature[token]
            entry.ggn_weight += ggn_weight.double().to(entry.ggn_weight.device)
            entry.ggn_bias += ggn_bias.double().to(entry.ggn_bias.device)
            entry.n_pixels += int(n_pixels)
            entry.n_prompts += int(rows.numel())

    @property
    def n_pixels(self) -> int:
        return sum(entry.n_pixels for entry in self.curvature.values())


class DecoderPosterior(lp.DiagonalLastLayerPosterior):
    """Diagonal Laplace posteriors of the hypernetwork last layers, one ``HypernetPosterior`` per token.

    Flattened weights (for ``sample_weights``) are the tokens' ``[vec(W_t), b_t]`` concatenated in
    ascending token order, so one seeded draw covers every token. Inputs are
    ``DecoderHypernetInputs``; prompt set ``p`` is evaluated with the posterior of its token
    ``token_indices[p]``. Outputs ``P x H x W`` (``S x P x H x W`` for samples), float32, on the
    posterior's device.
    """

    def __init__(self, posteriors: Mapping[int, lp.HypernetPosterior], temperature: float = 1.0):
        if not posteriors:
            raise DecoderLaplaceError("decoder posterior: needs at least one token")
        self.posteriors = {int(token): posteriors[token] for token in sorted(posteriors)}
        priors = {posterior.prior_precision for posterior in self.posteriors.values()}
        if len(priors) != 1:
            raise DecoderLaplaceError(f"decoder posterior: tokens have different prior precisions {sorted(priors)}")
        self.prior_precision = priors.pop()
        self.temperature = float(temperature)
        self.weight_mean = torch.cat([posterior.weight_mean for posterior in self.posteriors.values()])
        self.weight_variance = torch.cat([posterior.weight_variance for posterior in self.posteriors.values()])
        self._slices: dict[int, slice] = {}
        start = 0
        for token, posterior in self.posteriors.items():
            self._slices[token] = slice(start, start + posterior.num_weights)
            start += posterior.num_weights

    @classmethod
    def from_curvature(cls, means: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
                       curvature: Mapping[int, TokenCurvature], prior_precision: float,
                       temperature: float = 1.0) -> "DecoderPosterior":
        """Variances ``1 / (GGN / T + prior)`` for every token of ``means``."""
        if not temperature > 0 or not math.isfinite(temperature):
            raise DecoderLaplaceError(f"laplace.temperature_grid: temperature must be positive, got {temperature}")
        posteriors = {}
        for token, (weight, bias) in means.items():
            entry = curvature[token]
            posteriors[token] = lp.HypernetPosterior.from_ggn(
                weight, bias, (entry.ggn_weight / temperature).float().to(weight.device),
                (entry.ggn_bias / temperature).float().to(bias.device), prior_precision)
        return cls(posteriors, temperature)

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self.posteriors)

    def check_final_layers(self, final_layers: Sequence[nn.Linear], where: str) -> None:
        """Raise if the posterior means are not ``final_layers``' weights (fitted on another checkpoint)."""
        for token, (weight, bias) in final_layer_means(final_layers).items():
            posterior = self.posteriors.get(token)
            if posterior is None:
                raise DecoderLaplaceError(f"{where}: no posterior for mask token {token}")
            mean = torch.cat([weight.reshape(-1), bias]).to(posterior.device)
            if mean.shape != posterior.weight_mean.shape or not torch.allclose(mean, posterior.weight_mean,
                                                                                rtol=0, atol=1e-6):
                raise DecoderLaplaceError(f"{where}: the posterior mean of token {token} differs from the "
                                          "decoder's hypernetwork weights; fitted on another SAM checkpoint?")

    def prepare(self, inputs: DecoderHypernetInputs) -> DecoderHypernetInputs:
        if not isinstance(inputs, DecoderHypernetInputs):
            raise DecoderLaplaceError(f"decoder posterior: expected DecoderHypernetInputs, got {type(inputs).__name__}")
        token_indices = torch.as_tensor(inputs.token_indices).to(device=self.device, dtype=torch.int64).reshape(-1)
        missing = sorted(set(token_indices.tolist()) - set(self.posteriors))
        if missing:
            raise DecoderLaplaceError(f"decoder posterior: no posterior for mask tokens {missing} "
                                      f"(fitted for {list(self.posteriors)})")
        first = next(iter(self.posteriors.values()))
        prepared = first.prepare(lp.HypernetInputs(inputs.upscaled, inputs.tokens))  # checks the shapes
        if token_indices.numel() != prepared.tokens.shape[0]:
            raise DecoderLaplaceError(f"decoder inputs: {token_indices.numel()} token indices for "
                                      f"{prepared.tokens.shape[0]} prompt sets")
        return DecoderHypernetInputs(prepared.upscaled, prepared.tokens, token_indices)

    def _split(self, token: int, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ``token``'s ``... x (K*J + K)`` slice of ``flat`` -> (``... x K x J``, ``... x K``)."""
        posterior = self.posteriors[token]
        count = posterior.out_features * posterior.in_features
        values = flat[..., self._slices[token]]
        weight = values[..., :count].reshape(*values.shape[:-1], posterior.out_features, posterior.in_features)
        return weight, values[..., count:]

    def channel_moments(self, prepared: DecoderHypernetInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the hypernetwork output ``W_t h + b_t``, each ``P x K``.

        The logit is linear in it, ``z = (W_t h + b_t) . u``, and its ``K`` entries are independent under
        the diagonal posterior, so ``mean(z) = mean . u`` and ``var(z) = var . u^2`` at every pixel.
        """
        num_sets, channels = prepared.upscaled.shape[:2]
        mean = torch.empty((num_sets, channels), dtype=torch.float32, device=self.device)
        variance = torch.empty_like(mean)
        with torch.autocast(device_type=self.device.type, enabled=False):
            for token, rows in token_groups(prepared.token_indices):
                weight, bias = self._split(token, self.weight_mean)
                weight_var, bias_var = self._split(token, self.weight_variance)
                tokens = prepared.tokens[rows]
                mean[rows] = tokens @ weight.T + bias
                variance[rows] = tokens.square() @ weight_var.T + bias_var
        return mean, variance

    def logit_moments(self, prepared: DecoderHypernetInputs) -> tuple[torch.Tensor, torch.Tensor]:
        mean, variance = self.channel_moments(prepared)
        with torch.autocast(device_type=self.device.type, enabled=False):
            logit_mean = torch.einsum("pkhw,pk->phw", prepared.upscaled, mean)
            logit_var = torch.einsum("pkhw,pk->phw", prepared.upscaled.square(), variance)
        return logit_mean, logit_var

    def logits_for_weights(self, prepared: DecoderHypernetInputs, weights: torch.Tensor) -> torch.Tensor:
        num_sets, channels = prepared.upscaled.shape[:2]
        hyper = torch.empty((weights.shape[0], num_sets, channels), dtype=torch.float32, device=self.device)
        with torch.autocast(device_type=self.device.type, enabled=False):
            for token, rows in token_groups(prepared.token_indices):
                weight, bias = self._split(token, weights)  # S x K x J, S x K
                hyper[:, rows] = torch.einsum("skj,pj->spk", weight, prepared.tokens[rows]) + bias[:, None, :]
            return torch.einsum("spk,pkhw->sphw", hyper, prepared.upscaled)

    def state_dict(self) -> dict[str, Any]:
        """Per token ``HypernetPosterior.state_dict()``, plus the temperature (plain tensors and floats)."""
        return {"format_version": STATE_FORMAT_VERSION, "temperature": self.temperature,
                "prior_precision": self.prior_precision,
                "tokens": {token: posterior.state_dict() for token, posterior in self.posteriors.items()}}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], device: torch.device | str = "cpu") -> "DecoderPosterior":
        posteriors = {}
        for token, token_state in state["tokens"].items():
            tensors = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
                       for name, value in token_state.items()}
            posteriors[int(token)] = lp.HypernetPosterior.from_state_dict(tensors)
        return cls(posteriors, float(state["temperature"]))


# --------------------------------------------------------------------------- reading a split


class SplitRows:
    """The rows of one packed split (stage 4.5), decoded image by image on the cached embeddings.

    Iterating yields one ``DecodedRows`` per image, holding that image's rows in index order with
    their packed targets. The prompts come from the stage-2 prompt-set files, the chosen outputs from
    the SAM cache's ``branch_index``; the decoder runs on the backbone's device.
    """

    def __init__(self, cfg: PipelineConfig, split: str, backbone, cache=None):
        from modules.cache.packing import PackedSplitDataset, open_cache, packed_path

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
        from modules.data.promptset import load_promptsets, promptset_path

        try:
            return load_promptsets(self.cfg.project_root, self.split, safe_id)
        except (OSError, ValueError) as error:
            path = promptset_path(self.cfg.project_root, self.split, safe_id)
            raise DecoderLaplaceError(f"{path}: unreadable prompt-set file ({error_line(error)}); "
                                      "rerun generate_promptsets.py") from None

    def decode(self, rows: np.ndarray) -> DecodedRows:
        """The packed rows ``rows`` (all of one image) decoded at their chosen outputs."""
        from modules.data.promptset import promptset_tensors
        from modules.cache.sam_cache import SamCacheError

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
    for decoded in split_rows:
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
    priors = _positive_grid(prior_grid, "laplace.prior_precision_grid")
    temperatures = _positive_grid(temperature_grid, "laplace.temperature_grid")
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
def quality_checks(posterior: DecoderPosterior, validation: Sequence[DecodedRows] | SplitRows, num_samples: int,
                   seed: int, nll_eps: float) -> dict:
    """Decoder (MAP) vs Laplace NLL/ECE and the mutual-information margin on the decoder's errors."""
    quality = lp.PosteriorQualityAccumulator(nll_eps)
    for batch_index, decoded in enumerate(validation):
        targets = decoded.targets.to(posterior.device)
        map_prob = torch.sigmoid(decoded.decoder_logits.to(posterior.device))
        maps = posterior.uncertainty_maps(decoded.inputs, num_samples, seed=seed + batch_index)
        quality.update(map_prob, maps, targets)
    return quality.compute()


# --------------------------------------------------------------------------- artifacts


@dataclass
class DecoderPosteriorMeta(lp.PosteriorMeta):
    """``posterior_meta.json`` of the decoder target: ``PosteriorMeta`` plus the decoder's identity and
    a per-token table ``tokens`` (``token``, ``num_parameters``, ``n_data`` training pixels,
    ``n_prompts`` training rows). ``num_parameters`` counts every token's ``K*J + K`` values, all of
    which enter the Bernoulli logit (so ``num_bernoulli_parameters`` is the same number)."""

    sam_family: str = ""
    sam_model_type: str = ""
    prompt_mode: str = ""
    multimask_policy: str = ""
    tokens: list[dict] = field(default_factory=list)


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


def save_decoder_posterior(folder: str | Path, posterior: DecoderPosterior, accumulator: DecoderGgnAccumulator,
                           meta: DecoderPosteriorMeta, laplace_config: Mapping[str, Any]) -> None:
    """Write ``laplace_state.pt`` (posterior state + the raw GGN per token), ``laplace_config.yaml`` and
    ``posterior_meta.json`` into ``folder``, each atomically."""
    folder = Path(folder)
    state = posterior.state_dict()
    for token, entry in accumulator.curvature.items():
        state["tokens"][token]["ggn_weight"] = entry.ggn_weight.cpu()
        state["tokens"][token]["ggn_bias"] = entry.ggn_bias.cpu()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(folder / lp.STATE_FILE, buffer.getvalue())
    atomic_write_yaml(folder / lp.CONFIG_FILE, dict(laplace_config))
    atomic_write_json(folder / lp.META_FILE, asdict(meta))


def read_decoder_meta(folder: str | Path) -> DecoderPosteriorMeta:
    path = Path(folder) / lp.META_FILE
    if not path.is_file():
        raise DecoderLaplaceError(f"{path}: missing; run fit_laplace.py --set laplace.target={TARGET} first")
    try:
        meta = DecoderPosteriorMeta(**read_json(path))
    except (ValueError, TypeError) as error:
        raise DecoderLaplaceError(f"{path}: unreadable posterior metadata ({error_line(error)})") from None
    if meta.target != TARGET:
        raise DecoderLaplaceError(f"{path}: a posterior for target {meta.target!r}, not {TARGET!r}")
    return meta


def read_decoder_state(folder: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """``laplace_state.pt`` of ``folder`` (``torch.load(weights_only=True)``) mapped to ``device``."""
    path = Path(folder) / lp.STATE_FILE
    if not path.is_file():
        raise DecoderLaplaceError(f"{path}: missing; run fit_laplace.py --set laplace.target={TARGET} first")
    try:
        state = torch.load(path, map_location=torch.device(device), weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise DecoderLaplaceError(f"{path}: unreadable Laplace state ({type(error).__name__}: "
                                  f"{error_line(error)})") from None
    if not isinstance(state, dict) or state.get("format_version") != STATE_FORMAT_VERSION or "tokens" not in state:
        raise DecoderLaplaceError(f"{path}: not a decoder Laplace state (format {STATE_FORMAT_VERSION}); "
                                  "rerun fit_laplace.py --force")
    return state


def load_decoder_posterior_from_dir(folder: str | Path, device: torch.device | str = "cpu") -> DecoderPosterior:
    """The ``DecoderPosterior`` saved in ``folder``, on ``device`` (no checkpoint check; see below)."""
    read_decoder_meta(folder)
    try:
        return DecoderPosterior.from_state_dict(read_decoder_state(folder, device), device)
    except (KeyError, TypeError, ValueError) as error:
        raise DecoderLaplaceError(f"{Path(folder) / lp.STATE_FILE}: malformed decoder Laplace state "
                                  f"({error_line(error)})") from None


def sam_checkpoint_md5(cfg: PipelineConfig) -> str:
    try:
        return cached_file_md5(cfg.sam.checkpoint)
    except OSError:
        raise DecoderLaplaceError(f"sam.checkpoint: file not found: {cfg.sam.checkpoint}") from None


def load_decoder_posterior(cfg: PipelineConfig, run_id: str, device: torch.device | str) -> DecoderPosterior:
    """The decoder posterior of ``run_id`` on ``device``, after checking it was fitted on the configured
    SAM checkpoint (md5), backbone, prompt mode and multimask policy."""
    folder = laplace_run_dir(cfg.project_root, TARGET, run_id)
    meta = read_decoder_meta(folder)
    md5 = sam_checkpoint_md5(cfg)
    if meta.source_checkpoint_md5 != md5:
        raise DecoderLaplaceError(f"{folder}: fitted on SAM checkpoint md5 {meta.source_checkpoint_md5}, but "
                                  f"{cfg.sam.checkpoint} has md5 {md5}; rerun fit_laplace.py --force")
    sam = cfg.sam
    fitted = (meta.sam_family, meta.sam_model_type, meta.prompt_mode, meta.multimask_policy)
    configured = (sam.family, sam.model_type, sam.prompt_mode, sam.multimask_policy)
    if fitted != configured:
        raise DecoderLaplaceError(f"{folder}: fitted for sam (family, model_type, prompt_mode, multimask_policy) = "
                                  f"{fitted}, the config has {configured}; rerun fit_laplace.py --force")
    return load_decoder_posterior_from_dir(folder, device)


# --------------------------------------------------------------------------- the evaluation strategy


class DecoderLaplaceStrategy(Strategy):
    """The decoder-hypernetwork Laplace (``laplace.target: sam_decoder``) as an evaluation strategy.

    Per sample: the prompt decoder re-runs on the cached embedding with the sample's prompt sets
    (``prompt_mode``), the output stage 3 chose is kept (the cache entry's ``branch_index`` under
    ``multimask_policy``), and the posterior of that output's token gives ``mean_prob`` (closed-form
    probit) and, from ``num_samples`` weight draws seeded by ``(seed, sample key)``, the maps
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
                 prompt_mode: str = "points", multimask_policy: str = "best_iou") -> None:
        if not _same_device(posterior.device, torch.device(backbone.device)):
            raise DecoderLaplaceError(f"laplace: the posterior is on {posterior.device}, the SAM backbone on "
                                      f"{backbone.device}; load it with device={backbone.device}")
        if int(num_samples) < 1:
            raise DecoderLaplaceError(f"laplace.num_samples: must be at least 1, got {num_samples}")
        self.backbone = backbone
        self.posterior = posterior
        self.num_samples = int(num_samples)
        self.seed = int(seed)
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
        result = self.posterior.uncertainty_maps(inputs, self.num_samples,
                                                 seed=_derived_seed(self.seed, sample.sample_key))
        maps = {name: result[name].float() for name in self.MAP_NAMES}
        return StrategyOutput(result["mean_prob"].float(), maps, self.primary_map)


# --------------------------------------------------------------------------- the stage


def run_decoder_stage(ctx, run_id: str) -> None:
    """Stage 6 for ``laplace.target: sam_decoder`` (see the module docstring); ``run_id`` names the run."""
    from modules.sam.base import BackboneError
    from modules.sam.registry import load_backbone
    from modules.stages.fit_laplace import already_fitted
    from modules.scoring.plots import plot_prior_grid

    cfg = ctx.cfg
    settings = cfg.laplace
    checkpoint_md5 = sam_checkpoint_md5(cfg)
    folder = ctx.output_dir
    if already_fitted(ctx, cfg.sam.checkpoint, checkpoint_md5):
        return
    sam = cfg.sam
    ctx.check_inputs(["laplace"], {"sam_checkpoint_md5": checkpoint_md5, "sam_family": sam.family,
                                   "sam_model_type": sam.model_type, "prompt_mode": sam.prompt_mode,
                                   "multimask_policy": sam.multimask_policy})
    try:
        backbone = load_backbone(sam.family, sam.model_type, sam.checkpoint, sam.device)
    except BackboneError as error:
        raise DecoderLaplaceError(f"sam.checkpoint: {error}") from None

    train_rows = SplitRows(cfg, "train", backbone)
    val_rows = SplitRows(cfg, "val", backbone, cache=train_rows.cache)
    # Two passes over the validation split (grid search, quality checks): decode it once if it fits.
    validation = list(val_rows) if val_rows.num_rows * ROW_BYTES <= VALIDATION_IN_MEMORY_BYTES else val_rows
    print(f"[{ctx.name}] fitting a diagonal Laplace on the {sam.family}/{sam.model_type} decoder's hypernetwork "
          f"last layers over {train_rows.num_rows} training rows ({len(train_rows)} images) of {sam.checkpoint}")
    with torch.autocast(device_type=backbone.device.type, enabled=False):
        accumulator = accumulate_curvature(train_rows)
        unused = [token for token, entry in accumulator.curvature.items() if entry.n_prompts == 0]
        if unused:
            print(f"[{ctx.name}] mask tokens {unused} were never chosen on the training split: their posterior "
                  "is the prior")
        search = search_temperature_and_prior(accumulator.means, accumulator.curvature, validation,
                                              settings.prior_precision_grid, settings.temperature_grid,
                                              settings.nll_eps)
        posterior = DecoderPosterior.from_curvature(accumulator.means, accumulator.curvature,
                                                    search.prior_search.best_prior_precision, search.temperature)
    for step, row in search.table.iterrows():
        ctx.tracker.log(row.to_dict(), step=int(step))
    meta = posterior_meta(posterior, accumulator, search, checkpoint_md5, sam)
    save_decoder_posterior(folder, posterior, accumulator, meta, cfg.section("laplace"))
    atomic_write_csv(folder / "prior_precision_nll.csv", search.table)
    plot_prior_grid(list(search.prior_search.grid), list(search.prior_search.nll),
                    search.prior_search.best_prior_precision, folder / "prior_precision_nll.png",
                    title=f"SAM decoder Laplace prior precision (temperature {search.temperature:g})")
    with torch.autocast(device_type=backbone.device.type, enabled=False):
        checks = quality_checks(posterior, validation, settings.num_samples, settings.seed, settings.nll_eps)
    atomic_write_json(folder / "quality.json", checks)
    ctx.tracker.log_table("prior_precision_nll", search.table)
    ctx.tracker.log_artifact(folder, name=f"laplace-{TARGET}-run_{run_id}", type="laplace")
    ctx.summary({"prior_precision": posterior.prior_precision, "temperature": posterior.temperature,
                 "num_parameters": posterior.num_weights, "n_data_pixels": accumulator.n_pixels,
                 "tokens_without_data": unused, **checks})
