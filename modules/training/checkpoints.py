"""The trainable models built from the config, and the trained ones loaded back from their run folders.

Stage 5 writes ``checkpoints/<model>/run_<id>/`` (``core.paths.checkpoint_run_dir``); later stages
load the frozen models through the functions here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from modules.core.config import PipelineConfig
from modules.core.errors import PipelineError
from modules.core.paths import checkpoint_run_dir
from modules.core.stage import RESOLVED_CONFIG_FILE, read_yaml_safe
from modules.training.models import PromptAwareHead, UncertaintyFusion, VarianceNetwork
from modules.training.run_state import BEST_FILE, STATE_FILE, load_checkpoint_file


def has_run(folder: Path) -> bool:
    """Whether a training run committed at least one epoch in ``folder``."""
    return (Path(folder) / STATE_FILE).is_file()


def build_head(cfg: PipelineConfig) -> PromptAwareHead:
    return PromptAwareHead(channels_in=cfg.head.channels_in, hidden_channels=cfg.head.hidden_channels,
                           use_image_embedding=cfg.head.use_image_embedding, residual=cfg.head.residual)


def build_variance_network(cfg: PipelineConfig) -> VarianceNetwork:
    return VarianceNetwork(channels_in=cfg.head.channels_in + 1, hidden_channels=cfg.variance.hidden_channels,
                           log_var_clamp=(cfg.variance.log_var_min, cfg.variance.log_var_max))


def build_fusion(cfg: PipelineConfig, embed_dim: int = 256) -> UncertaintyFusion:
    return UncertaintyFusion(embed_dim=embed_dim, hidden_channels=cfg.fusion.hidden_channels)


def load_trained(cfg: PipelineConfig, model_kind: str, build: Callable[[PipelineConfig], nn.Module], run_id: str,
                 device: torch.device | str = "cpu", which: str = BEST_FILE) -> tuple[nn.Module, Path]:
    """``build(cfg)`` with the weights of ``checkpoints/<model_kind>/run_<run_id>/<which>``, frozen, and that path."""
    path = checkpoint_run_dir(cfg.project_root, model_kind, run_id) / which
    if not path.is_file():
        raise PipelineError(f"{path}: no trained {model_kind} model; run train_head.py --model {model_kind} "
                            f"--run_id {run_id} first")
    model = build(cfg)
    try:
        model.load_state_dict(load_checkpoint_file(path))
    except RuntimeError as error:  # missing / unexpected keys or size mismatches
        raise PipelineError(f"{path}: does not fit the {model_kind} the config describes (trained with other "
                            f"head.* / {model_kind}.* settings?): {str(error).splitlines()[0]}; retrain it "
                            f"(train_head.py --model {model_kind} --force) or restore those settings") from None
    return model.to(device).eval().requires_grad_(False), path


def load_trained_head(cfg: PipelineConfig, run_id: str, device: torch.device | str = "cpu",
                      which: str = BEST_FILE) -> tuple[PromptAwareHead, Path]:
    """The MAP head of ``checkpoints/head/run_<run_id>/<which>``, frozen, and its checkpoint path."""
    return load_trained(cfg, "head", build_head, run_id, device, which)


def load_trained_variance_network(cfg: PipelineConfig, run_id: str, device="cpu") -> VarianceNetwork:
    """The variance network of ``checkpoints/variance/run_<run_id>``, frozen. Its output means what
    its training loss made it mean (``uncertainty.strategies.VARIANCE_READOUTS``), so a run whose
    ``config.resolved.yaml`` records another ``variance.loss`` than ``cfg`` is a one-line error
    (a run without that file is not checked)."""
    network, path = load_trained(cfg, "variance", build_variance_network, run_id, device)
    recorded = read_yaml_safe(path.parent / RESOLVED_CONFIG_FILE)
    loss = (recorded.get("variance") or {}).get("loss") if isinstance(recorded, dict) else None
    if loss is not None and loss != cfg.variance.loss:
        raise PipelineError(f"{path.parent / RESOLVED_CONFIG_FILE}: the variance network was trained with "
                            f"variance.loss={loss} but this config has variance.loss={cfg.variance.loss}; set it "
                            f"back (--set variance.loss={loss}) or retrain (train_head.py --model variance --force)")
    return network


def load_trained_fusion(cfg: PipelineConfig, run_id: str, device="cpu") -> UncertaintyFusion:
    """The trained dense embedding fusion module of ``checkpoints/fusion/run_<run_id>``, frozen."""
    return load_trained(cfg, "fusion", build_fusion, run_id, device)[0]
