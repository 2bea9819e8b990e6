"""The one registry of SAM backbones and the one way to load them from a checkpoint file.

``BACKBONE_REGISTRY`` maps ``(family, model_type)`` to the builder of the random-init model and
its ``Backbone`` class (as ``segment_anything.build_sam.sam_model_registry``);
``load_backbone`` builds the model, loads a checkpoint strictly and wraps it. The demo model is
loaded exactly like ``vit_b``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable

import torch
from segment_anything import sam_model_registry
from torch import nn

from modules.core.device import enable_tf32, resolve_device
from modules.core.errors import PipelineError, error_line
from modules.sam.base import Backbone, BackboneError, checkpoint_md5
from modules.sam.demo_tiny import build_demo_tiny
from modules.sam.sam2 import Sam2Backbone
from modules.sam.sam_v1 import SamBackbone


def _sam_v1_builder(model_type: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return sam_model_registry[model_type](checkpoint=None)

    return build


def _sam2_builder(config_name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from sam2.build_sam import build_sam2

        return build_sam2(config_name, ckpt_path=None, device="cpu")

    return build


_SAM2_SIZES = ("t", "s", "b+", "l")

#: ``(family, model_type) -> (builder of the random-init nn.Module, Backbone class)``.
BACKBONE_REGISTRY: dict[tuple[str, str], tuple[Callable[[], nn.Module], type[Backbone]]] = {
    ("sam", "vit_b"): (_sam_v1_builder("vit_b"), SamBackbone),
    ("sam", "vit_l"): (_sam_v1_builder("vit_l"), SamBackbone),
    ("sam", "vit_h"): (_sam_v1_builder("vit_h"), SamBackbone),
    ("sam", "demo_tiny"): (build_demo_tiny, SamBackbone),
    **{("sam2", f"hiera_{size}"): (_sam2_builder(f"configs/sam2.1/sam2.1_hiera_{size}.yaml"), Sam2Backbone)
       for size in _SAM2_SIZES},
    **{("sam2", f"sam2.0_hiera_{size}"): (_sam2_builder(f"configs/sam2/sam2_hiera_{size}.yaml"), Sam2Backbone)
       for size in _SAM2_SIZES},
}


def registered_backbones() -> list[tuple[str, str]]:
    """All registered ``(family, model_type)`` keys."""
    return list(BACKBONE_REGISTRY)


def check_registered(family: str, model_type: str) -> None:
    """A one-line ``BackboneError`` naming ``sam.family`` or ``sam.model_type`` unless
    ``(family, model_type)`` is registered (cheap: stages call it before any other work)."""
    if (family, model_type) in BACKBONE_REGISTRY:
        return
    families = sorted({f for f, _ in BACKBONE_REGISTRY})
    if family not in families:
        raise BackboneError(f"sam.family: unknown backbone family {family!r}; valid families: {families}")
    types_ = [t for f, t in BACKBONE_REGISTRY if f == family]
    raise BackboneError(f"sam.model_type: unknown {family} model_type {model_type!r}; valid model types: {types_}")


def build_sam_model(family: str, model_type: str) -> nn.Module:
    """The random-init ``nn.Module`` of a registered backbone (on CPU, float32, train mode)."""
    check_registered(family, model_type)
    builder, _ = BACKBONE_REGISTRY[(family, model_type)]
    return builder()


#: (resolved path, size, mtime_ns) of checkpoint archives whose members passed their CRC.
_VERIFIED_ARCHIVES: set[tuple[str, int, int]] = set()


def verify_checkpoint_archive(path: Path) -> None:
    """Refuse a zip-format checkpoint (what ``torch.save`` writes) with a damaged member.

    ``torch.load`` does not check the members' CRC-32, so flipped bytes in a tensor load as
    wrong weights; ``ZipFile.testzip`` reads every member and checks it. Memoised on (path,
    size, mtime) like ``cached_file_md5``, so a process pays it once per file. Legacy
    (non-zip) checkpoints carry no checksum and are left to ``torch.load``.
    """
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED_ARCHIVES or not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
        raise BackboneError(f"sam.checkpoint: {path}: damaged checkpoint archive ({error_line(error)})") from None
    if bad is not None:
        raise BackboneError(f"sam.checkpoint: {path}: damaged checkpoint (member {bad} fails its CRC); "
                            "download or copy the checkpoint again")
    _VERIFIED_ARCHIVES.add(key)


#: First bytes of what ``torch.save`` writes: a zip archive (torch >= 1.6) or a legacy pickle.
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK", b"\x80"


def _check_checkpoint_kind(path: Path, model_type: str) -> None:
    """One line for a file that cannot be a checkpoint at all (torch's own message for these talks
    about ``weights_only`` or miniz internals)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise BackboneError(f"sam.checkpoint: {path}: truncated checkpoint for model type {model_type!r} (its zip "
                            "archive has no central directory); download or copy it again")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise BackboneError(f"sam.checkpoint: {path}: not a PyTorch checkpoint for model type {model_type!r} "
                            "(neither a torch.save zip archive nor a legacy pickle)")


