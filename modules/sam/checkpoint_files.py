"""What ``sam.checkpoint`` points at, read into one state dict: the formats users hold SAM weights in.

- ``torch``: an official release (``sam_vit_h_4b8939.pth``, ``sam2.1_hiera_large.pt``) or any
  file ``torch.save`` wrote: a state dict or ``{"model": state_dict}``.
- ``safetensors``: a ``.safetensors`` file (official key names or Hugging Face ones).
- ``hf_folder``: a local Hugging Face model folder (``save_pretrained`` / ``hf download``):
  ``config.json`` plus ``model.safetensors``, sharded ``model-0000x-of-0000y.safetensors`` with
  their index, or a legacy ``pytorch_model.bin``.

A path that does not exist but reads like a hub id (``facebook/sam-vit-huge``) is a one-line
error saying how to download it: nothing is fetched at run time. Which model the weights are
(``modules/sam/hf_weights.py`` maps Hugging Face names onto the official ones) is decided from
the tensors, not from the file name.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from modules.core.errors import error_line
from modules.sam.base import BackboneError

#: File names of the official releases and the Hugging Face model names, per (family, model_type);
#: the README walkthrough lists the same.
OFFICIAL_RELEASES: dict[tuple[str, str], tuple[str, str]] = {
    ("sam", "vit_b"): ("sam_vit_b_01ec64.pth", "facebook/sam-vit-base"),
    ("sam", "vit_l"): ("sam_vit_l_0b3195.pth", "facebook/sam-vit-large"),
    ("sam", "vit_h"): ("sam_vit_h_4b8939.pth", "facebook/sam-vit-huge"),
    ("sam2", "hiera_t"): ("sam2.1_hiera_tiny.pt", "facebook/sam2.1-hiera-tiny"),
    ("sam2", "hiera_s"): ("sam2.1_hiera_small.pt", "facebook/sam2.1-hiera-small"),
    ("sam2", "hiera_b+"): ("sam2.1_hiera_base_plus.pt", "facebook/sam2.1-hiera-base-plus"),
    ("sam2", "hiera_l"): ("sam2.1_hiera_large.pt", "facebook/sam2.1-hiera-large"),
}

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_HF_INDEX_FILE = "model.safetensors.index.json"
#: ``org/name`` as the hub spells model ids (no file suffix).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ZIP_MAGIC, _PICKLE_MAGIC = b"PK", b"\x80"


@dataclass(frozen=True)
class CheckpointFiles:
    """The files behind one ``sam.checkpoint``.

    - ``path``: the configured path (a file or a Hugging Face model folder).
    - ``format``: ``"torch"``, ``"safetensors"`` or ``"hf_folder"``.
    - ``weights``: the weight files to read, in order (one, or the shards of a folder).
    - ``hf_config``: the folder's ``config.json`` as a dict (``None`` for a single file).
    """

    path: Path
    format: str
    weights: tuple[Path, ...]
    hf_config: dict | None = None

    @property
    def hf_model_type(self) -> str | None:
        """``config.json``'s ``model_type`` (``"sam"``, ``"sam2"``, ``"sam3_tracker"``, ...)."""
        return None if self.hf_config is None else self.hf_config.get("model_type")


def hub_download_hint(text: str) -> str:
    """How to fetch a hub model once and point ``sam.checkpoint`` at it."""
    folder = "checkpoints/" + text.split("/")[-1]
    return (f"download it once with `hf download {text} --local-dir {folder}` (huggingface_hub's CLI) "
            f"and set sam.checkpoint: {folder}")


def _looks_like_hub_id(path: Path) -> str | None:
    """``org/name`` when the last two parts of a missing ``path`` read like a hub model id."""
    candidate = "/".join(path.parts[-2:])
    if path.suffix.lower() in {".pt", ".pth", ".bin", ".safetensors", ".ckpt"} or not _HUB_ID.match(candidate):
        return None
    return candidate


def locate_checkpoint(checkpoint: str | os.PathLike) -> CheckpointFiles:
    """Which format ``checkpoint`` is in and which files hold its weights (reads only ``config.json``).

    Raises:
        BackboneError: one line naming ``sam.checkpoint``: missing path (with the download
            command when it reads like a hub id), a folder without ``config.json`` or weights.
    """
    path = Path(checkpoint)
    if path.is_dir():
        return _locate_hf_folder(path)
    if not path.is_file():
        hub_id = _looks_like_hub_id(path)
        if hub_id is not None:
            raise BackboneError(f"sam.checkpoint: {path}: not found; if you mean the Hugging Face model {hub_id!r}, "
                                f"nothing is downloaded at run time: {hub_download_hint(hub_id)}")
        raise BackboneError(f"sam.checkpoint: {path}: checkpoint file not found")
    fmt = "safetensors" if path.suffix.lower() == ".safetensors" else "torch"
    return CheckpointFiles(path, fmt, (path,))


def _locate_hf_folder(folder: Path) -> CheckpointFiles:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BackboneError(f"sam.checkpoint: {folder}: a folder, but no config.json in it (a Hugging Face model "
                            "folder holds config.json and model.safetensors; or point at the checkpoint file)")
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BackboneError(f"sam.checkpoint: {config_path}: unreadable config.json ({error_line(error)})") from None
    if not isinstance(hf_config, dict):
        raise BackboneError(f"sam.checkpoint: {config_path}: config.json is not a JSON object")
    index_path = folder / _HF_INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            shards = tuple(folder / name for name in sorted(set(weight_map.values())))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise BackboneError(f"sam.checkpoint: {index_path}: unreadable shard index ({error_line(error)})") from None
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise BackboneError(f"sam.checkpoint: {folder}: shard {missing[0]} named in {_HF_INDEX_FILE} is missing")
        return CheckpointFiles(folder, "hf_folder", shards, hf_config)
    for name in _HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return CheckpointFiles(folder, "hf_folder", (folder / name,), hf_config)
    raise BackboneError(f"sam.checkpoint: {folder}: Hugging Face model folder without weights "
                        f"(expected {' or '.join(_HF_WEIGHT_FILES)} or {_HF_INDEX_FILE})")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise BackboneError(f"sam.checkpoint: {path}: cannot read safetensors file ({error_line(error)})") from None


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


def _check_torch_file_kind(path: Path) -> None:
    """One line for a file that cannot be a ``torch.save`` file at all (torch's own message for
    these talks about ``weights_only`` or miniz internals)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        raise BackboneError(f"sam.checkpoint: {path}: truncated checkpoint (its zip archive has no central "
                            "directory); download or copy it again")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise BackboneError(f"sam.checkpoint: {path}: not a PyTorch checkpoint (neither a torch.save zip archive "
                            "nor a legacy pickle) and not named .safetensors")


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    _check_torch_file_kind(path)
    verify_checkpoint_archive(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt / non-tensor files
        raise BackboneError(f"sam.checkpoint: {path}: cannot read checkpoint: {error_line(error)}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    return loaded


def read_state_dict(files: CheckpointFiles) -> dict[str, torch.Tensor]:
    """All tensors of ``files`` as one flat state dict on the CPU (key names as stored)."""
    state_dict: dict = {}
    for weights in files.weights:
        part = _read_safetensors(weights) if weights.suffix == ".safetensors" else _read_torch(weights)
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise BackboneError(f"sam.checkpoint: {weights}: not a state dict (expected a dict of tensors or "
                                "{'model': state_dict})")
        state_dict.update(part)
    return state_dict
