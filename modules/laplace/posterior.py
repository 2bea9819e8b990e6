"""Last-layer diagonal Laplace posteriors for per-pixel Bernoulli mask logits: fit, tune, save, reload, sample.

Two targets share one interface (``DiagonalLastLayerPosterior``):

- ``head`` (default): the final 1x1 conv of the prompt-aware head. Every pixel is one Bernoulli sample
  with feature vector ``phi = features(x)[b, :, i, j]`` (``C`` channels) and logit ``z = w . phi + b``.
  The posterior is fitted with laplace-torch 0.3, which has no binary likelihood and rejects a conv
  last layer, so the 1-logit conv is mapped onto a 2-logit ``nn.Linear(C, 2)`` with weight rows
  ``[0; w]`` and bias ``[0; b]``: ``softmax(.)[:, 1] == sigmoid(z)``, and the diagonal GGN of row 1 is
  exactly the Bernoulli GGN ``sum_pixels p (1 - p) phi^2`` (``ggn_diagonal_closed_form``; tested).
  Row 0 also receives a posterior in that mapping; sampling it would double the logit variance, so
  only row 1 (``C`` weights + 1 bias) is used for prediction and sampling.
- ``sam_decoder`` (option): the last Linear ``W: K x J`` (``32 x 256``), bias ``b: K``, of SAM's mask
  decoder hypernetwork MLP, with per-prompt token ``h: P x J`` and upscaled embedding
  ``u: P x K x H x W``; ``z = (W h + b) . u(pixel)``. The per-pixel feature is
  ``[vec(outer(u, h)), u]`` (``K*J + K = 8224`` values), far too many to materialise per pixel for
  laplace-torch at 256 x 256 (an 8224-wide feature for each of 65536 pixels is ~2.2 GB per prompt).
  The Bernoulli GGN diagonal factorises, ``diag_W[k, j] = sum_pix p (1 - p) u_k^2 h_j^2``, and is
  computed in closed form (``hypernet_ggn_diagonal``): the same quantity laplace-torch's GGN computes
  for this likelihood, verified against it on a small case in the tests.

Predictive: the binary probit approximation ``p = sigmoid(mu / sqrt(1 + pi * v / 8))`` with ``mu`` and
``v`` the per-pixel logit mean and variance; it equals laplace-torch's ``pred_type='glm',
link_approx='probit'`` for the head target. The prior precision is chosen on validation NLL over a
user grid (``laplace.prior_precision_grid``), with probabilities clamped to ``[eps, 1 - eps]``.

Sampling draws ``S`` weight vectors from the diagonal Gaussian and evaluates every pixel with the
same draw (spatially coherent samples), seeded by a ``torch.Generator`` on the posterior's device.
Entropies and mutual information are in nats.

Numerics: features and all posterior math run in float32 with autocast disabled (a float16 GGN
overflows on a few dozen 256 x 256 images).
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import math
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from laplace import Laplace
from laplace.baselaplace import ParametricLaplace
from laplace.curvature import AsdlGGN, BackPackGGN, CurvlinopsGGN
from laplace.curvature.curvature import CurvatureInterface

from modules.scoring.entropy import binary_entropy, binary_entropy_from_logits
from modules.core.errors import PipelineError
from modules.core.fileio import atomic_write_bytes, atomic_write_json, atomic_write_yaml, read_json
from modules.core.errors import error_line

# Measured on the 2-core development CPU, 8 images of 256 x 256 pixels, C = 16, one image per chunk:
# backpack 7.4 s, asdl 8.1 s, curvlinops 14.3 s (with 16384-pixel chunks: 10.2 / 11.9 / 29.6 s).
# All three return the same H (relative difference <= 1e-5).
LAPLACE_BACKENDS: dict[str, type[CurvatureInterface]] = {
    "backpack": BackPackGGN,
    "asdl": AsdlGGN,
    "curvlinops": CurvlinopsGGN,
}
DEFAULT_BACKEND = "backpack"
DEFAULT_PRIOR_PRECISION_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_NLL_EPS = 1e-6
DEFAULT_PIXELS_PER_CHUNK = 65536
DEFAULT_SAMPLES_PER_CHUNK = 16

# The name of the Linear inside the ``nn.Sequential`` handed to laplace-torch. Passing it explicitly
# stops ``fit`` from storing the first training batch in ``state_dict()['data']``.
LAST_LAYER_NAME = "0"
LAPLACE_LIKELIHOOD = "classification"
LAPLACE_SUBSET_OF_WEIGHTS = "last_layer"
LAPLACE_HESSIAN_STRUCTURE = "diag"

STATE_FILE = "laplace_state.pt"
CONFIG_FILE = "laplace_config.yaml"
META_FILE = "posterior_meta.json"

ENTROPY_UNITS = "nats"


class LaplacePosteriorError(PipelineError):
    """Bad configuration, input or artifact for the Laplace posterior; the message names the culprit."""


# --------------------------------------------------------------------------- small math helpers


def binary_probit_probability(logit_mean: torch.Tensor, logit_var: torch.Tensor) -> torch.Tensor:
    """Probit approximation of ``E[sigmoid(z)]`` for ``z ~ N(logit_mean, logit_var)``; same shape as inputs."""
    return torch.sigmoid(logit_mean / torch.sqrt(1.0 + math.pi * logit_var / 8.0))


def binary_nll(probability: torch.Tensor, target: torch.Tensor, eps: float = DEFAULT_NLL_EPS) -> torch.Tensor:
    """Per-pixel Bernoulli negative log-likelihood in nats, ``probability`` clamped to ``[eps, 1 - eps]``.

    The clamp keeps the NLL finite when a float32 probability saturates to exactly 0 or 1.
    """
    clamped = probability.clamp(eps, 1.0 - eps)
    target = target.to(clamped.dtype)
    return -(target * torch.log(clamped) + (1.0 - target) * torch.log1p(-clamped))


def ggn_diagonal_closed_form(
    features: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bernoulli GGN diagonal of a linear logit ``z = w . phi + b`` summed over pixels.

    features: ``N x C`` per-pixel features ``phi``; logits: ``N`` logits ``z`` at the MAP.
    Returns ``(diag_w: C, diag_b: scalar)`` = ``(sum p (1-p) phi^2, sum p (1-p))`` with ``p = sigmoid(z)``.
    """
    curvature = torch.sigmoid(logits) * torch.sigmoid(-logits)
    return curvature @ features.square(), curvature.sum()


