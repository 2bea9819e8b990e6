"""Where every artifact lives under the project root: the one home of the folder layout.

Stages and libraries ask this module for a path; none spells a folder name of its own. The
relative folders (``MANIFEST_DIR`` ...) are what the stage runner creates under the project root.

Containment: every id that becomes part of a folder name (run ids, report names: ``check_name``;
cache and sample ids: ``check_component``) is checked by the builder that uses it, so no caller can
build a path that climbs out with ``..`` or ``/``; ``ensure_inside`` refuses a path that resolves
(symlinks and ``..`` followed) outside the project root, and is what the stage runner and every
deleter (``core.fileio.remove_tree`` / ``remove_file``) call before touching the disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from modules.core.errors import PipelineError

MANIFEST_DIR = "manifests"
#: Beside the manifest CSVs: the md5 of each, as stage 1 wrote it (``data.manifest_checksums``).
MANIFEST_CHECKSUMS_FILE = "checksums.json"
#: Beside them too: stage 1's validation results by file size and time (``data.validation_memo``).
VALIDATION_MEMO_FILE = ".validation_memo.json"
PROMPT_SET_DIR = "prompt_sets"
SAM_CACHE_DIR = "sam_cache"
TRAINING_DATA_DIR = "training_data"
CHECKPOINT_DIR = "checkpoints"
LAPLACE_DIR = "laplace"
REPORTS_DIR = "reports"
EVAL_DIR = f"{REPORTS_DIR}/eval"
DEBUG_PANELS_DIR = f"{REPORTS_DIR}/debug_panels"
PREDICTIONS_DIR = "predictions"

#: A stage's record of what its outputs were computed from (see ``core.stage``).
FINGERPRINT_FILE = ".stage.json"

PathLike = str | os.PathLike

#: Run ids and report names: a letter or digit, then letters, digits, ``.``, ``_``, ``-``.
NAME_MAX_CHARS = 100
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class PathError(PipelineError):
    """An id that is not a plain name, or a path outside the project root (one line naming it)."""


def check_name(value: object, key: str) -> str:
    """``value`` if it is a plain name (``[A-Za-z0-9][A-Za-z0-9._-]*``, no ``..``, at most
    ``NAME_MAX_CHARS`` characters), else a ``PathError`` naming ``key`` (the flag or config key)."""
    if (not isinstance(value, str) or len(value) > NAME_MAX_CHARS or ".." in value
            or not _PLAIN_NAME.fullmatch(value)):
        raise PathError(f"{key}: {value!r} is not a plain name (a letter or digit, then letters, digits, "
                        f"'.', '_' or '-'; no '/' or '..'; at most {NAME_MAX_CHARS} characters)")
    return value


def check_component(value: object, key: str) -> str:
    """``value`` if it is one file or folder name (not empty, no ``/``, ``\\`` or NUL, not ``.`` or
    ``..``): the looser rule for generated ids (``sam2-hiera_b+-...``, sanitized sample ids)."""
    if (not isinstance(value, str) or value in ("", ".", "..")
            or any(character in value for character in "/\\\0")):
        raise PathError(f"{key}: {value!r} is not a single file or folder name")
    return value


def ensure_inside(root: PathLike, path: PathLike, key: str = "path") -> Path:
    """``path`` resolved (symlinks and ``..`` followed; it need not exist) when it is ``root`` or lies
    under it (``root`` resolved the same way), else a one-line ``PathError`` naming ``key``."""
    try:
        root_resolved = Path(root).resolve()
        resolved = Path(path).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise PathError(f"{key}: {path} cannot be resolved ({exc})") from None
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise PathError(f"{key}: {path} resolves to {resolved}, outside {root_resolved}")
    return resolved


def manifest_path(project_root: PathLike, name: str) -> Path:
    """Stage 1: ``name`` is ``all_samples``, ``invalid_samples`` or a split."""
    return Path(project_root) / MANIFEST_DIR / f"{name}.csv"


def validation_memo_path(project_root: PathLike) -> Path:
    """Stage 1: what a rerun need not decode again."""
    return Path(project_root) / MANIFEST_DIR / VALIDATION_MEMO_FILE


def promptset_path(project_root: PathLike, split: str, safe_id: str) -> Path:
    """Stage 2: the prompt sets of one sample."""
    return Path(project_root) / PROMPT_SET_DIR / check_component(split, "split") / \
        f"{check_component(safe_id, 'safe_id')}.json"


def cache_dir(project_root: PathLike, backbone_id: str) -> Path:
    """Stage 3: the SAM cache of one exact checkpoint."""
    return Path(project_root) / SAM_CACHE_DIR / check_component(backbone_id, "SAM cache id")


def training_data_dir(project_root: PathLike) -> Path:
    """Stages 4 and 4.5: the index CSVs and packed splits."""
    return Path(project_root) / TRAINING_DATA_DIR


def index_path(project_root: PathLike, split: str) -> Path:
    return training_data_dir(project_root) / f"{split}_index.csv"


def packed_path(project_root: PathLike, split: str) -> Path:
    return training_data_dir(project_root) / f"{split}.h5"


def checkpoint_run_relpath(model_kind: str, run_id: str) -> str:
    """Stage 5, relative to the project root: ``checkpoints/<model>/run_<id>``."""
    return f"{CHECKPOINT_DIR}/{check_name(model_kind, '--model')}/run_{check_name(run_id, 'run id')}"


def checkpoint_run_dir(project_root: PathLike, model_kind: str, run_id: str) -> Path:
    return Path(project_root) / checkpoint_run_relpath(model_kind, run_id)


def checkpoint_run_ids(project_root: PathLike, model_kind: str, marker: str) -> list[str]:
    """The run ids under ``checkpoints/<model>/`` whose ``run_<id>`` folder holds ``marker``, sorted."""
    folder = Path(project_root) / CHECKPOINT_DIR / check_name(model_kind, "--model")
    return sorted(path.parent.name.removeprefix("run_") for path in folder.glob(f"run_*/{marker}"))


def laplace_run_relpath(target: str, run_id: str) -> str:
    """Stage 6, relative to the project root: ``laplace/<target>/run_<id>``."""
    return f"{LAPLACE_DIR}/{check_name(target, 'laplace.target')}/run_{check_name(run_id, 'run id')}"


def laplace_run_dir(project_root: PathLike, target: str, run_id: str) -> Path:
    return Path(project_root) / laplace_run_relpath(target, run_id)


def eval_report_relpath(name: str) -> str:
    """Stage 7, relative to the project root: ``reports/eval/<name>``."""
    return f"{EVAL_DIR}/{check_name(name, 'report name')}"


def eval_report_dir(project_root: PathLike, name: str) -> Path:
    return Path(project_root) / eval_report_relpath(name)


def prediction_relpath(image_stem: str) -> str:
    """``predict_uncertainty.py``, relative to the project root: ``predictions/<image stem>``."""
    return f"{PREDICTIONS_DIR}/{check_component(image_stem, 'image name')}"


#: Stage 7, in the report folder: the click simulation's outputs (``interactive/simulation.py``).
ACTIVE_PROMPTING_DIR = "active_prompting"


def click_trace_path(report_dir: PathLike, safe_id: str) -> Path:
    """Stage 7: one image's click trace, ``<report>/active_prompting/units/<safe_id>.csv``."""
    return Path(report_dir) / ACTIVE_PROMPTING_DIR / "units" / f"{check_component(safe_id, 'safe_id')}.csv"
