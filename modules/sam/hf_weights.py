"""Hugging Face ``transformers`` SAM weights mapped onto the official architectures, and which
registered model a state dict holds.

``SamModel`` (``facebook/sam-vit-*``) is the ``segment_anything`` ``Sam`` and ``Sam2Model``
(``facebook/sam2.1-hiera-*``) the image part of ``sam2``'s ``SAM2Base`` with their modules
renamed, so their weights load into the official modules and every stage runs one decoder
code path. ``Sam3TrackerModel``'s prompt encoder and mask decoder are SAM 2's, mapped the same
way; its ViT stays ``transformers``' (``modules/sam/sam3.py``). The renames are the module names of both libraries (no conversion script copied);
``tests/test_hf_checkpoints.py`` checks them by comparing the two libraries' forward outputs
on the same random weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from modules.sam.base import BackboneError

#: ``config.json`` ``model_type`` -> the project's family. ``facebook/sam3`` holds the detector
#: and the tracker in one file; the tracker's weights are taken from it (``_SAM3_LAYOUT``).
HF_MODEL_TYPES = {"sam": "sam", "sam2": "sam2", "sam3_tracker": "sam3", "sam3_tracker_video": "sam3",
                  "sam3_video": "sam3", "sam3": "sam3"}
#: Hugging Face SAM models not supported, with what to do instead.
HF_UNSUPPORTED = {
    "sam2_video": "Sam2VideoModel: save the image model (Sam2Model) or use the official sam2.1_hiera_*.pt",
    "sam_hq": "SAM-HQ is a different decoder and is not supported",
}

#: Parts of ``SAM2Base`` only the video predictor uses; an HF image model (``Sam2Model``) has
#: no weights for them, so they are filled with zeros.
SAM2_VIDEO_ONLY_PREFIXES = ("memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_pos_enc",
                            "no_obj_ptr", "no_obj_embed_spatial", "obj_ptr_proj.", "obj_ptr_tpos_proj.",
                            "mask_downsample.")


_HF_PREFIXES = ("vision_encoder.", "tracker_model.", "detector_model.")


def is_hf_state_dict(state_dict: dict) -> bool:
    """Whether the key names are ``transformers``' (``vision_encoder.`` instead of ``image_encoder.``,
    or SAM 3's ``tracker_model.`` / ``detector_model.`` file layout)."""
    return any(key.startswith(_HF_PREFIXES) for key in state_dict)


def hf_family(state_dict: dict, hf_model_type: str | None, where: str) -> str:
    """The family of HF weights: from ``config.json``'s ``model_type`` when given, else the keys."""
    if hf_model_type is not None:
        if hf_model_type in HF_UNSUPPORTED:
            raise BackboneError(f"sam.checkpoint: {where}: config.json model_type {hf_model_type!r}: "
                                f"{HF_UNSUPPORTED[hf_model_type]}")
        if hf_model_type not in HF_MODEL_TYPES:
            raise BackboneError(f"sam.checkpoint: {where}: config.json model_type {hf_model_type!r} is not a SAM "
                                f"model (supported: {sorted(HF_MODEL_TYPES)})")
        return HF_MODEL_TYPES[hf_model_type]
    if any(key.startswith("vision_encoder.backbone.blocks.") for key in state_dict):
        return "sam2"
    if any(key.startswith("vision_encoder.layers.") for key in state_dict):
        return "sam"
    if any(key.startswith(("vision_encoder.backbone.layers.", "tracker_model.")) for key in state_dict):
        return "sam3"
    raise BackboneError(f"sam.checkpoint: {where}: Hugging Face weights of an unknown model "
                        "(neither SamModel nor Sam2Model key names)")


# ----------------------------------------------------------------------------------------------
# Key renames
# ----------------------------------------------------------------------------------------------