def hypernet_ggn_diagonal(
    upscaled: torch.Tensor, tokens: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factorised Bernoulli GGN diagonal of a hypernetwork last Linear, summed over prompts and pixels.

    upscaled: ``P x K x H x W`` per-pixel embedding ``u``; tokens: ``P x J`` hypernetwork input ``h``;
    logits: ``P x H x W`` MAP logits ``z = (W h + b) . u``.
    Returns ``(diag_W: K x J, diag_b: K)`` with ``diag_W[k, j] = sum_{p, pix} s u_k^2 h_j^2`` and
    ``diag_b[k] = sum_{p, pix} s u_k^2``, ``s = sigmoid(z) (1 - sigmoid(z))``. Cost O(P K H W + P K J)
    instead of materialising the ``K*J``-wide per-pixel feature.
    """
    curvature = torch.sigmoid(logits) * torch.sigmoid(-logits)
    weighted_u2 = torch.einsum("pkhw,phw->pk", upscaled.square(), curvature)  # P x K
    return weighted_u2.T @ tokens.square(), weighted_u2.sum(dim=0)


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


# --------------------------------------------------------------------------- head target


class HeadInputs(NamedTuple):
    """Inputs of the prompt-aware head: ``x: B x 3 x H x W`` and, if the head uses it, the cached
    image embedding ``B x E x h x w``."""

    x: torch.Tensor
    image_embedding: torch.Tensor | None = None


def check_head(head: nn.Module) -> nn.Conv2d:
    """Return ``head.final_conv`` after checking the head has ``features`` and a 1-logit 1x1 conv last layer."""
    final_conv = getattr(head, "final_conv", None)
    if not callable(getattr(head, "features", None)) or not isinstance(final_conv, nn.Conv2d):
        raise LaplacePosteriorError(
            f"laplace.target_layer: {type(head).__name__} needs a features() method and a final_conv nn.Conv2d"
        )
    if final_conv.out_channels != 1 or tuple(final_conv.kernel_size) != (1, 1) or final_conv.bias is None:
        raise LaplacePosteriorError(
            "laplace.target_layer: final_conv must be a 1x1 conv with one output channel and a bias, "
            f"got {final_conv}"
        )
    return final_conv


def head_pixel_features(head: nn.Module, inputs: HeadInputs | torch.Tensor) -> torch.Tensor:
    """``features(x)`` as float32 ``B x C x H x W``, without autograd and with autocast disabled.

    ``inputs`` is ``x`` (``B x 3 x H x W``, any float dtype; cast to the head's dtype) or ``HeadInputs``.
    Everything is moved to the head's device.
    """
    if isinstance(inputs, torch.Tensor):
        inputs = HeadInputs(inputs)
    parameter = next(head.parameters())
    x = inputs.x.to(device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad(), torch.autocast(device_type=parameter.device.type, enabled=False):
        if inputs.image_embedding is None:
            features = head.features(x)
        else:
            embedding = inputs.image_embedding.to(device=parameter.device, dtype=parameter.dtype)
            features = head.features(x, embedding)
    return features.float()


def pixels_as_rows(features: torch.Tensor) -> torch.Tensor:
    """``B x C x H x W`` -> ``(B*H*W) x C`` (pixel order: batch, row, column)."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def two_class_last_layer(final_conv: nn.Conv2d) -> nn.Sequential:
    """The 1-logit 1x1 conv as a float32 ``nn.Sequential(nn.Linear(C, 2))`` with rows ``[0; w]``, bias ``[0; b]``.

    ``softmax(linear(phi))[:, 1] == sigmoid(conv logit)``; it lives on ``final_conv``'s device.
    """
    channels = final_conv.in_channels
    linear = nn.Linear(channels, 2, device=final_conv.weight.device, dtype=torch.float32)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.weight[1] = final_conv.weight.detach().reshape(channels).float()
        linear.bias[1] = final_conv.bias.detach().reshape(()).float()
    return nn.Sequential(linear)


def resolve_backend(name: str) -> type[CurvatureInterface]:
    """The laplace-torch curvature backend class registered under ``name``."""
    if name not in LAPLACE_BACKENDS:
        raise LaplacePosteriorError(
            f"laplace.backend: unknown backend {name!r}; choose one of {sorted(LAPLACE_BACKENDS)}"
        )
    return LAPLACE_BACKENDS[name]


def build_head_laplace(
    head: nn.Module, backend: str = DEFAULT_BACKEND, prior_precision: float = 1.0, temperature: float = 1.0
) -> ParametricLaplace:
    """An unfitted last-layer diagonal Laplace (laplace-torch) over the head's final conv as a 2-logit Linear.

    Its inputs are per-pixel features ``N x C`` (``pixels_as_rows(head_pixel_features(...))``).
    ``temperature`` T divides the GGN (posterior precision ``H / T + prior``): the pixels of a
    mask are far from independent observations, and T > 1 stops them from being counted as such.
    """
    last_layer = two_class_last_layer(check_head(head))
    return Laplace(
        last_layer,
        likelihood=LAPLACE_LIKELIHOOD,
        subset_of_weights=LAPLACE_SUBSET_OF_WEIGHTS,
        hessian_structure=LAPLACE_HESSIAN_STRUCTURE,
        last_layer_name=LAST_LAYER_NAME,
        backend=resolve_backend(backend),
        prior_precision=float(prior_precision),
        temperature=float(temperature),
    )


class PixelChunk(NamedTuple):
    """Key of one chunk of pixels: sample ``sample_index``, flat pixel range ``[start, stop)``."""

    sample_index: int
    start: int
    stop: int


def _unpack_sample(item: Any, where: str) -> tuple[HeadInputs, torch.Tensor]:
    """``(x, target)`` or ``(x, target, image_embedding)`` -> (HeadInputs, target)."""
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise LaplacePosteriorError(
            f"{where}: expected (x, target) or (x, target, image_embedding), got {type(item).__name__}"
        )
    embedding = item[2] if len(item) == 3 else None
    return HeadInputs(torch.as_tensor(item[0]), embedding), torch.as_tensor(item[1])


def _binary_targets(target: torch.Tensor, expected_shape: tuple[int, ...], where: str) -> torch.Tensor:
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


class HeadPixelDataset(Dataset):
    """Pixels of a sequence of head samples as laplace-torch training data, features computed lazily.

    ``samples[i]`` is ``(x: 3 x H x W, target: H x W)`` or ``(x, target, image_embedding: E x h x w)``;
    all samples share H x W. ``len()`` is the number of pixels (laplace-torch reads it as N); items are
    addressed by ``PixelChunk`` keys (``chunks()``), each giving ``(features: n x C, targets: n)`` on
    the head's device. The features of the most recent sample are cached, so a sequential pass
    computes each sample's features once and never holds more than one sample's features.
    """

    def __init__(
        self, head: nn.Module, samples: Sequence[Any], pixels_per_chunk: int = DEFAULT_PIXELS_PER_CHUNK
    ):
        if len(samples) == 0:
            raise LaplacePosteriorError("laplace training samples: the training split is empty")
        if int(pixels_per_chunk) < 1:
            raise LaplacePosteriorError(
                f"laplace.pixels_per_chunk: must be at least 1, got {pixels_per_chunk}"
            )
        self.head = head
        self.samples = samples
        self.pixels_per_chunk = int(pixels_per_chunk)
        first_inputs, _ = _unpack_sample(samples[0], "training sample 0")
        self.mask_shape = tuple(first_inputs.x.shape[-2:])
        self.pixels_per_sample = math.prod(self.mask_shape)
        self._cached_index: int | None = None
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.samples) * self.pixels_per_sample

    def chunks(self) -> list[PixelChunk]:
        """The chunk keys in sample order (pass as the DataLoader's sampler)."""
        return [
            PixelChunk(index, start, min(start + self.pixels_per_chunk, self.pixels_per_sample))
            for index in range(len(self.samples))
            for start in range(0, self.pixels_per_sample, self.pixels_per_chunk)
        ]

    def _sample_pixels(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cached_index != index:
            where = f"training sample {index}"
            inputs, target = _unpack_sample(self.samples[index], where)
            batched = HeadInputs(
                inputs.x.unsqueeze(0),
                (
                    None
                    if inputs.image_embedding is None
                    else torch.as_tensor(inputs.image_embedding).unsqueeze(0)
                ),
            )
            features = head_pixel_features(self.head, batched)  # 1 x C x H x W
            if tuple(features.shape[-2:]) != self.mask_shape:
                raise LaplacePosteriorError(
                    f"{where}: size {tuple(features.shape[-2:])} differs from sample 0's {self.mask_shape}"
                )
            targets = _binary_targets(target.to(features.device), self.mask_shape, where)
            self._cached = (pixels_as_rows(features), targets.reshape(-1))
            self._cached_index = index
        return self._cached

    def __getitem__(self, chunk: PixelChunk) -> tuple[torch.Tensor, torch.Tensor]:
        features, targets = self._sample_pixels(chunk.sample_index)
        return features[chunk.start : chunk.stop], targets[chunk.start : chunk.stop]


def fit_head_laplace(
    head: nn.Module,
    train_samples: Sequence[Any],
    backend: str = DEFAULT_BACKEND,
    pixels_per_chunk: int = DEFAULT_PIXELS_PER_CHUNK,
) -> ParametricLaplace:
    """Fit the last-layer diagonal Laplace of the head on every pixel of ``train_samples``.

    ``train_samples``: see ``HeadPixelDataset``. The head is put in eval mode and must already be on the
    target device; the fit runs in float32 outside autocast. ``la.n_data`` is the number of pixels.
    """
    check_head(head)
    head.eval()
    dataset = HeadPixelDataset(head, train_samples, pixels_per_chunk)
    # batch_size=None: each sampler key is one ready-made chunk; dataset length stays the pixel count.
    loader = DataLoader(dataset, sampler=dataset.chunks(), batch_size=None)
    la = build_head_laplace(head, backend)
    la.fit(loader)
    return la


class LastLayerPosterior(DiagonalLastLayerPosterior):
    """Bernoulli last-layer posterior of the head: ``z = w . phi + b`` with ``w ~ N(mean, diag(var))``.

    Flattened weights are ``[w_1..w_C, b]`` (row 1 of laplace-torch's 2-logit layer). Inputs are
    ``x: B x 3 x H x W`` or ``HeadInputs``; all methods run batched on the head's device. The head is
    put in eval mode and is not copied.
    """

    def __init__(
        self,
        head: nn.Module,
        weight_mean: torch.Tensor,
        weight_variance: torch.Tensor,
        prior_precision: float,
    ):
        final_conv = check_head(head)
        expected = (final_conv.in_channels + 1,)
        if tuple(weight_mean.shape) != expected or tuple(weight_variance.shape) != expected:
            raise LaplacePosteriorError(
                f"laplace posterior: expected {expected[0]} weights for a head with {final_conv.in_channels} channels, "
                f"got mean {tuple(weight_mean.shape)} and variance {tuple(weight_variance.shape)}"
            )
        self.head = head.eval()
        device = final_conv.weight.device
        self.weight_mean = weight_mean.detach().to(device=device, dtype=torch.float32)
        self.weight_variance = weight_variance.detach().to(device=device, dtype=torch.float32)
        self.prior_precision = float(prior_precision)

    @classmethod
    def from_laplace(cls, head: nn.Module, la: ParametricLaplace) -> "LastLayerPosterior":
        """Row 1 (weights ``[C:2C]``, bias ``[2C+1]``) of a fitted laplace-torch 2-logit posterior."""
        channels = check_head(head).in_channels
        if la.mean.numel() != 2 * channels + 2:
            raise LaplacePosteriorError(
                f"laplace posterior: {la.mean.numel()} parameters do not fit a head with {channels} channels"
            )
        row1 = torch.cat([torch.arange(channels, 2 * channels), torch.tensor([2 * channels + 1])]).to(
            la.mean.device
        )
        prior = la.prior_precision
        if prior.numel() != 1:
            raise LaplacePosteriorError("laplace posterior: only a scalar prior precision is supported")
        return cls(head, la.mean[row1], la.posterior_variance[row1], float(prior))

    def prepare(self, inputs: HeadInputs | torch.Tensor) -> torch.Tensor:
        return head_pixel_features(self.head, inputs)

    def logit_moments(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, bias = self.weight_mean[:-1], self.weight_mean[-1]
        weight_var, bias_var = self.weight_variance[:-1], self.weight_variance[-1]
        with torch.autocast(device_type=features.device.type, enabled=False):
            logit_mean = torch.einsum("bchw,c->bhw", features, weights) + bias
            logit_var = torch.einsum("bchw,c->bhw", features.square(), weight_var) + bias_var
        return logit_mean, logit_var

    def logits_for_weights(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=features.device.type, enabled=False):
            return torch.einsum("sc,bchw->sbhw", weights[:, :-1], features) + weights[:, -1, None, None, None]


# --------------------------------------------------------------------------- SAM decoder hypernetwork target


class HypernetInputs(NamedTuple):
    """Inputs of the hypernetwork last layer: ``upscaled: P x K x H x W`` (the per-pixel embedding ``u``)
    and ``tokens: P x J`` (the hypernetwork MLP's last hidden activation ``h``) for ``P`` prompt sets."""

    upscaled: torch.Tensor
    tokens: torch.Tensor


class HypernetPosterior(DiagonalLastLayerPosterior):
    """Diagonal posterior over the hypernetwork's last Linear, ``z = (W h + b) . u(pixel)``.

    Flattened weights are ``[vec(W) (row-major, K*J), b (K)]``. Logit variance
    ``v = sum_{k,j} var(W_kj) u_k^2 h_j^2 + sum_k var(b_k) u_k^2``. Inputs are ``HypernetInputs``;
    outputs are ``P x H x W`` (``S x P x H x W`` for samples).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        weight_variance: torch.Tensor,
        bias_variance: torch.Tensor,
        prior_precision: float,
    ):
        if (
            weight.ndim != 2
            or tuple(bias.shape) != (weight.shape[0],)
            or weight_variance.shape != weight.shape
            or bias_variance.shape != bias.shape
        ):
            raise LaplacePosteriorError(
                f"hypernet posterior: need W (K x J), b (K) and variances of the same shapes, got "
                f"{tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(weight_variance.shape)}, {tuple(bias_variance.shape)}"
            )
        self.out_features, self.in_features = weight.shape
        self.weight_mean = torch.cat([weight.detach().reshape(-1), bias.detach()]).float()
        self.weight_variance = (
            torch.cat([weight_variance.detach().reshape(-1), bias_variance.detach()])
            .float()
            .to(self.weight_mean.device)
        )
        self.prior_precision = float(prior_precision)

    @classmethod
    def from_ggn(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor,
        ggn_weight: torch.Tensor,
        ggn_bias: torch.Tensor,
        prior_precision: float,
    ) -> "HypernetPosterior":
        """Posterior variances ``1 / (GGN diagonal + prior precision)`` (the laplace-torch diag posterior, T = 1)."""
        if prior_precision <= 0:
            raise LaplacePosteriorError(
                f"laplace.prior_precision_grid: prior precision must be positive, got {prior_precision}"
            )
        return cls(
            weight,
            bias,
            1.0 / (ggn_weight + prior_precision),
            1.0 / (ggn_bias + prior_precision),
            prior_precision,
        )

    def _split(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``... x (K*J + K)`` -> (``... x K x J``, ``... x K``)."""
        count = self.out_features * self.in_features
        weight = flat[..., :count].reshape(*flat.shape[:-1], self.out_features, self.in_features)
        return weight, flat[..., count:]

    def prepare(self, inputs: HypernetInputs) -> HypernetInputs:
        upscaled = inputs.upscaled.to(device=self.device, dtype=torch.float32)
        tokens = inputs.tokens.to(device=self.device, dtype=torch.float32)
        if (
            upscaled.ndim != 4
            or tokens.ndim != 2
            or upscaled.shape[:2] != (tokens.shape[0], self.out_features)
            or tokens.shape[1] != self.in_features
        ):
            raise LaplacePosteriorError(
                f"hypernet inputs: need upscaled P x {self.out_features} x H x W and tokens P x {self.in_features}, "
                f"got {tuple(upscaled.shape)} and {tuple(tokens.shape)}"
            )
        return HypernetInputs(upscaled, tokens)

    def logit_moments(self, prepared: HypernetInputs) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self._split(self.weight_mean)
        weight_var, bias_var = self._split(self.weight_variance)
        with torch.autocast(device_type=self.device.type, enabled=False):
            hyper = prepared.tokens @ weight.T + bias  # P x K
            logit_mean = torch.einsum("pkhw,pk->phw", prepared.upscaled, hyper)
            per_channel_var = prepared.tokens.square() @ weight_var.T + bias_var  # P x K
            logit_var = torch.einsum("pkhw,pk->phw", prepared.upscaled.square(), per_channel_var)
        return logit_mean, logit_var

    def logits_for_weights(self, prepared: HypernetInputs, weights: torch.Tensor) -> torch.Tensor:
        weight, bias = self._split(weights)  # S x K x J, S x K
        with torch.autocast(device_type=self.device.type, enabled=False):
            hyper = torch.einsum("skj,pj->spk", weight, prepared.tokens) + bias[:, None, :]
            return torch.einsum("spk,pkhw->sphw", hyper, prepared.upscaled)

    def state_dict(self) -> dict[str, torch.Tensor | float]:
        """Tensors and the prior precision only (loadable with ``torch.load(weights_only=True)``)."""
        weight, bias = self._split(self.weight_mean)
        weight_var, bias_var = self._split(self.weight_variance)
        return {
            "weight": weight,
            "bias": bias,
            "weight_variance": weight_var,
            "bias_variance": bias_var,
            "prior_precision": self.prior_precision,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "HypernetPosterior":
        return cls(
            state["weight"],
            state["bias"],
            state["weight_variance"],
            state["bias_variance"],
            state["prior_precision"],
        )


def hypernet_ggn_from_batches(
    weight: torch.Tensor, bias: torch.Tensor, batches: Iterable[HypernetInputs]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum the factorised GGN diagonal over training batches at the MAP ``(W: K x J, b: K)``.

    Returns ``(ggn_weight: K x J, ggn_bias: K, n_pixels)``; targets are not needed (the GGN of the
    Bernoulli likelihood does not depend on them).
    """
    ggn_weight = torch.zeros_like(weight, dtype=torch.float32)
    ggn_bias = torch.zeros_like(bias, dtype=torch.float32)
    n_pixels = 0
    with torch.no_grad():
        for inputs in batches:
            upscaled = inputs.upscaled.to(device=weight.device, dtype=torch.float32)
            tokens = inputs.tokens.to(device=weight.device, dtype=torch.float32)
            logits = torch.einsum("pkhw,pk->phw", upscaled, tokens @ weight.float().T + bias.float())
            batch_weight, batch_bias = hypernet_ggn_diagonal(upscaled, tokens, logits)
            ggn_weight += batch_weight
            ggn_bias += batch_bias
            n_pixels += logits.numel()
    return ggn_weight, ggn_bias, n_pixels


# --------------------------------------------------------------------------- prior precision


@dataclass(frozen=True)
class PriorSearchResult:
    """Validation NLL (nats per pixel, mean over all validation pixels) for each grid value."""

    grid: tuple[float, ...]
    nll: tuple[float, ...]
    best_prior_precision: float
    num_pixels: int


def _check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(value) for value in grid)
    if not values or any(not math.isfinite(value) or value <= 0 for value in values):
        raise LaplacePosteriorError(
            f"laplace.prior_precision_grid: need a non-empty list of positive values, got {list(grid)}"
        )
    return values


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
    values = _check_grid(grid)
    posteriors = [make_posterior(value) for value in values]
    nll_sums = torch.zeros(len(values), dtype=torch.float64)
    num_pixels = 0
    for batch_index, (inputs, targets) in enumerate(validation_batches):
        prepared = posteriors[0].prepare(inputs)
        targets_on_device = None
        for grid_index, posterior in enumerate(posteriors):
            logit_mean, logit_var = posterior.logit_moments(prepared)
            if targets_on_device is None:
                targets_on_device = _binary_targets(
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


def tune_head_prior_precision(
    la: ParametricLaplace,
    head: nn.Module,
    validation_batches: Iterable[tuple[Any, torch.Tensor]],
    grid: Sequence[float] = DEFAULT_PRIOR_PRECISION_GRID,
    nll_eps: float = DEFAULT_NLL_EPS,
) -> PriorSearchResult:
    """Grid-search the head posterior's prior precision on validation NLL and set the best on ``la``.

    ``validation_batches`` yields ``(x: B x 3 x H x W or HeadInputs, targets: B x H x W)``.
    """

    def posterior_at(prior_precision: float) -> LastLayerPosterior:
        la.prior_precision = prior_precision
        return LastLayerPosterior.from_laplace(head, la)

    result = search_prior_precision(posterior_at, validation_batches, grid, nll_eps)
    la.prior_precision = result.best_prior_precision
    return result


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


def save_posterior(
    run_dir: str | Path, la: ParametricLaplace, meta: PosteriorMeta, laplace_config: Mapping[str, Any]
) -> None:
    """Write ``laplace_state.pt`` (laplace-torch ``state_dict()``), ``laplace_config.yaml`` (the laplace
    config section used) and ``posterior_meta.json`` into ``run_dir``, each atomically.

    The state holds no model weights (the head checkpoint is the source of truth, identified by
    ``meta.source_checkpoint_md5``) and no data batch (``last_layer_name`` is set).
    """
    state = la.state_dict()
    if state.get("data") is not None:
        raise LaplacePosteriorError(
            f"{run_dir}: the Laplace state holds a data batch; build it with last_layer_name set"
        )
    run_dir = Path(run_dir)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(run_dir / STATE_FILE, buffer.getvalue())
    atomic_write_yaml(run_dir / CONFIG_FILE, dict(laplace_config))
    atomic_write_json(run_dir / META_FILE, asdict(meta))


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


def parameters_from_module(module: nn.Module) -> torch.Tensor:
    """All parameters of ``module`` as one detached flat vector (laplace-torch's ordering)."""
    return torch.nn.utils.parameters_to_vector(module.parameters()).detach()


def load_head_laplace(run_dir: str | Path, head: nn.Module, device: str | torch.device) -> ParametricLaplace:
    """Rebuild the laplace-torch object saved by ``save_posterior`` around ``head`` (moved to ``device``).

    The state is plain tensors, ints, floats, strings and None (laplace-torch stores the likelihood as
    a plain ``str``), so ``torch.load(weights_only=True)`` reads it without extra allow-listing.
    Raises ``LaplacePosteriorError`` if the saved mean is not the head's final conv (another checkpoint).
    """
    run_dir = Path(run_dir)
    meta = read_posterior_meta(run_dir)
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise LaplacePosteriorError(f"{path}: missing; run the fit_laplace stage first")
    device = torch.device(device)
    head.to(device).eval()
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        raise LaplacePosteriorError(
            f"{path}: unreadable Laplace state ({type(error).__name__}: {error_line(error)})"
        ) from error
    la = build_head_laplace(head, meta.backend, temperature=meta.temperature)
    try:
        la.load_state_dict(state)
    except (KeyError, ValueError) as error:
        raise LaplacePosteriorError(f"{path}: does not match this head ({error_line(error)})") from error
    head_mean = parameters_from_module(la.model.last_layer)
    if not torch.allclose(la.mean, head_mean, rtol=0, atol=1e-6):
        raise LaplacePosteriorError(
            f"{path}: the posterior mean differs from the head's final_conv; fitted on another checkpoint?"
        )
    return la


def load_posterior(run_dir: str | Path, head: nn.Module, device: str | torch.device) -> LastLayerPosterior:
    """The ``LastLayerPosterior`` saved in ``run_dir`` for ``head`` (the checkpoint it was fitted on), on ``device``."""
    return LastLayerPosterior.from_laplace(head, load_head_laplace(run_dir, head, device))


def iterate_in_batches(samples: Sequence[Any], batch_size: int) -> Iterator[tuple[Any, torch.Tensor]]:
    """Stack ``(x, target[, image_embedding])`` samples into ``(B x 3 x H x W or HeadInputs, B x H x W)`` batches."""
    for start in range(0, len(samples), batch_size):
        indices = range(start, min(start + batch_size, len(samples)))
        unpacked = [_unpack_sample(samples[index], f"validation sample {index}") for index in indices]
        inputs = [sample_inputs for sample_inputs, _ in unpacked]
        targets = torch.stack([target for _, target in unpacked])
        with_embedding = [item.image_embedding is not None for item in inputs]
        if all(with_embedding):
            embeddings = torch.stack([torch.as_tensor(item.image_embedding) for item in inputs])
            yield HeadInputs(torch.stack([item.x for item in inputs]), embeddings), targets
        elif not any(with_embedding):
            yield torch.stack([item.x for item in inputs]), targets
        else:
            raise LaplacePosteriorError(
                f"validation samples {start}..{indices[-1]}: image_embedding given for some samples only"
            )


# --------------------------------------------------------------------------- quality checks


class PosteriorQualityAccumulator:
    """Is the posterior worth having? Streams, over validation batches, the calibration of the MAP
    prediction and of the probit predictive, and the mean mutual information on the pixels the
    MAP gets wrong vs right. ``update`` takes ``B x H x W`` maps on one device."""

    def __init__(self, nll_eps: float = DEFAULT_NLL_EPS):
        from modules.scoring.metrics import CalibrationAccumulator

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
            "ece_better": results["laplace"]["ece"] < results["map"]["ece"],
            "mi_higher_on_errors": mi_wrong > mi_right,
        }
