"""The SAM output cache: one HDF5 file per shard, read as one; the one home of the shard file layout.

A cache folder (``paths.cache_dir``) holds ``shard-III-of-NNN.h5`` files, a cache manifest CSV
beside each, and ``backbone.json``. Every dataset of a shard file is allocated when the file is
created, and each entry's completion flag is written last, so a killed writer (``shard_writer``)
leaves at worst unflagged entries. Every later stage reads through ``SamCache``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from modules.cache.hdf5_rows import allocate_dataset, allocate_rows, allocate_table, decode_strings, fixed_bytes
from modules.core.errors import PipelineError, error_line
from modules.core.frames import FRAME256
from modules.core.paths import SAM_CACHE_DIR

log = logging.getLogger("pipeline.sam_cache")

FORMAT_VERSION = 1
MD5_BYTES = 32
SHARD_PATTERN = re.compile(r"^shard-(\d{3,})-of-(\d{3,})\.h5$")
BACKBONE_INFO_FILE = "backbone.json"
#: The config keys SAM's cached outputs depend on, beside the checkpoint (its md5 names the folder):
#: stage 3's fingerprint, and that of every stage that decodes with SAM again. Device, batch sizes,
#: workers, the cache writer and the encoder impl only change speed.
SAM_OUTPUT_KEYS = ("sam.family", "sam.model_type", "sam.prompt_mode", "sam.multimask_policy")


def encoder_weight_inputs(encoder_int8: bool) -> dict[str, bool]:
    """What a fingerprint's upstream records of ``sam.encoder_int8``, which moves the features: the
    key when it is on, nothing when off (so fingerprints made before the key existed still match)."""
    return {"sam.encoder_int8": True} if encoder_int8 else {}


class SamCacheError(PipelineError):
    """The cache is missing, ambiguous or unreadable (one-line message naming the path)."""


# --------------------------------------------------------------------------- names


def backbone_id(family: str, model_type: str, checkpoint_md5: str) -> str:
    """``"<family>-<model_type>-<md5[:12]>"``: the cache folder name of one exact checkpoint."""
    return f"{family}-{model_type}-{checkpoint_md5[:12]}"


def shard_file_name(index: int, count: int) -> str:
    return f"shard-{index:03d}-of-{count:03d}.h5"


def shard_files(folder: str | os.PathLike) -> list[Path]:
    """The shard files of a cache folder, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if SHARD_PATTERN.match(p.name))


# --------------------------------------------------------------------------- entries


@dataclass
class CacheEntry:
    """Everything cached for one image (numpy arrays).

    - ``features``: name -> ``C x h x w`` float16 (the encoder output, ready for ``decode``).
    - ``logits``: ``P x 256 x 256`` float16, FRAME256, the selected output per prompt set.
    - ``promptset_ids``: ``P`` int32; ``branch_index``: ``P`` int8;
      ``iou_predictions``: ``P x M`` float32 (all outputs' predicted IoUs).
    - ``original_hw``: (H, W) of the image; ``input_hw``: (h, w) inside the encoder input.
    - ``promptset_md5``: md5 of the prompt-set JSON the logits were computed from.
    """

    safe_id: str
    split: str
    features: dict[str, np.ndarray]
    logits: np.ndarray
    promptset_ids: np.ndarray
    branch_index: np.ndarray
    iou_predictions: np.ndarray
    original_hw: tuple[int, int]
    input_hw: tuple[int, int]
    promptset_md5: str

    @property
    def num_promptsets(self) -> int:
        return int(self.logits.shape[0])

    @property
    def selected_iou_predictions(self) -> np.ndarray:
        """``P`` float32: SAM's predicted IoU of the output cached for each prompt set."""
        rows = np.arange(self.num_promptsets)
        return np.asarray(self.iou_predictions, dtype=np.float32)[rows, np.asarray(self.branch_index, dtype=np.int64)]


