"""The diagonal last-layer Laplace posterior shared by both targets: interface, prior search, checks.

A posterior is a diagonal Gaussian over the weights of a linear last layer producing one Bernoulli
logit per pixel (``DiagonalLastLayerPosterior``). The targets: the head's final conv
(``laplace.head``) and SAM's mask-decoder hypernetwork (``laplace.hypernet``, ``laplace.decoder``).
Its predictive is the binary probit approximation; entropies and mutual information are in nats.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import torch

from modules.core.config import unseen_group_keys
from modules.core.errors import PipelineError, error_line
from modules.core.fileio import read_json, remove_file
from modules.sam.base import BackboneError
from modules.sam.registry import verify_checkpoint_archive
from modules.scoring.entropy import binary_entropy, binary_entropy_from_logits
from modules.scoring.metrics import CalibrationAccumulator

if TYPE_CHECKING:  # laplace-torch is imported where a posterior is built (``laplace.head``)
    from laplace.baselaplace import ParametricLaplace

log = logging.getLogger("pipeline.laplace")

DEFAULT_PRIOR_PRECISION_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_NLL_EPS = 1e-6
DEFAULT_SAMPLES_PER_CHUNK = 16

STATE_FILE = "laplace_state.pt"
CONFIG_FILE = "laplace_config.yaml"
META_FILE = "posterior_meta.json"
GRID_TABLE_FILE = "prior_precision_nll.csv"
GRID_PLOT_FILE = "prior_precision_nll.png"
#: Written last by the stage: a fit killed before it is not complete and is refitted.
QUALITY_FILE = "quality.json"
#: The files of a complete fit (both targets).
ARTIFACTS = (STATE_FILE, CONFIG_FILE, META_FILE, GRID_TABLE_FILE, GRID_PLOT_FILE, QUALITY_FILE)

ENTROPY_UNITS = "nats"

#: ``laplace.predictive``: how the uncertainty maps are computed from the per-pixel logit Gaussian.
#: ``mc``: Monte Carlo over ``laplace.num_samples`` weight draws; ``closed_form``: probit predictive
#: and the Houlsby et al. (2011) approximation of the mutual information, no sampling.
PREDICTIVES = ("mc", "closed_form")

# Houlsby et al. (2011): the binary entropy of Phi(x) in bits is about exp(-x^2 / (pi ln 2)),
# and its mean over x ~ N(m, s) is C / sqrt(s + C^2) exp(-m^2 / (2 (s + C^2))) with C^2 = pi ln 2 / 2.
# With sigmoid(z) ~ Phi(z sqrt(pi / 8)) the logit z needs C^2 scaled by 8 / pi: 4 ln 2.
SIGMOID_ENTROPY_SCALE_SQ = 4.0 * math.log(2.0)


class LaplacePosteriorError(PipelineError):
    """Bad configuration, input or artifact for the Laplace posterior; the message names the culprit."""


# --------------------------------------------------------------------------- small math helpers


def probit_scaled_logit(logit_mean: torch.Tensor, logit_var: torch.Tensor) -> torch.Tensor:
    """The logit of the probit approximation of ``E[sigmoid(z)]``, ``z ~ N(logit_mean, logit_var)``:
    ``logit_mean / sqrt(1 + pi logit_var / 8)``; same shape as inputs."""
    return logit_mean / torch.sqrt(1.0 + math.pi * logit_var / 8.0)


def binary_probit_probability(logit_mean: torch.Tensor, logit_var: torch.Tensor) -> torch.Tensor:
    """Probit approximation of ``E[sigmoid(z)]`` for ``z ~ N(logit_mean, logit_var)``; same shape as inputs."""
    return torch.sigmoid(probit_scaled_logit(logit_mean, logit_var))


def closed_form_entropies(logit_mean: torch.Tensor, logit_var: torch.Tensor) -> dict[str, torch.Tensor]:
    """Entropies (nats) of a Bernoulli whose logit is ``N(logit_mean, logit_var)``, without sampling.

    Inputs and outputs share one shape (``B x H x W``), float32.

    - ``total_entropy``: the exact binary entropy of the probit predictive
      ``sigmoid(mu / sqrt(1 + pi v / 8))``.
    - ``mutual_information`` (BALD): Houlsby et al.'s approximation, both of its terms taken on the
      logit scale: ``h(p_bar) ~ exp(-mu^2 / (2 C^2 + pi ln2 v))`` and
      ``E[h] ~ C / sqrt(v + C^2) exp(-mu^2 / (2 (v + C^2)))`` bits, ``C^2 = 4 ln 2``. Their
      difference is written as ``E[h] * expm1(log h(p_bar) - log E[h])``, so it is exactly 0 at
      ``v = 0`` and keeps its relative precision when ``v`` is tiny.
    - ``expected_entropy`` (aleatoric): ``total_entropy - mutual_information``, clamped at 0.

    Why the expected entropy is not Houlsby's ``E[h]`` itself: ``exp(-z^2 / (8 ln 2))`` misses
    ``h(sigmoid(z))`` by up to ~0.1 nats in the tails, while a tight posterior's mutual information
    is ~1e-6 nats; the difference of the exact total and that ``E[h]`` would be approximation error.
    """
    with torch.autocast(device_type=logit_mean.device.type, enabled=False):
        mean, variance = logit_mean.float(), logit_var.float().clamp_min(0.0)
        scale_sq = SIGMOID_ENTROPY_SCALE_SQ
        probit_logit = mean / torch.sqrt(1.0 + math.pi * variance / 8.0)
        total_entropy = binary_entropy_from_logits(probit_logit)
        mean_sq = mean.square()
        log_expected_bits = -mean_sq / (2.0 * (variance + scale_sq)) - 0.5 * torch.log1p(variance / scale_sq)
        log_ratio = (mean_sq * variance * (math.pi * math.log(2.0) - 2.0)
                     / ((2.0 * scale_sq + math.pi * math.log(2.0) * variance) * (2.0 * (scale_sq + variance)))
                     + 0.5 * torch.log1p(variance / scale_sq))
        mutual_information = math.log(2.0) * torch.exp(log_expected_bits) * torch.expm1(log_ratio)
        mutual_information = torch.minimum(mutual_information, total_entropy)
    return {
        "total_entropy": total_entropy,
        "expected_entropy": (total_entropy - mutual_information).clamp_min(0.0),
        "mutual_information": mutual_information,
    }


def check_predictive(predictive: str) -> str:
    """``predictive`` if it is one of ``PREDICTIVES``, else a one-line error naming ``laplace.predictive``."""
    if predictive not in PREDICTIVES:
        raise LaplacePosteriorError(f"laplace.predictive: {predictive!r} is not one of {', '.join(PREDICTIVES)}")
    return predictive


def binary_nll(probability: torch.Tensor, target: torch.Tensor, eps: float = DEFAULT_NLL_EPS) -> torch.Tensor:
    """Per-pixel Bernoulli negative log-likelihood in nats, ``probability`` clamped to ``[eps, 1 - eps]``.

    The clamp keeps the NLL finite when a float32 probability saturates to exactly 0 or 1.
    """
    clamped = probability.clamp(eps, 1.0 - eps)
    target = target.to(clamped.dtype)
    return -(target * torch.log(clamped) + (1.0 - target) * torch.log1p(-clamped))


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics the saved posterior depends on."""
    return {"torch": torch.__version__, "laplace-torch": importlib.metadata.version("laplace-torch")}


