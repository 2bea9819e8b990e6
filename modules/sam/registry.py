"""The one registry of SAM backbones and the one way to load them from a checkpoint file.

``BACKBONE_REGISTRY`` maps ``(family, model_type)`` to the builder of the random-init model and
its ``Backbone`` class (as ``segment_anything.build_sam.sam_model_registry``);
``load_backbone`` builds the model, loads a checkpoint strictly and wraps it. The demo model is
loaded exactly like ``vit_b``. ``verify_checkpoint_archive`` (from ``checkpoint_files``) is
re-exported here for the other checkpoint readers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from segment_anything import sam_model_registry
from torch import nn

from modules.core.config import SamConfig
from modules.core.device import enable_tf32, resolve_device
from modules.core.errors import PipelineError
from modules.sam.base import Backbone, BackboneError, checkpoint_md5, resolve_decoder_batch
from modules.sam.checkpoint_files import (OFFICIAL_RELEASES, CheckpointFiles, locate_checkpoint, read_state_dict,
                                          verify_checkpoint_archive)
from modules.sam.demo_tiny import build_demo_tiny
from modules.sam.fast_encoder import EncoderSettings
from modules.sam.hf_weights import (SAM2_VIDEO_ONLY_PREFIXES, FoundModel, hf_family, hf_to_official, identify_model,
                                    is_hf_state_dict)
from modules.sam.sam2 import Sam2Backbone
from modules.sam.sam3 import Sam3Backbone, build_sam3_tracker
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
    ("sam3", "tracker"): (build_sam3_tracker, Sam3Backbone),
}


#: Backbones whose multimask outputs were trained on prompt sets of several prompts as well (the demo
#: model's recipe, ``tools/train_demo_backbone.py``). SAM and SAM 2 were trained to return only
#: their single-mask output once a prompt set holds more than one prompt (SAM 3's interactive
#: predictor follows SAM 2's).
MULTIMASK_TRAINED_ON_SEVERAL_PROMPTS: frozenset[tuple[str, str]] = frozenset({("sam", "demo_tiny")})


__all__ = ["BACKBONE_REGISTRY", "MULTIMASK_TRAINED_ON_SEVERAL_PROMPTS", "build_sam_model", "check_registered",
           "configured_checkpoint_md5", "load_backbone", "load_configured_backbone", "registered_backbones",
           "verify_checkpoint_archive"]


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


def _official_state_dict(files: CheckpointFiles) -> tuple[dict[str, torch.Tensor], FoundModel | None, bool]:
    """The checkpoint's tensors under the official key names, the model they were found to be, and
    whether they came with Hugging Face key names."""
    state_dict = read_state_dict(files)
    from_hf = files.hf_config is not None or is_hf_state_dict(state_dict)
    if from_hf:
        family = hf_family(state_dict, files.hf_model_type, str(files.path))
        try:
            state_dict = hf_to_official(state_dict, family)
        except BackboneError as error:
            raise BackboneError(f"sam.checkpoint: {files.path}: {error}") from None
    return state_dict, identify_model(state_dict, from_hf=from_hf), from_hf


def _check_found_model(found: FoundModel | None, family: str, model_type: str, path: Path) -> None:
    """One line naming both when the checkpoint holds another model than ``sam.family`` / ``sam.model_type``."""
    if found is None or (found.family == family and model_type in found.model_types):
        return
    key = "sam.family" if found.family != family else "sam.model_type"
    release = OFFICIAL_RELEASES.get((family, model_type))
    hint = "" if release is None else f" (the {family}/{model_type} release is {release[0]}, on Hugging Face {release[1]})"
    raise BackboneError(f"{key}: {path} holds {found.describe()}, but the config sets sam.family={family}, "
                        f"sam.model_type={model_type}{hint}")


def _fill_video_only_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Zeros for the SAM 2 video-only parameters a Hugging Face image model does not carry."""
    for key, tensor in model.state_dict().items():
        if key not in state_dict and key.startswith(SAM2_VIDEO_ONLY_PREFIXES):
            state_dict[key] = torch.zeros_like(tensor)


