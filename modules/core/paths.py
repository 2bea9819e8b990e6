"""Where every artifact lives under the project root: the one home of the folder layout.

Stages and libraries ask this module for a path; none spells a folder name of its own. The
relative folders (``MANIFEST_DIR`` ...) are what the stage runner creates under the project root.
"""

from __future__ import annotations

import os
from pathlib import Path

MANIFEST_DIR = "manifests"
PROMPT_SET_DIR = "prompt_sets"
SAM_CACHE_DIR = "sam_cache"
TRAINING_DATA_DIR = "training_data"
CHECKPOINT_DIR = "checkpoints"
LAPLACE_DIR = "laplace"
REPORTS_DIR = "reports"
EVAL_DIR = f"{REPORTS_DIR}/eval"
DEBUG_PANELS_DIR = f"{REPORTS_DIR}/debug_panels"

#: A stage's record of what its outputs were computed from (see ``core.stage``).
FINGERPRINT_FILE = ".stage.json"

PathLike = str | os.PathLike


def manifest_path(project_root: PathLike, name: str) -> Path:
    """Stage 1: ``name`` is ``all_samples``, ``invalid_samples`` or a split."""
    return Path(project_root) / MANIFEST_DIR / f"{name}.csv"


def promptset_path(project_root: PathLike, split: str, safe_id: str) -> Path:
    """Stage 2: the prompt sets of one sample."""
    return Path(project_root) / PROMPT_SET_DIR / split / f"{safe_id}.json"


def cache_dir(project_root: PathLike, backbone_id: str) -> Path:
    """Stage 3: the SAM cache of one exact checkpoint."""
    return Path(project_root) / SAM_CACHE_DIR / backbone_id


def training_data_dir(project_root: PathLike) -> Path:
    """Stages 4 and 4.5: the index CSVs and packed splits."""
    return Path(project_root) / TRAINING_DATA_DIR


def index_path(project_root: PathLike, split: str) -> Path:
    return training_data_dir(project_root) / f"{split}_index.csv"


def packed_path(project_root: PathLike, split: str) -> Path:
    return training_data_dir(project_root) / f"{split}.h5"


def checkpoint_run_relpath(model_kind: str, run_id: str) -> str:
    """Stage 5, relative to the project root: ``checkpoints/<model>/run_<id>``."""
    return f"{CHECKPOINT_DIR}/{model_kind}/run_{run_id}"


def checkpoint_run_dir(project_root: PathLike, model_kind: str, run_id: str) -> Path:
    return Path(project_root) / checkpoint_run_relpath(model_kind, run_id)


def laplace_run_relpath(target: str, run_id: str) -> str:
    """Stage 6, relative to the project root: ``laplace/<target>/run_<id>``."""
    return f"{LAPLACE_DIR}/{target}/run_{run_id}"


def laplace_run_dir(project_root: PathLike, target: str, run_id: str) -> Path:
    return Path(project_root) / laplace_run_relpath(target, run_id)


def eval_report_relpath(name: str) -> str:
    """Stage 7, relative to the project root: ``reports/eval/<name>``."""
    return f"{EVAL_DIR}/{name}"


def eval_report_dir(project_root: PathLike, name: str) -> Path:
    return Path(project_root) / eval_report_relpath(name)