def entry_checksum(entry: CacheEntry, feature_names: Iterable[str]) -> int:
    """CRC-32 over the entry's arrays, in a fixed order, exactly as stored (float16 etc.)."""
    crc = 0
    arrays = [entry.features[name] for name in feature_names]
    arrays += [entry.logits, entry.promptset_ids, entry.branch_index, entry.iou_predictions,
               np.asarray(entry.original_hw, np.int32), np.asarray(entry.input_hw, np.int32)]
    for array in arrays:
        crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1), crc)
    return zlib.crc32(entry.promptset_md5.encode("ascii"), crc)


def normalise_entry(entry: CacheEntry) -> CacheEntry:
    """Cast every array to its stored dtype so the checksum sees the stored bytes."""
    return CacheEntry(
        safe_id=entry.safe_id,
        split=entry.split,
        features={k: np.ascontiguousarray(v, dtype=np.float16) for k, v in entry.features.items()},
        logits=np.ascontiguousarray(entry.logits, dtype=np.float16),
        promptset_ids=np.ascontiguousarray(entry.promptset_ids, dtype=np.int32),
        branch_index=np.ascontiguousarray(entry.branch_index, dtype=np.int8),
        iou_predictions=np.ascontiguousarray(entry.iou_predictions, dtype=np.float32),
        original_hw=(int(entry.original_hw[0]), int(entry.original_hw[1])),
        input_hw=(int(entry.input_hw[0]), int(entry.input_hw[1])),
        promptset_md5=str(entry.promptset_md5),
    )


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ShardLayout:
    """What a shard file is created for; a file made for another layout is rebuilt.

    ``slots``: the shard's ``(split, safe_id)`` list in order; ``feature_shapes``: name ->
    ``(C, h, w)``; ``max_promptsets``: P; ``num_outputs``: M.
    """

    backbone_id: str
    family: str
    model_type: str
    checkpoint_md5: str
    shard_index: int
    shard_count: int
    slots: tuple[tuple[str, str], ...]
    feature_shapes: tuple[tuple[str, tuple[int, int, int]], ...]
    max_promptsets: int
    num_outputs: int

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.feature_shapes)

    def attrs(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "backbone_id": self.backbone_id,
            "family": self.family,
            "model_type": self.model_type,
            "checkpoint_md5": self.checkpoint_md5,
            "shard_index": self.shard_index,
            "shard_count": self.shard_count,
            "max_promptsets": self.max_promptsets,
            "num_outputs": self.num_outputs,
            "feature_names": json.dumps(list(self.feature_names)),
            "feature_shapes": json.dumps({name: list(shape) for name, shape in self.feature_shapes}),
        }



def create_shard_file(path: Path, layout: ShardLayout) -> None:
    """Write an empty, fully allocated shard file at ``path`` (the caller makes it atomic)."""
    n, p, m = len(layout.slots), layout.max_promptsets, layout.num_outputs
    with h5py.File(path, "w") as handle:
        handle.attrs.update(layout.attrs())
        slots = handle.create_group("slots")
        # Small tables first, so they sit at the front of the file (salvage of truncated files).
        for name, values in (("split", [s for s, _ in layout.slots]), ("safe_id", [i for _, i in layout.slots])):
            allocate_table(slots, name, fixed_bytes(values))
        entries = handle.create_group("entries")
        for name, shape, dtype in (
            ("complete", (n,), np.uint8),
            ("checksum", (n,), np.uint32),
            ("promptset_md5", (n,), f"S{MD5_BYTES}"),
            ("original_hw", (n, 2), np.int32),
            ("input_hw", (n, 2), np.int32),
            ("num_promptsets", (n,), np.int32),
            ("promptset_ids", (n, p), np.int32),
            ("branch_index", (n, p), np.int8),
            ("iou_predictions", (n, p, m), np.float32),
        ):
            allocate_dataset(entries, name, shape, dtype)
        features = handle.create_group("features")
        for name, (channels, height, width) in layout.feature_shapes:
            shape = (n, channels, height, width)
            allocate_rows(features, name, shape, np.float16, balanced=True)
        allocate_rows(handle, "logits", (n, p, FRAME256, FRAME256), np.float16, balanced=True)


