"""Laplace target ``head``: the prompt-aware head's final 1x1 conv (``laplace.target_layer``).

Every pixel is one Bernoulli observation with feature ``phi = features(x)[b, :, i, j]`` and logit
``z = w . phi + b``. laplace-torch fits it through a 2-logit ``nn.Linear`` (``two_class_last_layer``);
only the row that carries the head's logit is kept for prediction and sampling
(``LastLayerPosterior``). Features and all posterior math run in float32 with autocast off.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import asdict
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from modules.core.errors import error_line
from modules.core.fileio import atomic_write_bytes, atomic_write_json, atomic_write_yaml, cached_file_md5
from modules.core.paths import laplace_run_dir
from modules.core.progress import TrackedIterable
from modules.laplace.posterior import (CONFIG_FILE, DEFAULT_NLL_EPS, DEFAULT_PRIOR_PRECISION_GRID, META_FILE,
                                       STATE_FILE, DiagonalLastLayerPosterior, LaplacePosteriorError,
                                       PosteriorMeta, PosteriorQualityAccumulator, PriorSearchResult,
                                       binary_targets, prior_log_evidence, read_posterior_meta, search_prior_precision,
                                       verify_state_file)
from modules.training.checkpoints import load_trained_head
from modules.training.models import FINAL_LAYER_NAME

if TYPE_CHECKING:
    from laplace.baselaplace import ParametricLaplace
    from laplace.curvature.curvature import CurvatureInterface

# All three backends give the same curvature; they differ in speed (benchmarks/bench_laplace.py).
# The class names in ``laplace.curvature`` (``laplace_torch``).
LAPLACE_BACKENDS: dict[str, str] = {
    "backpack": "BackPackGGN",
    "asdl": "AsdlGGN",
    "curvlinops": "CurvlinopsGGN",
}
DEFAULT_BACKEND = "backpack"
DEFAULT_PIXELS_PER_CHUNK = 65536

# The name of the Linear inside the ``nn.Sequential`` handed to laplace-torch. Passing it explicitly
# stops ``fit`` from storing the first training batch in ``state_dict()['data']``.
LAST_LAYER_NAME = "0"
LAPLACE_LIKELIHOOD = "classification"
LAPLACE_SUBSET_OF_WEIGHTS = "last_layer"
LAPLACE_HESSIAN_STRUCTURE = "diag"


def ggn_diagonal_closed_form(
    features: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bernoulli GGN diagonal of a linear logit ``z = w . phi + b`` summed over pixels.

    features: ``N x C`` per-pixel features ``phi``; logits: ``N`` logits ``z`` at the MAP.
    Returns ``(diag_w: C, diag_b: scalar)`` = ``(sum p (1-p) phi^2, sum p (1-p))`` with ``p = sigmoid(z)``.
    """
    curvature = torch.sigmoid(logits) * torch.sigmoid(-logits)
    return curvature @ features.square(), curvature.sum()


class HeadInputs(NamedTuple):
    """Inputs of the prompt-aware head: ``x: B x 3 x H x W`` and, if the head uses it, the cached
    image embedding ``B x E x h x w``."""

    x: torch.Tensor
    image_embedding: torch.Tensor | None = None


def check_target_layer(name: str) -> None:
    """``laplace.target_layer`` must name the head's final layer, the only one this target supports."""
    if name != FINAL_LAYER_NAME:
        raise LaplacePosteriorError(f"laplace.target_layer: {name!r} is not the head's final layer {FINAL_LAYER_NAME!r}")


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


