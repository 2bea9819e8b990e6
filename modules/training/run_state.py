"""What a training run folder holds, and how an epoch is committed to it crash-safely.

After every epoch the run folder receives ``last.pt``, ``best.pt`` (when the selection metric
improved), the optimizer, scaler and scheduler states and, last, ``epoch_state.json``. The ``.pt``
files are first written into ``.pending_epoch_NNNN/``; writing ``epoch_state.json`` (atomic rename)
is the commit point, after which the pending files are renamed over the published ones. A run
killed before the commit resumes from the previous epoch (the pending folder is discarded); one
killed after it rolls the pending files forward. ``epoch_state.json`` also carries every rank's
RNG states, JSON-safe. Every ``.pt`` file loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import base64
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from modules.core.errors import PipelineError
from modules.core.fileio import atomic_path, atomic_write_json, read_json, remove_file, remove_tree
from modules.sam.base import BackboneError
from modules.sam.registry import verify_checkpoint_archive

STATE_FILE = "epoch_state.json"
MODEL_FILE = "last.pt"
BEST_FILE = "best.pt"
OPTIMIZER_FILE = "optimizer_last.pt"
SCALER_FILE = "scaler_last.pt"
SCHEDULER_FILE = "scheduler_last.pt"
ALWAYS_SAVED_FILES = (MODEL_FILE, OPTIMIZER_FILE, SCALER_FILE, SCHEDULER_FILE)
PENDING_DIR_PATTERN = re.compile(r"^\.pending_epoch_(\d+)$")
STATE_FORMAT_VERSION = 1


class TrainingError(PipelineError):
    """A training run cannot start or continue (one line naming the culprit)."""


class ResumeError(TrainingError):
    """A run folder cannot be resumed: missing, corrupt or started with other settings."""


# --------------------------------------------------------------------------- RNG state (JSON-safe)


def _b64_tensor(values: torch.Tensor) -> str:
    return base64.b64encode(values.cpu().numpy().tobytes()).decode("ascii")


def _tensor_from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy and torch (CPU, and every CUDA device when ``device`` is CUDA) RNG states as JSON."""
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state = {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, base64.b64encode(np.asarray(np_keys, dtype=np.uint32).tobytes()).decode("ascii"),
                  int(np_pos), int(np_has_gauss), float(np_cached)],
        "torch_cpu": _b64_tensor(torch.get_rng_state()),
        "torch_cuda": None,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        state["torch_cuda"] = [_b64_tensor(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]
    keys = np.frombuffer(base64.b64decode(np_keys), dtype=np.uint32).copy()
    np.random.set_state((np_name, keys, np_pos, np_has_gauss, np_cached))
    torch.set_rng_state(_tensor_from_b64(state["torch_cpu"]))
    cuda_states = state.get("torch_cuda")
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_tensor_from_b64(s) for s in cuda_states])


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- checkpoint files


def save_tensors(obj: Any, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically. Through a file object, so the archive's inner
    folder is torch's fixed ``archive`` rather than the temp file's random name: the same tensors
    give the same bytes (and md5) however many times, or after however many interruptions, they
    are written."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def verify_checkpoint_file(path: Path) -> None:
    """A ``ResumeError`` naming ``path`` when a member of the zip archive fails its CRC-32: ``torch.load``
    does not check them, and would load flipped bytes as wrong weights."""
    try:
        verify_checkpoint_archive(path)
    except BackboneError as error:
        raise ResumeError(f"{error}".split(";")[0] + "; retrain the run (train_head.py --force) or restore "
                          "the file from a backup") from None


def load_checkpoint_file(path: Path) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU after the archive's CRC check; a missing,
    damaged or unreadable file is a ``ResumeError``."""
    if not path.is_file():
        raise ResumeError(f"{path}: missing; cannot resume")
    verify_checkpoint_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file
        raise ResumeError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}


def _pending_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / f".pending_epoch_{epoch:04d}"


def recover_run_dir(run_dir: Path) -> dict[str, Any]:
    """Finish or discard an interrupted checkpoint write; return the committed ``epoch_state.json``.

    Pending files of the committed epoch are renamed into place (the write died after the commit);
    pending folders of later epochs are deleted (it died before); stray temp files are removed.
    """
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise ResumeError(f"{state_path}: missing; cannot resume (start without resume)")
    try:
        state = read_json(state_path)
        committed_epoch = int(state["epoch"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ResumeError(f"{state_path}: corrupt training state ({exc})") from None
    for entry in sorted(run_dir.iterdir()):
        match = PENDING_DIR_PATTERN.match(entry.name)
        if match and entry.is_dir():
            if int(match.group(1)) == committed_epoch:
                _publish_pending(entry, run_dir)
            else:
                remove_tree(entry, run_dir)
        elif entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            remove_file(entry, run_dir)
    # A finished run that is resumed loads none of its files: check them all here, so damage to
    # best.pt is reported by a rerun of its own stage, not first by the stages that load it.
    for name in (*ALWAYS_SAVED_FILES, BEST_FILE):
        if (run_dir / name).is_file():
            verify_checkpoint_file(run_dir / name)
    return state


def _publish_pending(pending: Path, run_dir: Path) -> None:
    for staged in sorted(pending.iterdir()):
        if staged.name.endswith(".tmp"):
            remove_file(staged, pending)
        else:
            os.replace(staged, run_dir / staged.name)
    pending.rmdir()



def commit_epoch(run_dir: Path, state: dict[str, Any], files: list[tuple[str, Any]],
                 hook: Callable[[str, int], None]) -> None:
    """Stage ``files`` (``(name, tensors)``) in the epoch's pending folder, commit ``state`` as
    ``epoch_state.json``, then publish the staged files. ``hook(event, epoch)`` runs after each step
    (``"staged:<file>"``, ``"committed"``, ``"published"``)."""
    epoch = state["epoch"]
    pending = _pending_dir(run_dir, epoch)
    remove_tree(pending, run_dir)
    pending.mkdir(parents=True)
    for name, obj in files:
        save_tensors(obj, pending / name)
        hook(f"staged:{name}", epoch)
    atomic_write_json(run_dir / STATE_FILE, state)
    hook("committed", epoch)
    _publish_pending(pending, run_dir)
    hook("published", epoch)