def layout_mismatch(handle: h5py.File, layout: ShardLayout) -> str | None:
    """None when the open file was created for ``layout``, else what differs (one phrase)."""
    attrs = handle.attrs
    expected = layout.attrs()
    for key, value in expected.items():
        stored = attrs.get(key)
        if isinstance(stored, bytes):
            stored = stored.decode()
        if isinstance(stored, np.generic):
            stored = stored.item()
        if stored != value:
            return f"{key} is {stored!r}, expected {value!r}"
    stored_slots = list(zip(decode_strings(handle["slots/split"][:]), decode_strings(handle["slots/safe_id"][:])))
    if stored_slots != [tuple(s) for s in layout.slots]:
        return "its sample list differs from this shard's samples"
    return None


# --------------------------------------------------------------------------- reading one file


def read_entry(handle: h5py.File, slot: int, feature_names: Iterable[str]) -> CacheEntry:
    entries = handle["entries"]
    count = int(entries["num_promptsets"][slot])
    return CacheEntry(
        safe_id=handle["slots/safe_id"][slot].decode("utf-8"),
        split=handle["slots/split"][slot].decode("utf-8"),
        features={name: handle["features"][name][slot] for name in feature_names},
        logits=handle["logits"][slot, :count],
        promptset_ids=entries["promptset_ids"][slot, :count],
        branch_index=entries["branch_index"][slot, :count],
        iou_predictions=entries["iou_predictions"][slot, :count],
        original_hw=tuple(int(v) for v in entries["original_hw"][slot]),
        input_hw=tuple(int(v) for v in entries["input_hw"][slot]),
        promptset_md5=entries["promptset_md5"][slot].decode("ascii"),
    )


def stored_feature_names(handle: h5py.File) -> list[str]:
    return json.loads(handle.attrs["feature_names"])


def write_entry_rows(handle: h5py.File, slot: int, entry: CacheEntry, feature_names: tuple[str, ...]) -> int:
    """All rows of one entry except its completion flag; returns the checksum it stored."""
    entry = normalise_entry(entry)
    count = entry.num_promptsets
    for name in feature_names:
        handle["features"][name][slot] = entry.features[name]
    handle["logits"][slot, :count] = entry.logits
    entries = handle["entries"]
    entries["num_promptsets"][slot] = count
    entries["promptset_ids"][slot, :count] = entry.promptset_ids
    entries["branch_index"][slot, :count] = entry.branch_index
    entries["iou_predictions"][slot, :count] = entry.iou_predictions
    entries["original_hw"][slot] = entry.original_hw
    entries["input_hw"][slot] = entry.input_hw
    entries["promptset_md5"][slot] = entry.promptset_md5.encode("ascii")
    checksum = entry_checksum(entry, feature_names)
    entries["checksum"][slot] = checksum
    return checksum


def stored_entry_matches(handle: h5py.File, slot: int, feature_names: Iterable[str], checksum: int) -> bool:
    """The entry in ``slot`` reads back with ``checksum``, both recomputed from its arrays and as
    stored (the writer's check that what it wrote reached the file)."""
    names = list(feature_names)
    return (int(handle["entries/checksum"][slot]) == checksum
            and entry_checksum(read_entry(handle, slot, names), names) == checksum)


# --------------------------------------------------------------------------- reading


@dataclass
class _Location:
    path: Path
    slot: int


