"""Laplace target ``sam_decoder``: the SAM / SAM 2 mask decoder's hypernetwork last layers, one
diagonal posterior per mask token (``DecoderPosterior``), and its saved artifacts.

For prompt set ``p`` the decoder's FRAME256 logit is ``z = (W_t h + b_t) . u(x)`` with ``t`` the mask
token of the output stage 3 chose (``sam.multimask_policy``). A token never chosen on the training
split has no curvature and keeps the prior. Fitting: ``laplace.decoder_fit``.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from modules.core.config import PipelineConfig
from modules.core.errors import error_line
from modules.core.fileio import atomic_write_bytes, atomic_write_json, atomic_write_yaml, read_json
from modules.core.paths import laplace_run_dir
from modules.laplace import posterior as lp
from modules.laplace.hypernet import HypernetInputs, HypernetPosterior, hypernet_ggn_from_batches
from modules.sam.prompting import Prompts, decode_selected
from modules.sam.registry import configured_checkpoint_md5

TARGET = "sam_decoder"
#: ``posterior_meta.json``'s ``backend`` for this target: the closed-form factorised GGN diagonal.
CURVATURE_BACKEND = "closed_form_ggn"
STATE_FORMAT_VERSION = 1


class DecoderLaplaceError(lp.LaplacePosteriorError):
    """Bad input, configuration or artifact for the decoder Laplace (one line naming the culprit)."""


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

    def subset(self, rows: torch.Tensor) -> HypernetInputs:
        """The rows ``rows`` (index tensor) as the single-token ``HypernetInputs``."""
        return HypernetInputs(self.upscaled[rows], self.tokens[rows])


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
            ggn_weight, ggn_bias, n_pixels = hypernet_ggn_from_batches(weight, bias, [subset])
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

    def __init__(self, posteriors: Mapping[int, HypernetPosterior], temperature: float = 1.0):
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
            posteriors[token] = HypernetPosterior.from_ggn(
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
        prepared = first.prepare(HypernetInputs(inputs.upscaled, inputs.tokens))  # checks the shapes
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
            posteriors[int(token)] = HypernetPosterior.from_state_dict(tensors)
        return cls(posteriors, float(state["temperature"]))


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
    lp.verify_state_file(path)
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


def load_decoder_posterior(cfg: PipelineConfig, run_id: str, device: torch.device | str) -> DecoderPosterior:
    """The decoder posterior of ``run_id`` on ``device``, after checking it was fitted on the configured
    SAM checkpoint (md5), backbone, prompt mode and multimask policy."""
    folder = laplace_run_dir(cfg.project_root, TARGET, run_id)
    meta = read_decoder_meta(folder)
    md5 = configured_checkpoint_md5(cfg.sam.checkpoint)
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