def laplace_torch() -> ModuleType:
    """The ``laplace`` package (laplace-torch), imported on first use: importing it, and torchmetrics
    with it, costs seconds that the processes which build no posterior need not pay. Its import logs
    which optional curvature backends are missing, at INFO on the root logger; nobody here can act on
    that, so those lines are held back."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        import laplace
        import laplace.curvature
    finally:
        root.setLevel(level)
    return laplace


def resolve_backend(name: str) -> type[CurvatureInterface]:
    """The laplace-torch curvature backend class registered under ``name``."""
    if name not in LAPLACE_BACKENDS:
        raise LaplacePosteriorError(
            f"laplace.backend: unknown backend {name!r}; choose one of {sorted(LAPLACE_BACKENDS)}"
        )
    return getattr(laplace_torch().curvature, LAPLACE_BACKENDS[name])


def build_head_laplace(
    head: nn.Module, backend: str = DEFAULT_BACKEND, prior_precision: float = 1.0, temperature: float = 1.0
) -> ParametricLaplace:
    """An unfitted last-layer diagonal Laplace (laplace-torch) over the head's final conv as a 2-logit Linear.

    Its inputs are per-pixel features ``N x C`` (``pixels_as_rows(head_pixel_features(...))``).
    ``temperature`` T divides the GGN (posterior precision ``H / T + prior``): the pixels of a
    mask are far from independent observations, and T > 1 stops them from being counted as such.
    """
    last_layer = two_class_last_layer(check_head(head))
    return laplace_torch().Laplace(
        last_layer,
        likelihood=LAPLACE_LIKELIHOOD,
        subset_of_weights=LAPLACE_SUBSET_OF_WEIGHTS,
        hessian_structure=LAPLACE_HESSIAN_STRUCTURE,
        last_layer_name=LAST_LAYER_NAME,
        backend=resolve_backend(backend),
        prior_precision=float(prior_precision),
        temperature=float(temperature),
    )


# --------------------------------------------------------------------------- the laplace-torch fit


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
            targets = binary_targets(target.to(features.device), self.mask_shape, where)
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
    la.fit(TrackedIterable(loader, "laplace fit", "chunks"))
    return la


# --------------------------------------------------------------------------- the posterior


def bernoulli_row(head: nn.Module, la: ParametricLaplace) -> torch.Tensor:
    """Indices ``C + 1`` of row 1 (weights ``[C:2C]``, bias ``[2C+1]``) among laplace-torch's ``2C + 2``
    parameters: the head's Bernoulli logit (``two_class_last_layer``), on ``la.mean``'s device."""
    channels = check_head(head).in_channels
    if la.mean.numel() != 2 * channels + 2:
        raise LaplacePosteriorError(
            f"laplace posterior: {la.mean.numel()} parameters do not fit a head with {channels} channels"
        )
    return torch.cat([torch.arange(channels, 2 * channels), torch.tensor([2 * channels + 1])]).to(la.mean.device)


def head_prior_log_evidence(la: ParametricLaplace, head: nn.Module, temperature: float,
                            prior_precisions: Sequence[float]) -> tuple[float, ...]:
    """``prior_log_evidence`` of the head's Bernoulli logit (row 1 of the fitted ``la``) at ``temperature``."""
    row1 = bernoulli_row(head, la)
    return prior_log_evidence(la.mean[row1], la.H[row1], prior_precisions, temperature)


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
        row1 = bernoulli_row(head, la)
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


# --------------------------------------------------------------------------- prior, artifacts, checks


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
    verify_state_file(path)
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


def load_head_posterior(cfg, run_id: str, device) -> tuple[nn.Module, LastLayerPosterior]:
    """The frozen MAP head of ``run_id`` and its fitted Laplace posterior (for later stages)."""
    check_target_layer(cfg.laplace.target_layer)
    head, checkpoint = load_trained_head(cfg, run_id, device)
    folder = laplace_run_dir(cfg.project_root, "head", run_id)
    meta = read_posterior_meta(folder)
    if meta.source_checkpoint_md5 != cached_file_md5(checkpoint):
        raise LaplacePosteriorError(f"{folder}: fitted on another checkpoint than {checkpoint}; "
                                    "rerun fit_laplace.py --force")
    return head, load_posterior(folder, head, device)


@torch.no_grad()
def head_quality_checks(head: nn.Module, posterior: LastLayerPosterior, val_samples: Sequence[Any],
                        num_samples: int, seed: int, nll_eps: float, batch_size: int = 8,
                        predictive: str = "mc") -> dict:
    """MAP vs Laplace NLL/ECE and the mutual-information margin on MAP errors (validation split);
    ``predictive``: ``laplace.predictive``."""
    quality = PosteriorQualityAccumulator(nll_eps)
    for batch_index, (inputs, targets) in enumerate(iterate_in_batches(val_samples, batch_size)):
        x = inputs.x if isinstance(inputs, HeadInputs) else inputs
        embedding = inputs.image_embedding if isinstance(inputs, HeadInputs) else None
        device = posterior.device
        x, targets = x.to(device), targets.to(device)
        embedding = None if embedding is None else embedding.to(device)
        map_prob = torch.sigmoid(head(x, embedding))[:, 0]
        head_inputs = x if embedding is None else HeadInputs(x, embedding)
        maps = posterior.maps(head_inputs, predictive, num_samples, seed=seed + batch_index)
        quality.update(map_prob, maps, targets)
    return quality.compute()