class SamCache:
    """All shard files of one cache folder, read as one (lazy, one handle per file and process).

    ``SamCache(project_root)`` picks the only backbone folder under ``<project_root>/sam_cache``
    (pass ``backbone`` when there are several); ``SamCache(cache_folder)`` reads that folder.
    Only complete entries are visible. When several shard files hold the same sample (left over
    from a run with another shard count), the most recently modified file wins.

    Safe to hand to DataLoader workers: handles are opened on first use in each process and are
    not pickled.
    """

    def __init__(self, root: str | os.PathLike, backbone: str | None = None):
        self.folder = self._resolve_folder(Path(root), backbone)
        self._index: dict[str, _Location] = {}
        self._feature_names: dict[Path, list[str]] = {}
        self._md5: dict[str, str] = {}
        self._split: dict[str, str] = {}
        for path in sorted(shard_files(self.folder), key=lambda p: p.stat().st_mtime_ns):
            try:
                with h5py.File(path, "r", locking=False) as handle:
                    names = stored_feature_names(handle)
                    safe_ids = decode_strings(handle["slots/safe_id"][:])
                    splits = decode_strings(handle["slots/split"][:])
                    complete = handle["entries/complete"][:]
                    md5s = handle["entries/promptset_md5"][:]
            except (OSError, KeyError, ValueError) as exc:
                log.warning("%s: unreadable shard file skipped (%s); rerun precompute_sam_outputs.py "
                            "to repair it", path, error_line(exc))
                continue
            self._feature_names[path] = names
            for slot, safe_id in enumerate(safe_ids):
                if complete[slot]:
                    self._index[safe_id] = _Location(path, slot)
                    self._md5[safe_id] = md5s[slot].decode("ascii")
                    self._split[safe_id] = splits[slot]
        self._handles: dict[Path, h5py.File] = {}
        self._pid = os.getpid()

    @staticmethod
    def _resolve_folder(root: Path, backbone: str | None) -> Path:
        if shard_files(root) or (root / BACKBONE_INFO_FILE).is_file():
            return root
        base = root / SAM_CACHE_DIR if (root / SAM_CACHE_DIR).is_dir() else root
        if backbone is not None:
            folder = base / backbone
            if not folder.is_dir():
                raise SamCacheError(f"{folder}: no SAM cache for backbone {backbone!r}")
            return folder
        candidates = sorted(p for p in base.iterdir() if p.is_dir() and shard_files(p)) if base.is_dir() else []
        if not candidates:
            raise SamCacheError(f"{base}: no SAM cache found; run precompute_sam_outputs.py first")
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise SamCacheError(f"{base}: several backbone caches ({names}); choose one with backbone=")
        return candidates[0]

    # ----------------------------------------------------------- index

    def __contains__(self, safe_id: str) -> bool:
        return safe_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def sample_ids(self, split: str | None = None) -> list[str]:
        """Safe ids of the complete entries (of one split if given), sorted."""
        return sorted(s for s in self._index if split is None or self._split[s] == split)

    def promptset_md5(self, safe_id: str) -> str:
        return self._md5[safe_id]

    def info(self) -> dict:
        """The folder's ``backbone.json`` (family, model type, checkpoint md5, feature shapes)."""
        return json.loads((self.folder / BACKBONE_INFO_FILE).read_text(encoding="utf-8"))

    # ----------------------------------------------------------- entries

    def _handle(self, path: Path) -> h5py.File:
        if os.getpid() != self._pid:  # a forked DataLoader worker must not share the parent's handles
            self._handles = {}
            self._pid = os.getpid()
        handle = self._handles.get(path)
        if handle is None:
            handle = self._handles[path] = h5py.File(path, "r", locking=False)
        return handle

    def entry(self, safe_id: str, verify: bool = True) -> CacheEntry:
        """The cached outputs of one image, checked against the CRC-32 stored with it.

        Every reader that feeds packing, training or evaluation goes through here, so flipped
        bytes are a one-line ``SamCacheError`` naming the shard file and the entry instead of
        silently wrong data (its cost: README, "Checksums"). ``verify=False`` skips it (only for
        diagnostics).
        """
        location = self._index.get(safe_id)
        if location is None:
            raise KeyError(f"{safe_id}: not in the SAM cache {self.folder}")
        handle = self._handle(location.path)
        names = self._feature_names[location.path]
        try:
            entry = read_entry(handle, location.slot, names)
            stored = int(handle["entries/checksum"][location.slot]) if verify else None
        except (OSError, KeyError, ValueError) as exc:
            raise SamCacheError(f"{location.path}: entry {safe_id} unreadable ({error_line(exc)}); "
                                "rerun precompute_sam_outputs.py to repair the cache") from None
        if verify and entry_checksum(entry, names) != stored:
            raise SamCacheError(f"{location.path}: entry {safe_id} fails its checksum (damaged data); "
                                "rerun precompute_sam_outputs.py to repair the cache")
        return entry

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
