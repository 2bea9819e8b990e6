"""Stage 4 (the training index), stage 4.5 (one packed HDF5 file per split) and the Dataset over it.

Stage 4 lists every (sample, prompt set) of a split whose image is in the SAM cache, in manifest
order then prompt-set order: ``<project_root>/training_data/<split>_index.csv`` with the columns
``INDEX_COLUMNS``. Where a row's logits live in the cache (``cache_backbone_id``,
``cache_shard_file``, ``cache_slot``) comes from the cache manifest written by stage 3; samples
stage 3 failed on (or whose prompt-set file changed since it ran) are left out and counted.

Stage 4.5 turns each index into ``<project_root>/training_data/<split>.h5`` holding exactly what
the head trains on, one row per index row, in index order (N rows, S samples)::

    attrs              format_version, split, frame (256), logit_clip, num_rows, num_samples,
                       fingerprint (JSON: everything the arrays were computed from)
    inputs             N x 3 x 256 x 256 float16, FRAME256: [SAM logits clipped to
                       [-logit_clip, logit_clip], positive prompt map, negative prompt map];
                       chunk = one row
    targets            N x 1 x 256 x 256 uint8 (0/1) ground-truth mask: read, resized to the image
                       size when its own size differs, then nearest-resized to 256 x 256
    rows/complete      N uint8, the per-row completion flag (written after the row's data)
    rows/sample        N int32, the row's sample number s (into samples/*)
    rows/promptset_id  N int32
    samples/safe_id    S fixed-length byte strings
    samples/embedding  S x C x h x w float16 (only when packed with embeddings): the cached SAM
                       image embedding (``image_embed``), ONCE per sample, not per prompt set
    index_csv          the stage-4 index CSV text, verbatim (uint8 bytes)

FRAME256 is the original image stretched to 256 x 256 (see ``modules/promptset.py``). The
prompt maps are ``promptset.gaussian_prompt_maps`` with the sigma recorded in the prompt-set JSON.

Crash safety and resume follow the SAM cache (``modules/sam_cache.py``): the file is created
atomically as ``<split>.h5.partial`` with every dataset allocated at creation (fixed shapes, no
compression, so no write ever changes HDF5 metadata); each sample's rows are written, flushed,
then flagged, flushed. A SIGKILL can only leave rows unflagged; a rerun recomputes exactly those.
When every row is flagged the file is renamed to ``<split>.h5``: a file under the final name is
complete by construction. A rerun skips a split whose final file records the current fingerprint.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from modules.cache import sam_cache
from modules.core.config import PipelineConfig
from modules.core.errors import PipelineError
from modules.core.frames import FRAME256
from modules.core.paths import cache_dir, index_path, packed_path, training_data_dir
from modules.core.fileio import cached_file_md5, file_md5

log = logging.getLogger("pipeline.packing")

PACK_FORMAT_VERSION = 1
#: The stage name of ``pack_to_hdf5.py`` (its fingerprint file is ``.stage.<name>.json``).
PACK_STAGE = "pack_to_hdf5"
#: The cache feature packed per sample when embeddings are requested (SAM and SAM 2 both have it).
EMBEDDING_FEATURE = "image_embed"
#: ``in_memory="auto"`` loads a split when its arrays take less than this share of available RAM.
IN_MEMORY_FRACTION = 0.25
#: h5py's advice: chunks between 10 KiB and 1 MiB.
MAX_CHUNK_BYTES = 1 << 20

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


# --------------------------------------------------------------------------- paths


def partial_path(project_root: str | os.PathLike, split: str) -> Path:
    """The packed split while it is being written (renamed onto ``packed_path`` when complete)."""
    return packed_path(project_root, split).with_name(f"{split}.h5.partial")


def load_index(project_root: str | os.PathLike, split: str) -> pd.DataFrame:
    """The stage-4 index of one split (read by every later stage through this function)."""
    path = index_path(project_root, split)
    if not path.is_file():
        raise PackingError(f"{path}: missing; run build_training_indices.py first")
    return _read_index_csv(path.read_bytes())


def _read_index_csv(data: bytes) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(data), keep_default_na=False, dtype=_INDEX_DTYPES)


# --------------------------------------------------------------------------- the configured cache


def configured_backbone_id(cfg: PipelineConfig) -> str:
    """The cache folder name of the backbone in ``cfg.sam`` (family, model type, checkpoint md5)."""
    from modules.sam.base import checkpoint_md5

    try:
        md5 = checkpoint_md5(cfg.sam.checkpoint)
    except OSError:
        raise PackingError(f"sam.checkpoint: file not found: {cfg.sam.checkpoint} (it names the SAM cache "
                           "to read)") from None
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
    """One split's index and the samples left out of it (canonical sample ids)."""

    split: str
    frame: pd.DataFrame
    missing_from_cache: list[str]
    stale_in_cache: list[str]

    def stats(self) -> dict[str, Any]:
        frame = self.frame
        return {
            "rows": len(frame),
            "unique_samples": int(frame["safe_id"].nunique()),
            "mean_k_pairs": round(float(frame["k_pairs"].mean()), 4) if len(frame) else None,
            "missing_from_cache": len(self.missing_from_cache),
            "stale_in_cache": len(self.stale_in_cache),
        }


