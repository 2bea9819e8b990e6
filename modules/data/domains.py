"""The unseen-domain protocol: the groups named in ``data.unseen_groups`` are left out of every
training and validation split (stage 4 drops them from the train and val indices, so the head, the
variance network, the Laplace fit and tuning and the fusion module never see them) and evaluated as
unseen domains. The manifests' splits never change; only what is selected for fitting does.
"""

from __future__ import annotations

from pathlib import Path

from modules.core.config import ConfigError, PipelineConfig
from modules.data.manifest import SPLITS, load_split_manifest

#: The splits the trained estimators fit or tune on; the unseen groups are dropped from them.
FITTED_SPLITS = ("train", "val")
#: ``domain_kind`` of a group (or of the aggregate row pooling such groups).
SEEN, UNSEEN = "seen", "unseen"


def dataset_groups(project_root: Path) -> set[str]:
    """Every group of the split manifests (stage 1's valid samples)."""
    return {str(group) for split in SPLITS for group in load_split_manifest(project_root, split)["group"]}


def checked_unseen_groups(cfg: PipelineConfig) -> frozenset[str]:
    """``data.unseen_groups`` after checking each is a group of the data set (one-line ConfigError)."""
    unseen = cfg.data.unseen_groups
    if not unseen:
        return frozenset()
    groups = dataset_groups(cfg.project_root)
    unknown = [group for group in unseen if group not in groups]
    if unknown:
        raise ConfigError(f"data.unseen_groups: {unknown[0]!r} is not a group of the data set "
                          f"(groups: {', '.join(sorted(groups))})")
    return frozenset(unseen)


def domain_kind(group: str, unseen: frozenset[str] | set[str]) -> str:
    """``unseen`` for a held-out group, ``seen`` otherwise."""
    return UNSEEN if group in unseen else SEEN