def _seeded_generator(
    device: torch.device, seed: int | None, generator: torch.Generator | None
) -> torch.Generator:
    if (seed is None) == (generator is None):
        raise LaplacePosteriorError("laplace.seed: pass exactly one of seed or generator for sampling")
    if generator is not None:
        if generator.device.type != device.type:
            raise LaplacePosteriorError(
                f"laplace.seed: the generator is on {generator.device}, the posterior on {device}"
            )
        return generator
    return torch.Generator(device=device).manual_seed(int(seed))


def _check_num_samples(num_samples: int) -> None:
    if int(num_samples) < 1:
        raise LaplacePosteriorError(f"laplace.num_samples: must be at least 1, got {num_samples}")


# --------------------------------------------------------------------------- the shared posterior interface


class DiagonalLastLayerPosterior(ABC):
    """A diagonal Gaussian over the weights of a linear last layer producing one logit per pixel.

    Subclasses define what the inputs are (``prepare``), the logit mean/variance given prepared
    inputs and the logits for a batch of weight draws. Weights are flattened into one vector of
    ``num_weights`` values: ``weight_mean`` and ``weight_variance`` (both float32, on ``device``).
    """

    weight_mean: torch.Tensor
    weight_variance: torch.Tensor
    prior_precision: float

    @property
    def device(self) -> torch.device:
        return self.weight_mean.device

    @property
    def num_weights(self) -> int:
        return self.weight_mean.numel()

    @abstractmethod
    def prepare(self, inputs: Any) -> Any:
        """Everything up to the last layer for ``inputs`` (computed once, reused for moments and samples)."""

    @abstractmethod
    def logit_moments(self, prepared: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel logit mean and variance, each ``B x H x W`` float32."""

    @abstractmethod
    def logits_for_weights(self, prepared: Any, weights: torch.Tensor) -> torch.Tensor:
        """Logits ``S x B x H x W`` for ``S x num_weights`` flattened weight vectors."""

    def predictive(self, inputs: Any) -> dict[str, torch.Tensor]:
        """Closed-form predictive: ``mean_prob`` (probit), ``logit_mean``, ``logit_var``, each ``B x H x W``."""
        logit_mean, logit_var = self.logit_moments(self.prepare(inputs))
        return {
            "mean_prob": binary_probit_probability(logit_mean, logit_var),
            "logit_mean": logit_mean,
            "logit_var": logit_var,
        }

    def sample_weights(
        self, num_samples: int, seed: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``num_samples x num_weights`` draws from the diagonal Gaussian posterior."""
        _check_num_samples(num_samples)
        rng = _seeded_generator(self.device, seed, generator)
        noise = torch.randn(
            int(num_samples), self.num_weights, generator=rng, device=self.device, dtype=torch.float32
        )
        return self.weight_mean + noise * self.weight_variance.sqrt()

    def sample_logits(
        self,
        inputs: Any,
        num_samples: int,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``S x B x H x W`` logit samples, one weight draw per sample shared by every pixel.

        Pass exactly one of ``seed`` or ``generator`` (on the posterior's device); the same seed gives
        bit-identical samples on the same device.
        """
        weights = self.sample_weights(num_samples, seed, generator)
        return self.logits_for_weights(self.prepare(inputs), weights)

    def uncertainty_maps(
        self,
        inputs: Any,
        num_samples: int,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        samples_per_chunk: int = DEFAULT_SAMPLES_PER_CHUNK,
    ) -> dict[str, torch.Tensor]:
        """Per-pixel uncertainty decomposition, each map ``B x H x W`` float32, entropies in nats.

        Monte Carlo over ``S = num_samples`` weight draws (identical to ``sample_logits`` with the same
        seed), with ``p_s = sigmoid(z_s)``:

        - ``mean_prob``: the probit predictive probability (closed form, not Monte Carlo).
        - ``total_entropy``: binary entropy of the Monte-Carlo mean of ``p_s``.
        - ``expected_entropy`` (aleatoric): mean over samples of the binary entropy of ``p_s``.
        - ``mutual_information`` (epistemic, BALD): ``total_entropy - expected_entropy`` clamped at 0
          (it is >= 0 by Jensen's inequality; the clamp removes float rounding only).

        Precision: a posterior fitted on millions of pixels moves the logits by ~1e-3, so the mutual
        information is ~1e-6 nats, a difference of two entropies near 0.69: in float32 (and with
        ``z_s`` rounded to float32) it is rounding noise that ranks pixels at random. So each draw's
        logit shift ``z_s - mean`` is computed on its own (the logits are linear in the weights,
        float32 keeps its relative precision), and the entropies are evaluated and summed in
        float64 (good to ~1e-15 nats); the maps are returned as float32. Logits are evaluated
        ``samples_per_chunk`` draws at a time to bound memory.
        """
        if int(samples_per_chunk) < 1:
            raise LaplacePosteriorError(f"samples_per_chunk: must be at least 1, got {samples_per_chunk}")
        prepared = self.prepare(inputs)
        logit_mean, logit_var = self.logit_moments(prepared)
        deviations = self.sample_weights(num_samples, seed, generator) - self.weight_mean  # S x W
        precise_mean = logit_mean.double()
        probability_sum = torch.zeros_like(precise_mean)
        entropy_sum = torch.zeros_like(precise_mean)
        for start in range(0, deviations.shape[0], int(samples_per_chunk)):
            shifts = self.logits_for_weights(prepared, deviations[start : start + int(samples_per_chunk)])
            logits = shifts.double().add_(precise_mean)
            probability_sum += torch.sigmoid(logits).sum(dim=0)
            entropy_sum += binary_entropy_from_logits(logits).sum(dim=0)
        total_entropy = binary_entropy(probability_sum / deviations.shape[0])
        expected_entropy = entropy_sum / deviations.shape[0]
        return {
            "mean_prob": binary_probit_probability(logit_mean, logit_var),
            "total_entropy": total_entropy.float(),
            "expected_entropy": expected_entropy.float(),
            "mutual_information": (total_entropy - expected_entropy).clamp_min(0.0).float(),
        }

    def closed_form_maps(self, inputs: Any) -> dict[str, torch.Tensor]:
        """The maps of ``uncertainty_maps`` without sampling, each ``B x H x W`` float32, nats.

        ``mean_prob`` (probit) as there; the entropies from the per-pixel logit mean and variance
        (``logit_moments``: the last layer once on the features, once on their squares with the
        posterior variances as weights) by ``closed_form_entropies``.
        """
        logit_mean, logit_var = self.logit_moments(self.prepare(inputs))
        return {"mean_prob": binary_probit_probability(logit_mean, logit_var),
                **closed_form_entropies(logit_mean, logit_var)}

    def maps(self, inputs: Any, predictive: str, num_samples: int, seed: int | None = None,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``uncertainty_maps`` (``predictive == "mc"``) or ``closed_form_maps`` (``"closed_form"``, which
        ignores ``num_samples``, ``seed`` and ``generator``): ``laplace.predictive`` chooses."""
        if check_predictive(predictive) == "closed_form":
            return self.closed_form_maps(inputs)
        return self.uncertainty_maps(inputs, num_samples, seed=seed, generator=generator)


def binary_targets(target: torch.Tensor, expected_shape: tuple[int, ...], where: str) -> torch.Tensor:
    """A 0/1 mask of ``expected_shape`` (a leading singleton channel is dropped) as long class indices."""
    if target.ndim == len(expected_shape) + 1 and target.shape[-3] == 1:
        target = target.squeeze(-3)
    if tuple(target.shape) != tuple(expected_shape):
        raise LaplacePosteriorError(
            f"{where}: target shape {tuple(target.shape)} does not match logits {tuple(expected_shape)}"
        )
    if not bool(((target == 0) | (target == 1)).all()):
        raise LaplacePosteriorError(f"{where}: target must be a binary 0/1 mask")
    return target.long()


# --------------------------------------------------------------------------- prior precision


@dataclass(frozen=True)
class PriorSearchResult:
    """Validation NLL (nats per pixel, mean over all validation pixels) for each grid value."""

    grid: tuple[float, ...]
    nll: tuple[float, ...]
    best_prior_precision: float
    num_pixels: int


def positive_grid(values: Sequence[float], key: str,
                  error: type[LaplacePosteriorError] = LaplacePosteriorError) -> tuple[float, ...]:
    """``values`` as floats; ``error`` naming ``key`` unless they are a non-empty list of positive numbers."""
    grid = tuple(float(value) for value in values)
    if not grid or any(not math.isfinite(value) or value <= 0 for value in grid):
        raise error(f"{key}: need a non-empty list of positive values, got {list(values)}")
    return grid


def search_prior_precision(
    make_posterior: Callable[[float], DiagonalLastLayerPosterior],
    validation_batches: Iterable[tuple[Any, torch.Tensor]],
    grid: Sequence[float] = DEFAULT_PRIOR_PRECISION_GRID,
    nll_eps: float = DEFAULT_NLL_EPS,
) -> PriorSearchResult:
    """Score every prior precision of ``grid`` by the probit-predictive NLL on ``validation_batches``.

    ``make_posterior(prior)`` builds the posterior for one prior precision; ``validation_batches``
    yields ``(inputs, targets)`` with targets ``B x H x W`` (or ``B x 1 x H x W``) 0/1 masks. The inputs
    are prepared once per batch and shared by every grid value (the layers below the last one do
    not depend on the prior). The first minimum wins ties.
    """
    values = positive_grid(grid, "laplace.prior_precision_grid")
    posteriors = [make_posterior(value) for value in values]
    nll_sums = torch.zeros(len(values), dtype=torch.float64)
    num_pixels = 0
    for batch_index, (inputs, targets) in enumerate(validation_batches):
        prepared = posteriors[0].prepare(inputs)
        targets_on_device = None
        for grid_index, posterior in enumerate(posteriors):
            logit_mean, logit_var = posterior.logit_moments(prepared)
            if targets_on_device is None:
                targets_on_device = binary_targets(
                    torch.as_tensor(targets).to(logit_mean.device),
                    tuple(logit_mean.shape),
                    f"validation batch {batch_index}",
                )
            probability = binary_probit_probability(logit_mean, logit_var)
            nll_sums[grid_index] += binary_nll(probability, targets_on_device, nll_eps).double().sum().cpu()
        num_pixels += targets_on_device.numel()
    if num_pixels == 0:
        raise LaplacePosteriorError("laplace validation samples: the validation split is empty")
    nll = nll_sums / num_pixels
    if not bool(torch.isfinite(nll).all()):
        raise LaplacePosteriorError(
            f"laplace validation: non-finite NLL {nll.tolist()} (check features for NaN)"
        )
    best = int(torch.argmin(nll))
    return PriorSearchResult(values, tuple(nll.tolist()), values[best], num_pixels)


#: The searched Laplace grids reach this many decades past the configured ends (``search_inside_grids``).
MAX_GRID_WIDENINGS = 3
GRID_WIDENING_FACTOR = 10.0

#: ``laplace.prior_selection``: what picks the prior precision at each temperature. ``marglik``: the
#: Laplace marginal likelihood (``prior_log_evidence``), no validation data; ``val_nll``: the validation
#: NLL of the probit predictive (the ridge described in ``search_inside_grids``).
PRIOR_SELECTIONS = ("marglik", "val_nll")


def check_prior_selection(selection: str) -> str:
    """``selection`` if it is one of ``PRIOR_SELECTIONS``, else a one-line error naming ``laplace.prior_selection``."""
    if selection not in PRIOR_SELECTIONS:
        raise LaplacePosteriorError(
            f"laplace.prior_selection: {selection!r} is not one of {', '.join(PRIOR_SELECTIONS)}")
    return selection


def prior_log_evidence(weight_mean: torch.Tensor, hessian_diagonal: torch.Tensor,
                       prior_precisions: Sequence[float], temperature: float) -> tuple[float, ...]:
    """The terms of the Laplace log marginal likelihood that depend on the prior precision, one per value.

    ``weight_mean`` and ``hessian_diagonal``: ``W`` (the MAP weights and the GGN diagonal of the
    Bernoulli logit's layer, bias included). For an isotropic prior ``N(0, 1/lambda)`` and the
    posterior precision ``h = H / T + lambda``:
    ``-lambda |theta|^2 / 2 + W/2 log lambda - 1/2 sum log(h)`` (laplace-torch's ``log_marginal_likelihood``
    less its log-likelihood, which does not depend on lambda). Its maximiser satisfies MacKay's
    ``lambda |theta|^2 = sum_i h_i' / (h_i' + lambda)`` with ``h' = H / T``: at most ``W / |theta|^2``.
    laplace-torch's own method would score the head's 2-logit layer, whose all-zero row 0 counts
    every log-determinant twice; this is the evidence of the one Bernoulli logit. Float64.
    """
    mean = weight_mean.detach().double().cpu()
    curvature = hessian_diagonal.detach().double().cpu() / float(temperature)
    squared_norm = float(mean.square().sum())
    values = []
    for prior in positive_grid(prior_precisions, "laplace.prior_precision_grid"):
        values.append(-0.5 * prior * squared_norm + 0.5 * mean.numel() * math.log(prior)
                      - 0.5 * float(torch.log(curvature + prior).sum()))
    return tuple(values)


@dataclass(frozen=True)
class TwoGridSearch:
    """The outcome of ``search_inside_grids``: the best temperature, the prior search at it (its
    ``best_prior_precision`` is the chosen prior), every (temperature, prior precision, val NLL[,
    log evidence]) tried, the grids as widened, and whether each chosen value lies strictly inside
    its searched grid (``on_edge``: either does not; more widening was not allowed)."""

    temperature: float
    search: PriorSearchResult
    table: list[dict]
    temperature_grid: tuple[float, ...]
    prior_precision_grid: tuple[float, ...]
    temperature_interior: bool
    prior_precision_interior: bool
    prior_selection: str = "val_nll"

    @property
    def on_edge(self) -> bool:
        return not (self.temperature_interior and self.prior_precision_interior)


def _widened(grid: tuple[float, ...], index: int) -> tuple[float, ...] | None:
    """``grid`` with one more value past the end ``index`` sits on, or None when it is inside."""
    if len(grid) > 1 and 0 < index < len(grid) - 1:
        return None
    if index == 0:
        return (grid[0] / GRID_WIDENING_FACTOR, *grid)
    return (*grid, grid[-1] * GRID_WIDENING_FACTOR)


def search_inside_grids(search_at: Callable[[float, tuple[float, ...]], PriorSearchResult],
                        temperature_grid: Sequence[float], prior_precision_grid: Sequence[float],
                        max_widenings: int = MAX_GRID_WIDENINGS,
                        evidence_at: Callable[[float, tuple[float, ...]], Sequence[float]] | None = None
                        ) -> TwoGridSearch:
    """Choose the temperature (validation NLL) and the prior precision (validation NLL, or the marginal
    likelihood when ``evidence_at`` is given), with both ranges widened until the chosen pair lies
    strictly inside them, or ``max_widenings`` decades past the configured ends.

    ``search_at(temperature, prior grid)`` scores a whole prior grid at one temperature in one pass
    over the validation data, so the prior grid gets its extra decades at both ends from the start
    (more values cost little within a pass), while the temperature grid grows one decade at a time
    past the end its best value lies on (each temperature costs a pass). ``evidence_at(temperature,
    prior grid)``: the log evidence of each prior (``prior_log_evidence``); at each temperature the
    prior is its maximiser, and the temperature minimises the validation NLL at that prior.

    Why the evidence: the probit predictive depends on the posterior variances ``1 / (H_i / T +
    lambda)`` only, so by validation NLL alone the two trade off along a ridge: wherever ``H / T``
    dominates, lambda changes the NLL by rounding noise (the first, smallest, prior wins), and when
    the MAP logits are overconfident the NLL keeps falling as T grows until the posterior is the
    prior alone. Ties go to the lowest temperature and the lowest prior precision.
    """
    temperatures = tuple(sorted(set(positive_grid(temperature_grid, "laplace.temperature_grid"))))
    configured = sorted(set(positive_grid(prior_precision_grid, "laplace.prior_precision_grid")))
    priors = tuple([configured[0] / GRID_WIDENING_FACTOR ** step for step in range(max_widenings, 0, -1)]
                   + configured + [configured[-1] * GRID_WIDENING_FACTOR ** step
                                   for step in range(1, max_widenings + 1)])
    searches: dict[float, PriorSearchResult] = {}
    evidences: dict[float, tuple[float, ...]] = {}
    chosen: dict[float, int] = {}  # the chosen prior's index at each temperature
    widenings = {"low": 0, "high": 0}
    while True:
        for temperature in temperatures:
            if temperature not in searches:
                searches[temperature] = search_at(temperature, priors)
                if evidence_at is None:
                    nll = searches[temperature].nll
                    chosen[temperature] = nll.index(min(nll))
                else:
                    evidences[temperature] = tuple(float(value) for value in evidence_at(temperature, priors))
                    chosen[temperature] = evidences[temperature].index(max(evidences[temperature]))
        best_temperature = min(temperatures, key=lambda t: (searches[t].nll[chosen[t]], t))
        wider = _widened(temperatures, temperatures.index(best_temperature))
        if wider is None:
            break
        end = "low" if wider[0] < temperatures[0] else "high"
        if widenings[end] == max_widenings:
            break
        widenings[end] += 1
        temperatures = wider
    search = replace(searches[best_temperature], best_prior_precision=priors[chosen[best_temperature]])
    table = [{"temperature": t, "prior_precision": p, "val_nll": nll,
              **({} if evidence_at is None else {"log_evidence": evidences[t][index]})}
             for t in temperatures for index, (p, nll) in enumerate(zip(searches[t].grid, searches[t].nll))]
    temperature_interior = wider is None
    prior_interior = _widened(priors, chosen[best_temperature]) is None
    selection = "val_nll" if evidence_at is None else "marglik"
    if not (temperature_interior and prior_interior):
        ends = [name for name, inside in (("temperature", temperature_interior),
                                          ("prior precision", prior_interior)) if not inside]
        log.warning("the chosen Laplace %s (temperature %g, prior precision %g by %s) lies on an end of the "
                    "searched grids %s x %s; the criterion may keep improving past it (laplace.grid_widening "
                    "searches further)", " and ".join(ends), best_temperature, search.best_prior_precision,
                    selection, list(temperatures), list(priors))
    return TwoGridSearch(best_temperature, search, table, temperatures, priors, temperature_interior,
                         prior_interior, selection)


# --------------------------------------------------------------------------- artifacts


@dataclass
class PosteriorMeta:
    """What ``posterior_meta.json`` records besides the laplace-torch state."""

    target: str
    backend: str
    num_parameters: int  # parameters in laplace-torch's 2-logit layer (2C + 2)
    num_bernoulli_parameters: int  # those used for prediction and sampling (row 1: C + 1)
    prior_precision: float
    prior_precision_grid: list[float]
    prior_precision_nll: list[float]
    n_data: int  # training pixels
    source_checkpoint_md5: str
    temperature: float = 1.0  # likelihood temperature (GGN divided by it), tuned with the prior
    tuning_nll: list[dict] = field(default_factory=list)  # every (temperature, prior precision, val NLL) tried
    library_versions: dict[str, str] = field(default_factory=library_versions)
    entropy_units: str = ENTROPY_UNITS

    @classmethod
    def for_head(
        cls, la: ParametricLaplace, backend: str, search: PriorSearchResult, source_checkpoint_md5: str
    ) -> "PosteriorMeta":
        return cls(
            target="head",
            backend=backend,
            num_parameters=int(la.n_params),
            num_bernoulli_parameters=int(la.n_params) // 2,
            # the grid value itself: laplace-torch stores it as a float32 tensor (1e-4 -> 9.99999975e-05)
            prior_precision=search.best_prior_precision,
            prior_precision_grid=list(search.grid),
            prior_precision_nll=list(search.nll),
            n_data=int(la.n_data),
            source_checkpoint_md5=source_checkpoint_md5,
            temperature=float(la.temperature),
        )


def read_posterior_meta(run_dir: str | Path) -> PosteriorMeta:
    """``posterior_meta.json`` of ``run_dir`` as a ``PosteriorMeta``."""
    path = Path(run_dir) / META_FILE
    if not path.is_file():
        raise LaplacePosteriorError(f"{path}: missing; run the fit_laplace stage first")
    try:
        return PosteriorMeta(**read_json(path))
    except (json.JSONDecodeError, TypeError) as error:
        raise LaplacePosteriorError(
            f"{path}: unreadable posterior metadata ({error_line(error)})"
        ) from error


def verify_state_file(path: Path) -> None:
    """A ``LaplacePosteriorError`` naming ``path`` when a member of the saved state's zip archive fails
    its CRC-32 (``torch.load`` would read the flipped bytes as a wrong posterior)."""
    try:
        verify_checkpoint_archive(path)
    except BackboneError as error:
        raise LaplacePosteriorError(f"{error}".split(";")[0] + "; rerun fit_laplace.py --force") from None


def already_fitted(ctx, checkpoint: Path | str, checkpoint_md5: str, upstream: Mapping[str, Any]) -> bool:
    """True when the stage's output folder holds a complete posterior fitted from the same inputs (skip it).

    The stage fingerprint (the ``laplace`` section, ``data.unseen_groups`` when set, and ``upstream``)
    is checked first, before any
    skip: changed inputs are a one-line error until ``--force``. A fit that starts over (``--force``,
    or no fingerprint yet) first deletes the previous posterior files, so a refit killed half-way
    never leaves the old posterior looking complete under the new fingerprint.
    """
    folder = ctx.output_dir
    if ctx.check_inputs(["laplace", *unseen_group_keys(ctx.cfg)], dict(upstream)):
        for name in ARTIFACTS:
            remove_file(folder / name, folder)
        return False
    if not all((folder / name).is_file() for name in ARTIFACTS):
        return False
    try:
        verify_state_file(folder / STATE_FILE)
    except LaplacePosteriorError as error:
        log.info(f"[{ctx.name}] {error}; fitting again")
        return False
    meta = read_json(folder / META_FILE)
    fitted_on = meta.get("source_checkpoint_md5")
    if fitted_on != checkpoint_md5:
        raise PipelineError(f"{folder}: fitted on checkpoint md5 {fitted_on}, but {checkpoint} now has md5 "
                            f"{checkpoint_md5}; rerun with --force to refit")
    log.info(f"[{ctx.name}] {folder}: already fitted on {checkpoint} (md5 {checkpoint_md5}); skipping")
    ctx.summary({"skipped": True, "prior_precision": meta.get("prior_precision")})
    return True


# --------------------------------------------------------------------------- quality checks


#: What the boolean checks of ``quality.json`` require (each is also written there as ``margin_<check>``):
#: ``nll_better`` / ``ece_better``: the Laplace predictive's NLL / ECE at least this fraction below the
#: MAP head's; ``mi_higher_on_errors``: the mean mutual information on the MAP head's wrong pixels at
#: least this multiple of that on its correct pixels (a ratio of 1.007 is no evidence of anything).
QUALITY_MARGINS = {"nll_better": 0.01, "ece_better": 0.05, "mi_higher_on_errors": 1.5}


class PosteriorQualityAccumulator:
    """Is the posterior worth having? Streams, over validation batches, the calibration of the MAP
    prediction and of the probit predictive, and the mean mutual information on the pixels the
    MAP gets wrong vs right. ``update`` takes ``B x H x W`` maps on one device."""

    def __init__(self, nll_eps: float = DEFAULT_NLL_EPS):
        self.calibration = {"map": CalibrationAccumulator(eps=nll_eps), "laplace": CalibrationAccumulator(eps=nll_eps)}
        self.mi_sum = {True: 0.0, False: 0.0}
        self.mi_count = {True: 0, False: 0}

    def update(self, map_prob: torch.Tensor, maps: Mapping[str, torch.Tensor], targets: torch.Tensor) -> None:
        self.calibration["map"].update(map_prob, targets)
        self.calibration["laplace"].update(maps["mean_prob"], targets)
        wrong = (map_prob > 0.5) != (targets > 0.5)
        for is_wrong in (True, False):
            selected = maps["mutual_information"][wrong == is_wrong]
            self.mi_sum[is_wrong] += float(selected.double().sum())
            self.mi_count[is_wrong] += int(selected.numel())

    def compute(self) -> dict:
        results = {name: accumulator.compute() for name, accumulator in self.calibration.items()}
        mi_wrong = self.mi_sum[True] / max(self.mi_count[True], 1)
        mi_right = self.mi_sum[False] / max(self.mi_count[False], 1)
        return {
            "map_nll": results["map"]["nll"], "laplace_nll": results["laplace"]["nll"],
            "map_ece": results["map"]["ece"], "laplace_ece": results["laplace"]["ece"],
            "ece_bins": results["laplace"]["n_bins"],
            "mi_on_map_errors": mi_wrong, "mi_on_map_correct": mi_right,
            "mi_error_ratio": mi_wrong / mi_right if mi_right > 0 else float("inf"),
            # relative tolerance: a posterior tuned onto the MAP differs from it by float rounding
            "nll_no_worse": results["laplace"]["nll"] <= results["map"]["nll"] * (1 + 1e-6),
            "nll_better": results["laplace"]["nll"] <= results["map"]["nll"] * (1 - QUALITY_MARGINS["nll_better"]),
            "ece_better": results["laplace"]["ece"] <= results["map"]["ece"] * (1 - QUALITY_MARGINS["ece_better"]),
            "mi_higher_on_errors": mi_wrong >= mi_right * QUALITY_MARGINS["mi_higher_on_errors"],
            **{f"margin_{name}": margin for name, margin in QUALITY_MARGINS.items()},
        }