def build_split_index(project_root: Path, split: str, locations: dict[str, CacheLocation]) -> SplitIndex:
    """The index rows of one split: every prompt set of every sample whose cache entry is valid.

    A sample is left out when stage 3 has no complete entry for it (``missing_from_cache``) or
    when its prompt-set file is not the one the cached logits were computed from
    (``stale_in_cache``: rerun precompute_sam_outputs.py).
    """
    from modules.core.fileio import cached_file_md5
    from modules.data.manifest import load_split_manifest
    from modules.data.promptset import load_promptsets, promptset_path

    rows: list[dict] = []
    missing: list[str] = []
    stale: list[str] = []
    for sample in load_split_manifest(project_root, split).to_dict("records"):
        safe_id = str(sample["safe_id"])
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
    return SplitIndex(split, pd.DataFrame(rows, columns=list(INDEX_COLUMNS)), missing, stale)


def run_index_stage(ctx) -> None:
    """Stage 4 entry point (``build_training_indices.py``): one index CSV per split.

    Fingerprint: the backbone config, the split manifests and the cache manifests (which carry
    every entry's prompt-set md5). A CSV is rewritten only when its content changes.
    """
    from modules.core.fileio import atomic_write_text
    from modules.data.manifest import SPLITS, split_manifest_paths
    from modules.core.stage import upstream_fingerprint

    cache = open_cache(ctx.cfg)
    locations = cache_locations(cache)
    backbone = cache.folder.name
    ctx.check_inputs(
        ["sam.family", "sam.model_type"],
        upstream={"backbone_id": backbone,
                  "manifests": upstream_fingerprint(split_manifest_paths(ctx.project_root)),
                  "cache_manifests": upstream_fingerprint(cache_manifest_paths(cache))},
        fingerprint_file=f".stage.{ctx.name}.json",
    )
    print(f"[{ctx.name}] cache {cache.folder} ({len(locations)} complete images)")
    totals: dict[str, Any] = {}
    for split in SPLITS:
        index = build_split_index(ctx.project_root, split, locations)
        path = index_path(ctx.project_root, split)
        text = index.frame.to_csv(index=False)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
            print(f"[{ctx.name}] wrote {path}")
        left_out = index.missing_from_cache + index.stale_in_cache
        if index.missing_from_cache:
            log.warning("%s: %d samples left out, not in the SAM cache (failed in stage 2 or 3), e.g. %s",
                        split, len(index.missing_from_cache), ", ".join(index.missing_from_cache[:5]))
        if index.stale_in_cache:
            log.warning("%s: %d samples left out, their prompt sets changed since the cache was computed "
                        "(rerun precompute_sam_outputs.py), e.g. %s",
                        split, len(index.stale_in_cache), ", ".join(index.stale_in_cache[:5]))
        stats = index.stats()
        ctx.tracker.log({f"{split}/{key}": value for key, value in stats.items() if value is not None})
        totals.update({f"{split}_{key}": value for key, value in stats.items()})
        if left_out:
            totals[f"{split}_left_out_examples"] = left_out[:5]
    ctx.summary(totals)


# --------------------------------------------------------------------------- stage 4.5: packing


