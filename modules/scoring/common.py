"""What every metric shares: input checks, the hard-prediction threshold, per-pixel errors, and the
state handling of the streaming accumulators.

Conventions: ``p`` is a foreground probability in [0, 1], ``y`` a bool ground truth and ``u`` an
uncertainty map (higher = more uncertain), all of one shape and on one device; the hard prediction is
``p > PROB_THRESHOLD``; sums are taken in float64; undefined values are ``float("nan")``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

#: The hard prediction is ``p > PROB_THRESHOLD``; the error map ``(p > PROB_THRESHOLD) != y``.
PROB_THRESHOLD = 0.5


class MetricInputError(ValueError):
    """Malformed metric input (shape, dtype, device or value range)."""


def absolute_error(p: Tensor, y: Tensor) -> Tensor:
    """Per-pixel ``|y - p|`` (float64, shape of ``p``); its mean is the MAE."""
    return (y.to(torch.float64) - p).abs()


def squared_error(p: Tensor, y: Tensor) -> Tensor:
    """Per-pixel ``(y - p)^2`` (float64, shape of ``p``); its mean is the Brier score."""
    return (y.to(torch.float64) - p).square()


#: The pixel error of correlation and sparsification, by name (``absolute`` by default).
PIXEL_ERRORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "absolute": absolute_error,
    "squared": squared_error,
}


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def as_probabilities(p: Tensor, name: str = "p") -> Tensor:
    """Check ``p`` is a non-empty floating tensor in [0, 1]; return it detached as float64."""
    if not torch.is_tensor(p):
        raise MetricInputError(f"{name}: expected a torch tensor, got {type(p).__name__}")
    if not p.is_floating_point():
        raise MetricInputError(f"{name}: expected a floating tensor of probabilities, got {p.dtype}")
    if p.numel() == 0:
        raise MetricInputError(f"{name}: empty tensor")
    p = p.detach().to(torch.float64)
    if not bool(((p >= 0) & (p <= 1)).all()):  # NaN fails both comparisons
        raise MetricInputError(
            f"{name}: probabilities must lie in [0, 1] without NaN "
            f"(min {p.nan_to_num(nan=-1.0).min().item():.4g}, max {p.max().item():.4g})"
        )
    return p


def as_scores(u: Tensor, like: Tensor, name: str = "u") -> Tensor:
    """Check ``u`` is a finite floating tensor shaped like ``like``; return it as float64."""
    if not torch.is_tensor(u):
        raise MetricInputError(f"{name}: expected a torch tensor, got {type(u).__name__}")
    if not u.is_floating_point():
        raise MetricInputError(f"{name}: expected a floating tensor, got {u.dtype}")
    _check_same_layout(u, like, name)
    u = u.detach().to(torch.float64)
    if not bool(torch.isfinite(u).all()):
        raise MetricInputError(f"{name}: contains NaN or infinite values")
    return u


def as_mask(y: Tensor, like: Tensor, name: str = "y") -> Tensor:
    """Check ``y`` is a binary mask shaped like ``like``; return it as a bool tensor."""
    if not torch.is_tensor(y):
        raise MetricInputError(f"{name}: expected a torch tensor, got {type(y).__name__}")
    _check_same_layout(y, like, name)
    if y.dtype == torch.bool:
        return y.detach()
    if not bool(((y == 0) | (y == 1)).all()):
        raise MetricInputError(f"{name}: mask must be bool or contain only 0 and 1 (dtype {y.dtype})")
    return y.detach() != 0


def _check_same_layout(x: Tensor, like: Tensor, name: str) -> None:
    if x.shape != like.shape:
        raise MetricInputError(f"{name}: shape {tuple(x.shape)} does not match {tuple(like.shape)}")
    if x.device != like.device:
        raise MetricInputError(f"{name}: on {x.device}, expected {like.device}")


def as_vector(x: Tensor, name: str) -> Tensor:
    if not torch.is_tensor(x):
        raise MetricInputError(f"{name}: expected a torch tensor, got {type(x).__name__}")
    x = x.detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise MetricInputError(f"{name}: contains NaN or infinite values")
    return x


def safe_ratio(numerator: float, denominator: float, if_empty: float) -> float:
    return numerator / denominator if denominator > 0 else if_empty


# --------------------------------------------------------------------------------------------
# Streaming state
# --------------------------------------------------------------------------------------------


class StreamingState:
    """The state of a streaming accumulator: tensors allocated on the device of the first update.

    Subclasses set ``self._device = None`` in ``__init__`` and name their state tensors, with shape
    and dtype, in ``_state_layout``; ``state_dict`` / ``load_state_dict`` save and restore exactly
    those tensors (keys are the attribute names).
    """

    _device: torch.device | None

    def _state_layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        raise NotImplementedError

    def _bind_device(self, tensor: Tensor) -> bool:
        """On the first call allocate the zeroed state on ``tensor``'s device and return True;
        reject tensors on another device later."""
        if self._device is None:
            self._device = tensor.device
            for name, (shape, dtype) in self._state_layout().items():
                setattr(self, name, torch.zeros(shape, dtype=dtype, device=tensor.device))
            return True
        if tensor.device != self._device:
            raise MetricInputError(
                f"{type(self).__name__}: got a tensor on {tensor.device}, state is on {self._device}"
            )
        return False

    def state_dict(self) -> dict[str, Tensor]:
        """``name -> tensor`` of the accumulated state (the live tensors); empty before any update."""
        if self._device is None:
            return {}
        return {name: getattr(self, name) for name in self._state_layout()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore a ``state_dict`` (copied; the state then lives on the tensors' device). An empty
        dict resets the accumulator to its state before any update."""
        if not state:
            self._device = None
            return
        layout = self._state_layout()
        if set(state) != set(layout):
            raise MetricInputError(f"{type(self).__name__}: state holds {sorted(state)}, expected {sorted(layout)}")
        devices = {value.device for value in state.values()}
        if len(devices) != 1:
            raise MetricInputError(f"{type(self).__name__}: state tensors on several devices {sorted(map(str, devices))}")
        for name, (shape, dtype) in layout.items():
            value = state[name]
            if tuple(value.shape) != tuple(shape) or value.dtype != dtype:
                raise MetricInputError(f"{type(self).__name__}: {name} is {tuple(value.shape)} {value.dtype}, "
                                       f"expected {tuple(shape)} {dtype} for these settings")
        for name in layout:
            setattr(self, name, state[name].detach().clone())
        # the device as tensors report it ("cuda:0", not "cuda"), which later updates are compared with
        self._device = devices.pop()
