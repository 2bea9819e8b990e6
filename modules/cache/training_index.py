"""Stage 4's library: the training index of a split, and where the configured SAM cache is.

An index lists every (sample, prompt set) of a split whose image is complete in the SAM cache, in
manifest order then prompt-set order, with the columns ``INDEX_COLUMNS`` (``<split>_index.csv``).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from modules.cache import sam_cache
from modules.core.config import PipelineConfig
from modules.core.errors import PipelineError, error_line
from modules.core.fileio import cached_file_md5
from modules.core.paths import cache_dir, index_path, promptset_path
from modules.data.manifest import load_split_manifest
from modules.data.promptset import load_promptsets
from modules.sam.registry import configured_checkpoint_md5

INDEX_COLUMNS = (
    "sample_id",
    "safe_id",
    "split",
    "group",
    "promptset_id",
    "k_pairs",
    "image_path",
    "image_h",
    "image_w",
    "mask_path",
    "mask_h",
    "mask_w",
    "promptset_md5",
    "cache_backbone_id",
    "cache_shard_file",
    "cache_slot",
)
_INDEX_DTYPES = {"sample_id": str, "safe_id": str, "split": str, "group": str, "image_path": str,
                 "mask_path": str, "promptset_md5": str, "cache_backbone_id": str, "cache_shard_file": str}


class PackingError(PipelineError):
    """A missing or inconsistent index, cache or packed file (one line naming the file)."""


# --------------------------------------------------------------------------- reading an index


def load_index(project_root: str | os.PathLike, split: str) -> pd.DataFrame:
    """The stage-4 index of one split (read by every later stage through this function)."""
    path = index_path(project_root, split)
    if not path.is_file():
        raise PackingError(f"{path}: missing; run build_training_indices.py first")
    return read_index_csv(path.read_bytes(), source=str(path))


def read_index_csv(data: bytes, source: str = "training index") -> pd.DataFrame:
    """An index CSV's bytes as a table (ids and paths stay strings, empty cells stay ""). A one-line
    ``PackingError`` naming ``source`` when the bytes are no index: unparsable, a column of
    ``INDEX_COLUMNS`` missing, or a non-integer value in an integer column."""
    try:
        frame = pd.read_csv(io.BytesIO(data), keep_default_na=False, dtype=_INDEX_DTYPES)
    except ValueError as error:  # pandas' ParserError and EmptyDataError, and UnicodeDecodeError, are ValueErrors
        raise PackingError(f"{source}: unreadable training index ({error_line(error)}); "
                           "rerun build_training_indices.py --force") from None
    missing = [column for column in INDEX_COLUMNS if column not in frame.columns]
    if missing:
        raise PackingError(f"{source}: not a training index (no column {', '.join(missing[:3])}); "
                           "rerun build_training_indices.py --force")
    for column in INDEX_COLUMNS:
        if column not in _INDEX_DTYPES and len(frame) and not pd.api.types.is_integer_dtype(frame[column]):
            raise PackingError(f"{source}: column {column} holds non-integer values; "
                               "rerun build_training_indices.py --force")
    return frame


# --------------------------------------------------------------------------- the configured cache


def configured_backbone_id(cfg: PipelineConfig) -> str:
    """The cache folder name of the backbone in ``cfg.sam`` (family, model type, checkpoint md5)."""
    md5 = configured_checkpoint_md5(cfg.sam.checkpoint)
    return sam_cache.backbone_id(cfg.sam.family, cfg.sam.model_type, md5)


def open_cache(cfg: PipelineConfig) -> sam_cache.SamCache:
    """The SAM cache of the configured backbone; the one place later stages locate it."""
    backbone = configured_backbone_id(cfg)
    folder = cache_dir(cfg.project_root, backbone)
    if not sam_cache.shard_files(folder):
        raise PackingError(f"{folder}: no SAM cache for the configured backbone ({backbone}); "
                           "run precompute_sam_outputs.py first")
    return sam_cache.SamCache(folder)


@dataclass(frozen=True)
class CacheLocation:
    """Where stage 3 stored one image: the shard file's name and the slot inside it."""

    backbone_id: str
    shard_file: str
    slot: int
    split: str
    promptset_md5: str


def cache_manifest_paths(cache: sam_cache.SamCache) -> list[Path]:
    """The cache manifest CSV of every shard file (stage 3 writes one beside each)."""
    return [path.with_suffix(".manifest.csv") for path in sam_cache.shard_files(cache.folder)]