@dataclass(frozen=True)
class PackSettings:
    """What the packed arrays depend on besides the index."""

    logit_clip: float
    mask_threshold: int
    with_embeddings: bool

    @classmethod
    def from_config(cls, cfg: PipelineConfig) -> "PackSettings":
        return cls(logit_clip=float(cfg.training.logit_clip), mask_threshold=int(cfg.data.mask_threshold),
                   with_embeddings=bool(cfg.head.use_image_embedding))


def split_fingerprint(settings: PackSettings, index_csv: bytes) -> dict[str, Any]:
    """What one packed split is computed from (stored in the file; a mismatch means repack)."""
    import hashlib

    return {
        "format_version": PACK_FORMAT_VERSION,
        "logit_clip": settings.logit_clip,
        "mask_threshold": settings.mask_threshold,
        "with_embeddings": settings.with_embeddings,
        "index_md5": hashlib.md5(index_csv).hexdigest(),
    }


def _chunk_rows(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk ``(1, k, *rest)`` of an ``N x K x ...`` dataset: one row, at most 1 MiB."""
    per_channel = int(np.prod(shape[2:], dtype=np.int64)) * itemsize
    k = max(1, min(shape[1], MAX_CHUNK_BYTES // max(per_channel, 1)))
    return (1, k, *shape[2:])


def _allocated_dataset(group: h5py.Group, name: str, shape: tuple[int, ...], dtype, chunked: bool) -> None:
    """A dataset whose file space is allocated now, so writing rows later never changes metadata.

    Chunked bulk arrays are not filled (a row only counts once its flag is set); small tables
    are contiguous and zero-filled.
    """
    chunked = chunked and shape[0] > 0
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if chunked:
        dcpl.set_chunk(_chunk_rows(shape, np.dtype(dtype).itemsize))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER if chunked else h5py.h5d.FILL_TIME_ALLOC)
    space = h5py.h5s.create_simple(tuple(shape))
    h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)


@dataclass
class PackPlan:
    """The rows of one split and how they group into samples (the packing units)."""

    split: str
    index: pd.DataFrame
    index_csv: bytes
    safe_ids: tuple[str, ...]        # S, in order of first appearance in the index
    row_sample: np.ndarray           # N int32, the sample number of each row
    sample_rows: list[np.ndarray]    # S arrays of row numbers
    fingerprint: dict[str, Any]

    @classmethod
    def from_index(cls, split: str, index_csv: bytes, settings: PackSettings) -> "PackPlan":
        index = _read_index_csv(index_csv)
        safe_ids = tuple(dict.fromkeys(index["safe_id"]))
        number = {safe_id: i for i, safe_id in enumerate(safe_ids)}
        row_sample = np.array([number[s] for s in index["safe_id"]], dtype=np.int32)
        sample_rows: list[list[int]] = [[] for _ in safe_ids]
        for row, sample in enumerate(row_sample):
            sample_rows[sample].append(row)
        return cls(split, index, index_csv, safe_ids, row_sample,
                   [np.array(rows, dtype=np.int64) for rows in sample_rows], split_fingerprint(settings, index_csv))

    def rows_of(self, sample: int) -> np.ndarray:
        return self.sample_rows[sample]


def _create_packed_file(path: Path, plan: PackPlan, embedding_shape: tuple[int, int, int] | None) -> None:
    """An empty, fully allocated packed file at ``path`` (the caller makes it atomic)."""
    n, s = len(plan.index), len(plan.safe_ids)
    with h5py.File(path, "w") as handle:
        handle.attrs.update({
            "format_version": PACK_FORMAT_VERSION,
            "split": plan.split,
            "frame": FRAME256,
            "logit_clip": plan.fingerprint["logit_clip"],
            "num_rows": n,
            "num_samples": s,
            "fingerprint": json.dumps(plan.fingerprint, sort_keys=True),
        })
        _allocated_dataset(handle, "inputs", (n, 3, FRAME256, FRAME256), np.float16, chunked=True)
        _allocated_dataset(handle, "targets", (n, 1, FRAME256, FRAME256), np.uint8, chunked=True)
        rows = handle.create_group("rows")
        samples = handle.create_group("samples")
        encoded = [v.encode("utf-8") for v in plan.safe_ids]
        safe_ids = np.array(encoded, dtype=f"S{max([len(v) for v in encoded] + [1])}")
        tables = (
            (rows, "complete", np.zeros(n, np.uint8)),
            (rows, "sample", plan.row_sample),
            (rows, "promptset_id", plan.index["promptset_id"].to_numpy(np.int32)),
            (samples, "safe_id", safe_ids),
            (handle, "index_csv", np.frombuffer(plan.index_csv, dtype=np.uint8)),
        )
        for group, name, values in tables:
            _allocated_dataset(group, name, values.shape, values.dtype, chunked=False)
            if values.size:
                group[name][...] = values
        if embedding_shape is not None:
            _allocated_dataset(samples, "embedding", (s, *embedding_shape), np.float16, chunked=True)


def _stored_fingerprint(path: Path) -> dict | None:
    """The fingerprint recorded in a packed (or partial) file; None when it does not open."""
    try:
        with h5py.File(path, "r", locking=False) as handle:
            return json.loads(handle.attrs["fingerprint"])
    except (OSError, KeyError, ValueError):
        return None


def packed_target(mask_path: str, image_hw: tuple[int, int], threshold: int) -> np.ndarray:
    """``1 x 256 x 256`` uint8 (0/1) target: the mask at image size, nearest-resized to FRAME256."""
    from modules.data.imageio import read_mask, resize_mask_nearest

    mask = read_mask(mask_path, threshold=threshold)
    if mask.shape != tuple(image_hw):
        mask = resize_mask_nearest(mask, tuple(image_hw))
    return resize_mask_nearest(mask, (FRAME256, FRAME256)).astype(np.uint8)[None]


def packed_inputs(logits: np.ndarray, prompt_maps: np.ndarray, logit_clip: float) -> np.ndarray:
    """``P x 3 x 256 x 256`` float16 head inputs from ``P x 256 x 256`` logits and ``P x 2 x 256
    x 256`` prompt maps (both FRAME256); logits clipped to ``[-logit_clip, logit_clip]``."""
    clipped = np.clip(logits.astype(np.float32), -logit_clip, logit_clip)
    return np.concatenate([clipped[:, None], prompt_maps.astype(np.float32)], axis=1).astype(np.float16)


class SplitPacker:
    """Fills one split's ``.partial`` file sample by sample, then publishes it."""

    def __init__(self, project_root: Path, plan: PackPlan, settings: PackSettings,
                 cache: sam_cache.SamCache, fresh: bool):
        self.project_root = Path(project_root)
        self.plan = plan
        self.settings = settings
        self.cache = cache
        self.partial = partial_path(project_root, plan.split)
        self.final = packed_path(project_root, plan.split)
        self.messages: list[str] = []
        self._open(fresh)

    # ----------------------------------------------------------- opening

    def _open(self, fresh: bool) -> None:
        reusable = False
        if self.partial.is_file() and not fresh:
            stored = _stored_fingerprint(self.partial)
            reusable = stored == self.plan.fingerprint
            if not reusable:
                reason = "does not open" if stored is None else "was made from other inputs"
                self.messages.append(f"{self.partial.name} {reason}; starting it over")
        if not reusable:
            from modules.core.fileio import atomic_path

            with atomic_path(self.partial) as tmp:
                _create_packed_file(tmp, self.plan, self._embedding_shape())
        self._handle = h5py.File(self.partial, "r+")
        self._complete = self._handle["rows/complete"][:].astype(bool)
        if reusable:
            self.messages.append(f"{self.partial.name}: resuming, {int(self._complete.sum())} of "
                                 f"{len(self._complete)} rows already packed")

    def _embedding_shape(self) -> tuple[int, int, int] | None:
        if not self.settings.with_embeddings:
            return None
        shapes = self.cache.info().get("feature_shapes", {})
        if EMBEDDING_FEATURE not in shapes:
            raise PackingError(f"{self.cache.folder}: the cache has no {EMBEDDING_FEATURE!r} feature to pack "
                               "(head.use_image_embedding is true)")
        return tuple(int(v) for v in shapes[EMBEDDING_FEATURE])

    # ----------------------------------------------------------- units

    @property
    def sample_numbers(self) -> list[int]:
        return list(range(len(self.plan.safe_ids)))

    def is_complete(self, sample: int) -> bool:
        return bool(self._complete[self.plan.rows_of(sample)].all())

    def sample_name(self, sample: int) -> str:
        return self.plan.safe_ids[sample]

    def pack_sample(self, sample: int) -> None:
        """Read the cache entry and the mask once, build all prompt maps in one call, write, flag."""
        from modules.core.fileio import cached_file_md5
        from modules.data.imageio import MaskReadError
        from modules.data.promptset import gaussian_prompt_maps, load_promptsets, promptset_path, promptset_tensors
        from modules.core.stage import UnitError

        rows = self.plan.rows_of(sample)
        index = self.plan.index.iloc[rows]
        first = index.iloc[0]
        safe_id, split, expected_md5 = first["safe_id"], first["split"], first["promptset_md5"]
        json_path = promptset_path(self.project_root, split, safe_id)
        rerun = "the index is out of date; rerun build_training_indices.py --force"
        try:
            entry = self.cache.entry(safe_id)
        except KeyError:
            raise UnitError(f"{safe_id}: not in the SAM cache {self.cache.folder}; {rerun}") from None
        if entry.promptset_md5 != expected_md5:
            raise UnitError(f"{self.cache.folder}: entry {safe_id} was recomputed since indexing; {rerun}")
        try:
            if cached_file_md5(json_path) != expected_md5:
                raise UnitError(f"{json_path}: changed since the SAM cache was computed; rerun "
                                "precompute_sam_outputs.py and build_training_indices.py")
            record = load_promptsets(self.project_root, split, safe_id)
            target = packed_target(first["mask_path"], (int(first["image_h"]), int(first["image_w"])),
                                   self.settings.mask_threshold)
        except (OSError, ValueError, MaskReadError) as exc:
            raise UnitError(f"{safe_id}: {exc}") from None
        if not np.isfinite(entry.logits).all():
            raise UnitError(f"{self.cache.folder}: entry {safe_id} has non-finite logits; "
                            "rerun precompute_sam_outputs.py --force")

        _, labels, points_256, _ = promptset_tensors(record)
        maps = gaussian_prompt_maps(points_256, labels, float(record["gaussian_sigma"])).numpy()
        record_row = {int(s["promptset_id"]): i for i, s in enumerate(record["promptsets"])}
        entry_row = {int(pid): i for i, pid in enumerate(entry.promptset_ids)}
        wanted = [int(pid) for pid in index["promptset_id"]]
        if any(pid not in record_row or pid not in entry_row for pid in wanted):
            raise UnitError(f"{safe_id}: prompt sets {wanted} not all in {json_path.name} and the cache; {rerun}")
        inputs = packed_inputs(entry.logits[[entry_row[p] for p in wanted]],
                               maps[[record_row[p] for p in wanted]], self.settings.logit_clip)

        handle = self._handle
        if "samples/embedding" in handle:
            handle["samples/embedding"][sample] = entry.features[EMBEDDING_FEATURE]
        for position, row in enumerate(rows):
            handle["inputs"][row] = inputs[position]
            handle["targets"][row] = target
        handle.flush()
        flags = handle["rows/complete"]
        for row in rows:
            flags[row] = 1
        self._complete[rows] = True
        handle.flush()

    # ----------------------------------------------------------- finishing

    @property
    def rows_complete(self) -> int:
        return int(self._complete.sum())

    def publish(self) -> bool:
        """Rename the partial file to its final name when every row is flagged (False otherwise)."""
        complete = bool(self._handle["rows/complete"][:].all())
        self.close()
        if not complete:
            return False
        with open(self.partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.partial, self.final)
        return True

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def split_is_packed(project_root: Path, split: str, fingerprint: dict) -> bool:
    """The final file exists and was packed from exactly these inputs."""
    path = packed_path(project_root, split)
    return path.is_file() and _stored_fingerprint(path) == fingerprint


def packed_splits_fingerprint(project_root: str | os.PathLike) -> dict[str, str]:
    """What the packed splits were computed from (the packing stage's own record), for the stages
    that train on them; empty before the packing stage ran."""
    stage_file = training_data_dir(project_root) / f".stage.{PACK_STAGE}.json"
    return {"packed_splits": file_md5(stage_file)} if stage_file.is_file() else {}


def run_pack_stage(ctx) -> None:
    """Stage 4.5 entry point (``pack_to_hdf5.py``): one packed HDF5 file per split.

    Fingerprint: ``training.logit_clip``, ``data.mask_threshold``, ``head.use_image_embedding``
    and the index CSVs. Units are samples (via ``ctx.run_units``, so the SIGKILL test hook
    applies). A split whose final file matches is skipped; an interrupted one resumes.
    """
    from modules.data.manifest import SPLITS
    from modules.core.stage import upstream_fingerprint

    cfg = ctx.cfg
    settings = PackSettings.from_config(cfg)
    index_files = [index_path(ctx.project_root, split) for split in SPLITS]
    for path in index_files:
        if not path.is_file():
            raise PackingError(f"{path}: missing; run build_training_indices.py first")
    # Each packed file also records its own fingerprint, so only --force discards finished rows.
    ctx.check_inputs(["training.logit_clip", "data.mask_threshold", "head.use_image_embedding"],
                     upstream={"indices": upstream_fingerprint(index_files)},
                     fingerprint_file=f".stage.{ctx.name}.json")
    cache = open_cache(cfg)
    totals: dict[str, Any] = {}
    incomplete: list[str] = []
    for split, path in zip(SPLITS, index_files):
        plan = PackPlan.from_index(split, path.read_bytes(), settings)
        other_backbones = set(plan.index["cache_backbone_id"]) - {cache.folder.name}
        if other_backbones:
            raise PackingError(f"{path}: indexed from the SAM cache of {sorted(other_backbones)[0]}, but the config "
                               f"names {cache.folder.name}; rerun build_training_indices.py --force")
        if not ctx.force and split_is_packed(ctx.project_root, split, plan.fingerprint):
            print(f"[{ctx.name}] {split}: {packed_path(ctx.project_root, split)} is complete, skipped")
            partial_path(ctx.project_root, split).unlink(missing_ok=True)  # left by an interrupted --force run
            totals[f"{split}_rows"] = len(plan.index)
            totals[f"{split}_status"] = "skipped"
            continue
        started = time.perf_counter()
        packer = SplitPacker(ctx.project_root, plan, settings, cache, fresh=ctx.force)
        for message in packer.messages:
            print(f"[{ctx.name}] {message}")
        try:
            counts = ctx.run_units(packer.sample_numbers, packer.is_complete, packer.pack_sample,
                                   desc=f"packing [{split}]", unit_name=packer.sample_name,
                                   metric_prefix=f"{split}/")
            rows_complete = packer.rows_complete
            published = packer.publish()
        finally:
            packer.close()
        seconds = time.perf_counter() - started
        status = "packed" if published else "incomplete"
        if not published:
            incomplete.append(f"{split} ({counts.failed} samples failed)")
            for name, reason in counts.failures[:10]:
                print(f"  failed: {name}: {reason}")
        size_mb = (packed_path if published else partial_path)(ctx.project_root, split).stat().st_size / 2**20
        stats = {"rows": len(plan.index), "rows_complete": rows_complete, "samples": len(plan.safe_ids),
                 "file_mb": round(size_mb, 1), "seconds": round(seconds, 2), **counts.as_dict()}
        ctx.tracker.log({f"{split}/{key}": value for key, value in stats.items()})
        totals.update({f"{split}_{key}": value for key, value in stats.items()})
        totals[f"{split}_status"] = status
    ctx.summary(totals)
    if incomplete:
        raise PackingError(f"{training_data_dir(ctx.project_root)}: not packed completely: {', '.join(incomplete)}; "
                           "fix the failures above and rerun pack_to_hdf5.py (finished rows are kept)")


# --------------------------------------------------------------------------- the Dataset


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo, else free physical pages via ``os.sysconf``; None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


#: ``training.in_memory`` (or the ``in_memory`` argument) -> whether a split of ``nbytes`` is loaded.
IN_MEMORY_POLICIES = {
    "true": lambda nbytes: True,
    "false": lambda nbytes: False,
    "auto": lambda nbytes: (available_memory_bytes() or 0) * IN_MEMORY_FRACTION > nbytes,
}


def resolve_in_memory(setting: str | bool, nbytes: int) -> bool:
    """Whether to load ``nbytes`` of arrays: True/False as given; ``"auto"``: when they take less
    than ``IN_MEMORY_FRACTION`` (25 %) of the currently available RAM."""
    key = str(setting).lower()
    if key not in IN_MEMORY_POLICIES:
        raise PackingError(f"training.in_memory: {setting!r} is not one of auto, true, false")
    return IN_MEMORY_POLICIES[key](nbytes)


class PackedSplitDataset(Dataset):
    """The rows of one packed split (``<split>.h5``) as training items.

    Item ``i`` (row ``i`` of the split's index)::

        inputs           3 x 256 x 256 float32 (clipped logits, positive map, negative map; FRAME256)
        target           1 x 256 x 256 float32 in {0, 1}
        index            i
        safe_id          str
        promptset_id     int
        image_embedding  C x h x w float32 (only with ``with_embeddings=True``)

    ``in_memory``: ``True`` reads all arrays (stored dtypes: float16 / uint8) in ``__init__``, so
    forked DataLoader workers share them copy-on-write; ``False`` reads rows from the file on
    demand; ``"auto"`` loads when the arrays take less than 25 % of available RAM. The file is
    opened lazily, once per process (``__init__`` only reads metadata and closes it again), and
    the handle is never pickled, so the dataset is safe under fork and spawn workers.

    Speed: ``__getitems__`` (which ``DataLoader`` calls with a whole batch of indices) converts a
    batch to float32 in one torch call; rows are read as raw chunks (``read_direct_chunk``; one
    row is exactly one unfiltered chunk), skipping h5py's selection machinery.
    """

    def __init__(self, path: str | os.PathLike, in_memory: str | bool = "auto", with_embeddings: bool = False):
        self.path = Path(path)
        self.with_embeddings = with_embeddings
        if not self.path.is_file():
            raise PackingError(f"{self.path}: no packed split; run pack_to_hdf5.py first")
        try:
            with h5py.File(self.path, "r", locking=False) as handle:
                self._read_metadata(handle)
                names = ("inputs", "targets") + (("samples/embedding",) if with_embeddings else ())
                self.nbytes = sum(handle[name].nbytes for name in names)
                self._one_chunk_per_row = {name: _one_chunk_per_row(handle[name]) for name in names}
                self.in_memory = resolve_in_memory(in_memory, self.nbytes)
                self._arrays = {name: handle[name][:] for name in names} if self.in_memory else None
        except (OSError, KeyError) as exc:
            raise PackingError(f"{self.path}: unreadable packed split ({exc}); rerun pack_to_hdf5.py --force") from None
        self._handle: h5py.File | None = None
        self._datasets: dict[str, h5py.Dataset] = {}
        self._pid: int | None = None

    def _read_metadata(self, handle: h5py.File) -> None:
        if int(handle.attrs.get("format_version", -1)) != PACK_FORMAT_VERSION:
            raise PackingError(f"{self.path}: packed with another format version; rerun pack_to_hdf5.py --force")
        if not handle["rows/complete"][:].all():
            raise PackingError(f"{self.path}: not every row is packed; rerun pack_to_hdf5.py")
        if self.with_embeddings and "samples/embedding" not in handle:
            raise PackingError(f"{self.path}: packed without image embeddings; set head.use_image_embedding=true "
                               "and rerun pack_to_hdf5.py --force")
        self.split = str(handle.attrs["split"])
        self.logit_clip = float(handle.attrs["logit_clip"])
        self.row_sample = handle["rows/sample"][:]
        self.promptset_ids = handle["rows/promptset_id"][:]
        self.sample_safe_ids = [v.decode("utf-8") for v in handle["samples/safe_id"][:]]
        self.index = _read_index_csv(handle["index_csv"][:].tobytes())

    def __len__(self) -> int:
        return len(self.row_sample)

    # ----------------------------------------------------------- reading

    def _dataset(self, name: str) -> h5py.Dataset:
        if self._handle is None or self._pid != os.getpid():
            self._handle = h5py.File(self.path, "r", locking=False)
            self._datasets = {}
            self._pid = os.getpid()
        dataset = self._datasets.get(name)
        if dataset is None:
            dataset = self._datasets[name] = self._handle[name]
        return dataset

    def _rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``len(rows) x ...`` rows of dataset ``name``, in its stored dtype."""
        if self._arrays is not None:
            return self._arrays[name][rows]
        dataset = self._dataset(name)
        out = np.empty((len(rows), *dataset.shape[1:]), dtype=dataset.dtype)
        if self._one_chunk_per_row[name]:
            zeros = (0,) * (dataset.ndim - 1)
            for position, row in enumerate(rows):
                dataset.id.read_direct_chunk((int(row), *zeros), out=out[position].reshape(-1).view(np.uint8))
        else:
            for position, row in enumerate(rows):
                out[position] = dataset[int(row)]
        return out

    def read_batch(self, indices, float32: bool = True) -> dict[str, Any]:
        """Rows ``indices`` as one batch: ``inputs B x 3 x 256 x 256``, ``target B x 1 x 256 x 256``,
        ``index`` / ``promptset_id`` (int64, ``B``), ``safe_id`` (list of ``B`` str) and, with
        embeddings, ``image_embedding B x C x h x w``.

        ``float32=False`` keeps the stored dtypes (inputs and embeddings float16, target uint8):
        half the bytes to copy between processes and to the GPU; ``as_float32`` converts there.
        """
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: rows {rows.tolist()} not all in 0..{len(self) - 1}")
        samples = self.row_sample[rows]
        batch = {
            "inputs": torch.from_numpy(self._rows("inputs", rows)),
            "target": torch.from_numpy(self._rows("targets", rows)),
            "index": torch.from_numpy(rows),
            "safe_id": [self.sample_safe_ids[sample] for sample in samples],
            "promptset_id": torch.from_numpy(self.promptset_ids[rows].astype(np.int64)),
        }
        if self.with_embeddings:
            unique, position = np.unique(samples, return_inverse=True)
            batch["image_embedding"] = torch.from_numpy(self._rows("samples/embedding", unique))[position]
        return as_float32(batch) if float32 else batch

    def __getitems__(self, indices) -> list[dict[str, Any]]:
        """The items of a batch of row numbers (read and converted together)."""
        batch = self.read_batch(indices)
        items = []
        for position, row in enumerate(batch["index"].tolist()):
            item = {"inputs": batch["inputs"][position], "target": batch["target"][position], "index": row,
                    "safe_id": batch["safe_id"][position], "promptset_id": int(batch["promptset_id"][position])}
            if self.with_embeddings:
                item["image_embedding"] = batch["image_embedding"][position]
            items.append(item)
        return items

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    # ----------------------------------------------------------- handles

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle, self._datasets, self._pid = None, {}, None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_handle=None, _datasets={}, _pid=None)
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def as_float32(batch: dict[str, Any]) -> dict[str, Any]:
    """``inputs``, ``target`` and ``image_embedding`` of a ``read_batch`` batch as float32 (others as they are)."""
    return {key: value.float() if key in ("inputs", "target", "image_embedding") else value
            for key, value in batch.items()}


class PackedBatches(Dataset):
    """A packed split for ``DataLoader``: ``__getitems__`` returns the whole batch already stacked, in
    the stored dtypes (``read_batch(float32=False)``), so neither per-item dicts nor default
    collation copy it again. Use with ``collate_fn=collate_batch``; the consumer converts on its
    device (``as_float32``). Sampling is by row, exactly as for the item-wise dataset."""

    def __init__(self, packed: PackedSplitDataset):
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed)

    def __getitems__(self, indices) -> dict[str, Any]:
        return self.packed.read_batch(indices, float32=False)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.packed.read_batch([index], float32=False)


def collate_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """``collate_fn`` for ``PackedBatches``: the batch is already stacked."""
    return batch


def _one_chunk_per_row(dataset: h5py.Dataset) -> bool:
    """Each row is exactly one chunk stored without filters (raw chunk bytes = the row)."""
    return (dataset.chunks == (1, *dataset.shape[1:])
            and dataset.id.get_create_plist().get_nfilters() == 0)


def packed_dataset(cfg: PipelineConfig, split: str) -> PackedSplitDataset:
    """The packed split of a project, with ``training.in_memory`` and ``head.use_image_embedding``."""
    return PackedSplitDataset(packed_path(cfg.project_root, split), in_memory=cfg.training.in_memory,
                              with_embeddings=cfg.head.use_image_embedding)