def _read_state_dict(path: Path, model_type: str) -> dict[str, torch.Tensor]:
    _check_checkpoint_kind(path, model_type)
    verify_checkpoint_archive(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt / non-tensor files
        reason = error_line(error)
        raise BackboneError(f"sam.checkpoint: {path}: cannot read checkpoint for model type {model_type!r}: "
                            f"{reason}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BackboneError(
            f"sam.checkpoint: {path}: not a state dict (expected a dict of tensors or {{'model': state_dict}}) "
            f"for model type {model_type!r}"
        )
    return loaded


def _check_state_dict(model: nn.Module, state_dict: dict, path: Path, model_type: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (first {missing[0]!r})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]!r})")
        raise BackboneError(f"sam.checkpoint: {path}: checkpoint does not match model type {model_type!r}: "
                            f"{', '.join(detail)}")
    for key, tensor in expected.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise BackboneError(
                f"sam.checkpoint: {path}: checkpoint does not match model type {model_type!r}: {key!r} has shape "
                f"{tuple(state_dict[key].shape)}, the model expects {tuple(tensor.shape)}"
            )


def load_backbone(family: str, model_type: str, checkpoint: str | os.PathLike,
                  device: str | torch.device = "auto") -> Backbone:
    """Build ``(family, model_type)`` with random init and load ``checkpoint`` strictly.

    The checkpoint is read with ``torch.load(weights_only=True)`` and may be a raw state dict or
    ``{"model": state_dict}`` (SAM 2's format); float16 tensors are cast by ``load_state_dict``.
    The model is frozen (eval mode, ``requires_grad=False``) and moved to ``device``.

    Raises:
        DeviceError: ``sam.device`` asks for CUDA and none is available (one line naming the key).
        BackboneError: one line naming the config key at fault: ``sam.family`` / ``sam.model_type`` (not registered) or
            ``sam.checkpoint`` (missing, unreadable or damaged file, or keys or shapes that do not
            match the model type).
    """
    device = resolve_device(device, key="sam.device")
    model = build_sam_model(family, model_type)
    path = Path(checkpoint)
    if not path.is_file():
        raise BackboneError(f"sam.checkpoint: {path}: checkpoint file not found (model type {family}/{model_type})")
    state_dict = _read_state_dict(path, model_type)
    _check_state_dict(model, state_dict, path, model_type)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if device.type == "cuda":
        enable_tf32()
    model.to(device)
    _, backbone_class = BACKBONE_REGISTRY[(family, model_type)]
    return backbone_class(model, model_type, path, device)


def configured_checkpoint_md5(checkpoint: str | os.PathLike) -> str:
    """MD5 of the ``sam.checkpoint`` file (it names the SAM cache); one-line error when missing."""
    try:
        return checkpoint_md5(checkpoint)
    except OSError:
        raise PipelineError(f"sam.checkpoint: file not found: {checkpoint}") from None
