"""One device resolver and the precision policy of frozen-model passes (bf16 autocast on CUDA)."""

from __future__ import annotations

import contextlib

import torch

from modules.core.errors import PipelineError


class DeviceError(PipelineError, ValueError):
    """A device that is unknown or not available here."""


def resolve_device(device: str | torch.device, key: str = "device") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cuda"`` fails with one line naming ``key``
    (the config key the value came from) when no GPU is available."""
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"{key}: {device!r} requested but CUDA is not available")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"{key}: unknown device {device!r}; expected 'auto', 'cuda', 'cuda:N' or 'cpu'")


def inference_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing (float32) on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