def load_backbone(family: str, model_type: str, checkpoint: str | os.PathLike,
                  device: str | torch.device = "auto", encoder: EncoderSettings | None = None,
                  decoder_batch: str | int = "auto") -> Backbone:
    """Build ``(family, model_type)`` with random init and load ``checkpoint`` strictly.

    ``checkpoint`` may be a ``torch.save`` file (read with ``weights_only=True``: a raw state
    dict or ``{"model": state_dict}``, SAM 2's format), a ``.safetensors`` file or a local
    Hugging Face model folder (``SamModel`` / ``Sam2Model``; see ``checkpoint_files`` and
    ``hf_weights``). Hugging Face key names are mapped onto the official modules; the model the
    weights hold is identified from their shapes and must be ``(family, model_type)``. float16
    tensors are cast by ``load_state_dict``. The model is frozen (eval mode,
    ``requires_grad=False``) and moved to ``device``. ``encoder``: how ``encode`` runs
    (``sam.encoder_impl``, ``sam.compile_encoder``; default ``auto``: the fast impl, compiled, on
    CUDA, the reference impl elsewhere; see ``fast_encoder``). ``decoder_batch``: prompt sets per
    mask-decoder call (``sam.decoder_batch``; ``auto``: ``base.CPU_DECODER_BATCH`` on the CPU, all at once
    elsewhere).

    Raises:
        DeviceError: ``sam.device`` asks for CUDA and none is available (one line naming the key).
        BackboneError: one line naming the config key at fault: ``sam.family`` / ``sam.model_type`` (not
            registered, or not the model the checkpoint holds: both named) or ``sam.checkpoint``
            (missing, unreadable or damaged file, a hub id instead of a folder, or keys or shapes
            that do not match the model type).
        EncoderSettingsError: ``encoder`` holds an unknown impl or compile value (one line naming the key).
    """
    device = resolve_device(device, key="sam.device")
    encoder = EncoderSettings() if encoder is None else encoder
    encoder.resolve(device)  # bad settings fail before the checkpoint is read
    resolve_decoder_batch(decoder_batch, device)
    check_registered(family, model_type)
    try:
        files = locate_checkpoint(checkpoint)
        state_dict, found, from_hf = _official_state_dict(files)
    except BackboneError as error:
        raise BackboneError(f"{error} (model type {family}/{model_type})") from None
    path = files.path
    _check_found_model(found, family, model_type, path)
    model = build_sam_model(family, model_type)
    if family == "sam2" and from_hf:
        _fill_video_only_weights(model, state_dict)
    _check_state_dict(model, state_dict, path, model_type)
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if device.type == "cuda":
        enable_tf32()
    model.to(device)
    _, backbone_class = BACKBONE_REGISTRY[(family, model_type)]
    backbone = backbone_class(model, model_type, path, device)
    backbone.configure_encoder(encoder)
    backbone.configure_decoder(decoder_batch)
    return backbone


def load_configured_backbone(sam: SamConfig, device: str | torch.device | None = None) -> Backbone:
    """``load_backbone`` with the ``sam`` section's model, checkpoint, encoder and decoder settings, on
    ``device`` (default ``sam.device``)."""
    encoder = EncoderSettings(sam.encoder_impl, sam.compile_encoder, sam.encoder_batch_size, sam.encoder_int8)
    return load_backbone(sam.family, sam.model_type, sam.checkpoint, sam.device if device is None else device,
                         encoder=encoder, decoder_batch=sam.decoder_batch)


def configured_checkpoint_md5(checkpoint: str | os.PathLike) -> str:
    """MD5 of the ``sam.checkpoint`` file or model folder (it names the SAM cache); one-line error
    when missing (with the download command for a hub id)."""
    locate_checkpoint(checkpoint)
    try:
        return checkpoint_md5(checkpoint)
    except OSError:
        raise PipelineError(f"sam.checkpoint: file not found: {checkpoint}") from None