#: (pattern, replacement) applied in order to every key; prefixes first, then module names.
_COMMON_RENAMES = (
    (r"^(.*mask_decoder\.transformer\..*)\.o_proj\.", r"\1.out_proj."),
    (r"^(.*prompt_encoder)\.mask_embed\.conv1\.", r"\1.mask_downscaling.0."),
    (r"^(.*prompt_encoder)\.mask_embed\.layer_norm1\.", r"\1.mask_downscaling.1."),
    (r"^(.*prompt_encoder)\.mask_embed\.conv2\.", r"\1.mask_downscaling.3."),
    (r"^(.*prompt_encoder)\.mask_embed\.layer_norm2\.", r"\1.mask_downscaling.4."),
    (r"^(.*prompt_encoder)\.mask_embed\.conv3\.", r"\1.mask_downscaling.6."),
    (r"^(.*prompt_encoder)\.point_embed\.(\d+)\.", r"\1.point_embeddings.\2."),
    (r"^(.*mask_decoder)\.upscale_conv1\.", r"\1.output_upscaling.0."),
    (r"^(.*mask_decoder)\.upscale_layer_norm\.", r"\1.output_upscaling.1."),
    (r"^(.*mask_decoder)\.upscale_conv2\.", r"\1.output_upscaling.3."),
    (r"^(.*mask_decoder\.transformer\.layers\.\d+)\.layer_norm(\d)\.", r"\1.norm\2."),
    (r"^(.*mask_decoder\.transformer)\.layer_norm_final_attn\.", r"\1.norm_final_attn."),
)
_SAM_RENAMES = (
    (r"^vision_encoder\.", "image_encoder."),
    (r"^image_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
    (r"^image_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"image_encoder.blocks.\1.norm\2."),
    (r"^image_encoder\.layers\.", "image_encoder.blocks."),
    (r"^image_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
    (r"^image_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
    (r"^image_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
    (r"^image_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
    *_COMMON_RENAMES,
)
_SAM2_RENAMES = (
    (r"^vision_encoder\.backbone\.", "image_encoder.trunk."),
    (r"^vision_encoder\.neck\.convs\.(\d+)\.", r"image_encoder.neck.convs.\1.conv."),
    (r"^image_encoder\.trunk\.patch_embed\.projection\.", "image_encoder.trunk.patch_embed.proj."),
    (r"^image_encoder\.trunk\.blocks\.(\d+)\.layer_norm(\d)\.", r"image_encoder.trunk.blocks.\1.norm\2."),
    (r"^prompt_encoder\.", "sam_prompt_encoder."),
    (r"^mask_decoder\.", "sam_mask_decoder."),
    (r"^no_memory_embedding$", "no_mem_embed"),
    *_COMMON_RENAMES,
)
#: SAM 3's tracker: its ViT stays ``transformers``' module (same names), the rest is SAM 2's.
_SAM3_RENAMES = (
    (r"^prompt_encoder\.", "sam_prompt_encoder."),
    (r"^mask_decoder\.", "sam_mask_decoder."),
    (r"^no_memory_embedding$", "no_mem_embed"),
    *_COMMON_RENAMES,
)
#: SAM 3's file layout (what ``save_pretrained`` writes and ``facebook/sam3`` holds) -> the
#: ``Sam3TrackerModel`` module names, as ``transformers``' own loading renames them.
_SAM3_LAYOUT = ((r"^tracker_model\.", ""), (r"^detector_model\.vision_encoder\.backbone\.", "vision_encoder.backbone."),
                (r"^tracker_neck\.", "vision_encoder.neck."))
#: What ``Sam3TrackerModel`` itself ignores in such a file: the detector and the video memory.
_SAM3_UNUSED = re.compile(r"^(detector_model\.|memory_|mask_downsample|object_pointer_proj|"
                          r"temporal_positional_encoding_projection_layer|no_memory_positional_encoding|"
                          r"no_object_pointer|occlusion_spatial_embedding_parameter)")


def _sam3_tracker_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SAM 3 weights under ``Sam3TrackerModel``'s module names, the detector and video parts dropped."""
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in _SAM3_LAYOUT:
            key = re.sub(pattern, replacement, key)
        if not _SAM3_UNUSED.match(key):
            renamed[key] = tensor
    return renamed


#: The random Fourier matrix of the prompt encoder; HF keeps a tied copy at the top level.
_PE_KEYS = ("shared_image_embedding.positional_embedding", "prompt_encoder.shared_embedding.positional_embedding")
_MLP_PART = re.compile(r"^(.*)\.(proj_in|proj_out|layers\.(\d+))\.(weight|bias)$")


def _rename_mlps(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ``proj_in`` / ``layers.i`` / ``proj_out`` -> the official ``MLP``'s ``layers.0..n-1``.

    Only modules that have a ``proj_in`` are MLPs in this sense (an HF MLP of ``n`` layers holds
    ``proj_in``, ``layers.0 .. n-3`` and ``proj_out``).
    """
    mlps = {m.group(1) for key in state_dict if (m := _MLP_PART.match(key)) and m.group(2) == "proj_in"}
    inner = {prefix: 0 for prefix in mlps}
    for key in state_dict:
        m = _MLP_PART.match(key)
        if m and m.group(1) in mlps and m.group(3) is not None:
            inner[m.group(1)] = max(inner[m.group(1)], int(m.group(3)) + 1)
    renamed = {}
    for key, tensor in state_dict.items():
        m = _MLP_PART.match(key)
        if not (m and m.group(1) in mlps):
            renamed[key] = tensor
            continue
        prefix, part, index, leaf = m.groups()
        position = 0 if part == "proj_in" else inner[prefix] + 1 if part == "proj_out" else int(index) + 1
        renamed[f"{prefix}.layers.{position}.{leaf}"] = tensor
    return renamed


def hf_to_official(state_dict: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """``SamModel`` / ``Sam2Model`` / ``Sam3TrackerModel`` weights under the official ``Sam`` /
    ``SAM2Base`` / ``Sam3TrackerImageModel`` key names.

    SAM 2's video-only modules are absent (see ``SAM2_VIDEO_ONLY_PREFIXES``); SAM 3's
    ``vision_encoder.*`` keys are kept as they are.
    """
    if family == "sam3":
        state_dict = _sam3_tracker_keys(state_dict)
    copies = [state_dict[key] for key in _PE_KEYS if key in state_dict]
    if not copies:
        raise BackboneError(f"Hugging Face {family} weights lack the prompt encoder's positional matrix "
                            f"({_PE_KEYS[0]!r})")
    pe = copies[0]
    # SAM uses one matrix for the image-wide and the prompt positional encoding; a model whose
    # two copies differ (never converted from an official release) has no official equivalent.
    if any(copy.shape != pe.shape or not torch.equal(copy, pe) for copy in copies[1:]):
        raise BackboneError(f"Hugging Face {family} weights: {_PE_KEYS[0]!r} and {_PE_KEYS[1]!r} differ; the official "
                            "architecture has one positional matrix for both")
    rules = {"sam": _SAM_RENAMES, "sam2": _SAM2_RENAMES, "sam3": _SAM3_RENAMES}[family]
    prompt_encoder = "prompt_encoder" if family == "sam" else "sam_prompt_encoder"
    mapped = {}
    for key, tensor in state_dict.items():
        if key in _PE_KEYS:
            continue
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        if key == f"{prompt_encoder}.point_embed.weight":  # SAM 2: the four point embeddings stacked
            for index, row in enumerate(tensor):
                mapped[f"{prompt_encoder}.point_embeddings.{index}.weight"] = row[None].clone()
            continue
        mapped[key] = tensor
    mapped[f"{prompt_encoder}.pe_layer.positional_encoding_gaussian_matrix"] = pe
    return _rename_mlps(mapped)


# ----------------------------------------------------------------------------------------------
# Which registered model a state dict holds
# ----------------------------------------------------------------------------------------------

#: (patch embedding width, number of encoder blocks) -> model_type, per family.
SAM_SIGNATURES = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h", (96, 4): "demo_tiny"}
SAM2_SIGNATURES = {(96, 12): "t", (96, 16): "s", (112, 24): "b+", (144, 48): "l"}
SAM3_SIGNATURES = {(1024, 32): "tracker"}


@dataclass(frozen=True)
class FoundModel:
    """What a state dict holds: ``family`` and the ``model_types`` it loads as (SAM 2 weights
    without the 2.1-only parameter may be 2.0 or 2.1), and the evidence in words."""

    family: str
    model_types: tuple[str, ...]
    evidence: str

    def describe(self) -> str:
        return f"{self.family}/{' or '.join(self.model_types)} ({self.evidence})"


def _block_count(state_dict: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for key in state_dict if (m := pattern.match(key))})


def identify_model(state_dict: dict[str, torch.Tensor], from_hf: bool = False) -> FoundModel | None:
    """The registered model whose architecture a state dict (official key names) matches, from
    its encoder's width and depth; ``None`` when it matches none (the strict load then names the
    keys that differ)."""
    sam_patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if sam_patch is not None:
        width, depth = int(sam_patch.shape[0]), _block_count(state_dict, "image_encoder.blocks.")
        model_type = SAM_SIGNATURES.get((width, depth))
        evidence = f"image_encoder.blocks: width {width}, {depth} blocks"
        return None if model_type is None else FoundModel("sam", (model_type,), evidence)
    hiera_patch = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if hiera_patch is not None:
        width, depth = int(hiera_patch.shape[0]), _block_count(state_dict, "image_encoder.trunk.blocks.")
        size = SAM2_SIGNATURES.get((width, depth))
        if size is None:
            return None
        evidence = f"image_encoder.trunk.blocks: width {width}, {depth} blocks"
        if from_hf:
            return FoundModel("sam2", (f"hiera_{size}", f"sam2.0_hiera_{size}"), evidence + ", Hugging Face")
        if "no_obj_embed_spatial" in state_dict:
            return FoundModel("sam2", (f"hiera_{size}",), evidence + ", SAM 2.1")
        return FoundModel("sam2", (f"sam2.0_hiera_{size}",), evidence + ", SAM 2.0")
    vit_patch = state_dict.get("vision_encoder.backbone.embeddings.patch_embeddings.projection.weight")
    if vit_patch is not None:
        width, depth = int(vit_patch.shape[0]), _block_count(state_dict, "vision_encoder.backbone.layers.")
        model_type = SAM3_SIGNATURES.get((width, depth))
        evidence = f"vision_encoder.backbone.layers: width {width}, {depth} blocks"
        return None if model_type is None else FoundModel("sam3", (model_type,), evidence)
    return None