def cache_locations(cache: sam_cache.SamCache) -> dict[str, CacheLocation]:
    """safe_id -> location of every entry the cache reader sees as complete.

    Read from the cache manifests and checked against the reader: only rows whose entry is
    complete and made from the same prompt-set file count. When several shard files hold a
    sample (left over from another shard count) the newest file wins, as in ``SamCache``.
    """
    shards = sorted(sam_cache.shard_files(cache.folder), key=lambda p: p.stat().st_mtime_ns)
    locations: dict[str, CacheLocation] = {}
    for shard in shards:
        manifest = shard.with_suffix(".manifest.csv")
        if not manifest.is_file():
            continue
        try:
            rows = pd.read_csv(manifest, keep_default_na=False, dtype={"safe_id": str, "promptset_md5": str})
        except (OSError, ValueError) as exc:
            raise PackingError(f"{manifest}: unreadable cache manifest ({exc}); rerun precompute_sam_outputs.py") from None
        for row in rows.to_dict("records"):
            safe_id = row["safe_id"]
            if int(row["complete"]) and safe_id in cache and cache.promptset_md5(safe_id) == row["promptset_md5"]:
                locations[safe_id] = CacheLocation(str(row["backbone_id"]), str(row["shard_file"]),
                                                   int(row["slot"]), str(row["split"]), row["promptset_md5"])
    unlisted = [safe_id for safe_id in cache.sample_ids() if safe_id not in locations]
    if unlisted:
        raise PackingError(f"{cache.folder}: {len(unlisted)} cached images (e.g. {unlisted[0]}) are missing from "
                           "the cache manifests; rerun precompute_sam_outputs.py to rewrite them")
    return locations


# --------------------------------------------------------------------------- stage 4: the index


@dataclass
class SplitIndex:
    """One split's index and the samples left out of it (canonical sample ids); ``held_out``: the
    samples of the unseen groups (``data.unseen_groups``), never indexed for a fitted split."""

    split: str
    frame: pd.DataFrame
    missing_from_cache: list[str]
    stale_in_cache: list[str]
    held_out: list[str] = field(default_factory=list)

    def stats(self) -> dict[str, Any]:
        frame = self.frame
        return {
            "rows": len(frame),
            "unique_samples": int(frame["safe_id"].nunique()),
            "mean_k_pairs": round(float(frame["k_pairs"].mean()), 4) if len(frame) else None,
            "missing_from_cache": len(self.missing_from_cache),
            "stale_in_cache": len(self.stale_in_cache),
            "held_out_unseen": len(self.held_out),
        }


def build_split_index(project_root: Path, split: str, locations: dict[str, CacheLocation],
                      excluded_groups: frozenset[str] = frozenset()) -> SplitIndex:
    """The index rows of one split: every prompt set of every sample whose cache entry is valid and
    whose group is not in ``excluded_groups`` (the unseen groups, for the fitted splits: ``held_out``).

    A sample is left out when stage 3 has no complete entry for it (``missing_from_cache``) or
    when its prompt-set file is not the one the cached logits were computed from
    (``stale_in_cache``: rerun precompute_sam_outputs.py).
    """
    rows: list[dict] = []
    missing: list[str] = []
    stale: list[str] = []
    held_out: list[str] = []
    for sample in load_split_manifest(project_root, split).to_dict("records"):
        safe_id = str(sample["safe_id"])
        if str(sample["group"]) in excluded_groups:
            held_out.append(str(sample["sample_id"]))
            continue
        location = locations.get(safe_id)
        json_path = promptset_path(project_root, split, safe_id)
        if location is None or not json_path.is_file():
            missing.append(str(sample["sample_id"]))
            continue
        if location.split != split or cached_file_md5(json_path) != location.promptset_md5:
            stale.append(str(sample["sample_id"]))
            continue
        record = load_promptsets(project_root, split, safe_id)
        for promptset in record["promptsets"]:
            rows.append({
                "sample_id": sample["sample_id"],
                "safe_id": safe_id,
                "split": split,
                "group": sample["group"],
                "promptset_id": int(promptset["promptset_id"]),
                "k_pairs": int(promptset["k"]),
                "image_path": sample["image_path"],
                "image_h": int(sample["image_h"]),
                "image_w": int(sample["image_w"]),
                "mask_path": sample["mask_path"],
                "mask_h": int(sample["mask_h"]),
                "mask_w": int(sample["mask_w"]),
                "promptset_md5": location.promptset_md5,
                "cache_backbone_id": location.backbone_id,
                "cache_shard_file": location.shard_file,
                "cache_slot": location.slot,
            })
    return SplitIndex(split, pd.DataFrame(rows, columns=list(INDEX_COLUMNS)), missing, stale, held_out)
