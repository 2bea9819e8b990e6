"""Stage 4.5's library: pack a split's head inputs and targets into one HDF5 file, crash-safely.

``<split>.h5`` holds one row per index row (clipped SAM logits and the two Gaussian prompt maps
as ``inputs``, the FRAME256 mask as ``targets``), a CRC-32 and a completion flag per row (the CRC
written before the flag; ``row_checksum``), and the index CSV it was packed from. It is written as
``<split>.h5.partial`` with every dataset allocated up front (its disk blocks reserved) and renamed
when every row is flagged, so a file under the final name is complete by construction. A sample's
rows are flagged only once they are synced to disk and read back with their CRC
(``hdf5_rows``: durable, then flagged); a full disk is a ``StorageError`` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd

from modules.cache import sam_cache
from modules.cache.hdf5_rows import allocate_rows, allocate_table, fixed_bytes, open_for_row_writes, sync_file
from modules.cache.training_index import PackingError, read_index_csv
from modules.core.config import PipelineConfig
from modules.core.fileio import (
    atomic_path,
    cached_file_md5,
    durable_replace,
    file_md5,
    lost_write_error,
    storage_faults,
)
from modules.core.frames import FRAME256
from modules.core.paths import packed_path, promptset_path, training_data_dir
from modules.core.stage import UnitError
from modules.data.imageio import MaskReadError, read_mask, resize_mask_nearest
from modules.data.promptset import gaussian_prompt_maps, load_promptsets, promptset_tensors
from modules.data.sample_files import DataRoots

#: 2: rows (and packed embeddings) carry a CRC-32 (``rows/checksum``, ``samples/checksum``);
#: a version-1 file is repacked by the next pack_to_hdf5.py run (its fingerprint differs).
PACK_FORMAT_VERSION = 2
#: The stage name of ``pack_to_hdf5.py`` (its fingerprint file is ``.stage.<name>.json``).
PACK_STAGE = "pack_to_hdf5"
#: The cache feature packed per sample when embeddings are requested (SAM and SAM 2 both have it).
EMBEDDING_FEATURE = "image_embed"


def partial_path(project_root: str | os.PathLike, split: str) -> Path:
    """The packed split while it is being written (renamed onto ``packed_path`` when complete)."""
    return packed_path(project_root, split).with_name(f"{split}.h5.partial")



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
    return {
        "format_version": PACK_FORMAT_VERSION,
        "logit_clip": settings.logit_clip,
        "mask_threshold": settings.mask_threshold,
        "with_embeddings": settings.with_embeddings,
        "index_md5": hashlib.md5(index_csv).hexdigest(),
    }



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
        index = read_index_csv(index_csv)
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


def row_checksum(*arrays: np.ndarray) -> int:
    """CRC-32 over the stored bytes of one packed row's arrays (inputs, then target), or of one
    sample's embedding: what the reader recomputes to detect damaged rows."""
    crc = 0
    for array in arrays:
        crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1), crc)
    return crc


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
        allocate_rows(handle, "inputs", (n, 3, FRAME256, FRAME256), np.float16)
        allocate_rows(handle, "targets", (n, 1, FRAME256, FRAME256), np.uint8)
        rows = handle.create_group("rows")
        samples = handle.create_group("samples")
        allocate_table(rows, "complete", np.zeros(n, np.uint8))
        allocate_table(rows, "checksum", np.zeros(n, np.uint32))
        allocate_table(rows, "sample", plan.row_sample)
        allocate_table(rows, "promptset_id", plan.index["promptset_id"].to_numpy(np.int32))
        allocate_table(samples, "safe_id", fixed_bytes(plan.safe_ids))
        allocate_table(handle, "index_csv", np.frombuffer(plan.index_csv, dtype=np.uint8))
        if embedding_shape is not None:
            allocate_rows(samples, "embedding", (s, *embedding_shape), np.float16)
            allocate_table(samples, "checksum", np.zeros(s, np.uint32))


def _stored_fingerprint(path: Path) -> dict | None:
    """The fingerprint recorded in a packed (or partial) file; None when it does not open."""
    try:
        with h5py.File(path, "r", locking=False) as handle:
            return json.loads(handle.attrs["fingerprint"])
    except (OSError, KeyError, ValueError):
        return None


def packed_target(mask_path: str | os.PathLike, image_hw: tuple[int, int], threshold: int) -> np.ndarray:
    """``1 x 256 x 256`` uint8 (0/1) target: the mask at image size, nearest-resized to FRAME256."""
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
                 cache: sam_cache.SamCache, roots: DataRoots, fresh: bool):
        self.project_root = Path(project_root)
        self.roots = roots
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
            with atomic_path(self.partial) as tmp:
                _create_packed_file(tmp, self.plan, self._embedding_shape())
        self._handle = open_for_row_writes(self.partial)
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
            target = packed_target(self.roots.mask(first["mask_path"]), (int(first["image_h"]), int(first["image_w"])),
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

        embedding = None
        if "samples/embedding" in self._handle:
            embedding = np.ascontiguousarray(entry.features[EMBEDDING_FEATURE], dtype=np.float16)
        with storage_faults(self.partial):
            self._write_rows(sample, rows, inputs, np.ascontiguousarray(target, dtype=np.uint8), embedding)
        self._complete[rows] = True

    def _write_rows(self, sample: int, rows: np.ndarray, inputs: np.ndarray, target: np.ndarray,
                    embedding: np.ndarray | None) -> None:
        """One sample's rows: data and CRCs, sync, read back and check, then the flags, sync, check."""
        handle = self._handle
        if embedding is not None:
            embedding_checksum = row_checksum(embedding)
            handle["samples/embedding"][sample] = embedding
            handle["samples/checksum"][sample] = embedding_checksum
        checksums = handle["rows/checksum"]
        expected = [row_checksum(inputs[position], target) for position in range(len(rows))]
        for position, row in enumerate(rows):
            handle["inputs"][row] = inputs[position]
            handle["targets"][row] = target
            checksums[row] = expected[position]
        sync_file(handle)
        if embedding is not None and (row_checksum(handle["samples/embedding"][sample]) != embedding_checksum
                                      or int(handle["samples/checksum"][sample]) != embedding_checksum):
            raise lost_write_error(self.partial, f"the embedding of sample {self.plan.safe_ids[sample]}")
        for position, row in enumerate(rows):
            if (int(checksums[row]) != expected[position]
                    or row_checksum(handle["inputs"][row], handle["targets"][row]) != expected[position]):
                raise lost_write_error(self.partial, f"row {row}")
        flags = handle["rows/complete"]
        for row in rows:
            flags[row] = 1
        sync_file(handle)
        if not flags[:][rows].all():
            raise lost_write_error(self.partial, f"the completion flags of rows {rows.tolist()}")

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
        durable_replace(self.partial, self.final)
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
