"""The SAM output cache: one HDF5 file per shard, written crash-safely, read as one.

Only this module knows the HDF5 layout. Stage 3 (``modules/precompute.py``) writes through
``ShardWriter``; every later stage reads through ``SamCache``.

Folder: ``<project_root>/sam_cache/<backbone_id>/`` with ``backbone_id =
"<family>-<model_type>-<first 12 hex of the checkpoint md5>"``, so a different checkpoint or
model type always gets its own folder and never mixes into an existing cache. In it:

- ``shard-III-of-NNN.h5``: the entries of one shard (``III`` = shard index, ``NNN`` = count);
- ``shard-III-of-NNN.manifest.csv``: the cache manifest of that shard, one row per entry
  (safe_id, split, shard file, slot, complete, prompt-set md5, backbone id, checkpoint md5);
- ``backbone.json``: family, model type, checkpoint path and md5, feature shapes.

Shard file layout (N slots = the shard's samples, fixed when the file is created; P = the most
prompt sets any sample may have; M = decoder outputs per prompt set, 3 for ``best_iou``, 1 for
``single``)::

    attrs                        format_version, backbone_id, family, model_type, checkpoint_md5,
                                 shard_index, shard_count, max_promptsets, num_outputs,
                                 feature_names / feature_shapes (JSON)
    slots/safe_id, slots/split   N fixed-length byte strings (written once, at creation)
    entries/complete             N uint8, the completion flag, written LAST for every entry
    entries/checksum             N uint32, CRC-32 of the entry's arrays (see ``entry_checksum``)
    entries/promptset_md5        N x 32 bytes, md5 of the prompt-set JSON the entry came from
    entries/original_hw          N x 2 int32 (H, W) of the ORIGINAL image
    entries/input_hw             N x 2 int32 (h, w) of the resized image inside the encoder input
    entries/num_promptsets       N int32 (p <= P valid rows in the per-prompt-set arrays)
    entries/promptset_ids        N x P int32
    entries/branch_index         N x P int8, the decoder output chosen per prompt set
    entries/iou_predictions      N x P x M float32, ALL predicted IoUs
    features/<name>              N x C x h x w float16 (SAM: image_embed 256 x 64 x 64; SAM 2
                                 also high_res_feat0 32 x 256 x 256, high_res_feat1 64 x 128 x 128)
    logits                       N x P x 256 x 256 float16, FRAME256 low-resolution logits

Crash safety. HDF5 has no journal: a writer killed while HDF5 updates its own metadata (group
B-trees, heaps, chunk indexes) can leave a file that no longer opens, losing earlier entries
too. So a shard file is created complete and atomically (temporary file, then ``os.replace``)
with EVERY dataset allocated at creation (``ALLOC_TIME_EARLY``, fixed shapes, fixed-length
strings). Afterwards the writer only overwrites raw bytes in place; HDF5's metadata never
changes again, so killing the writer at any moment can only leave an entry whose flag is still
0. Per batch: data rows -> ``flush`` -> flags -> ``flush``. Reusing a slot (a changed prompt-set
file) first clears its flag and flushes. A file that is truncated or does not open is salvaged:
``salvage_entries`` reads what it can (a truncated file is first padded back to the length its
superblock records), keeps complete entries whose checksum still matches, and the writer builds
a fresh file from them; only the rest is recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np

from modules.core.errors import PipelineError
from modules.core.fileio import atomic_path, atomic_write_json, atomic_write_text
from modules.core.errors import error_line
from modules.core.frames import FRAME256
from modules.core.paths import SAM_CACHE_DIR, cache_dir

log = logging.getLogger("pipeline.sam_cache")

FORMAT_VERSION = 1
MD5_BYTES = 32
#: h5py's advice: chunks between 10 KiB and 1 MiB.
MAX_CHUNK_BYTES = 1 << 20
SHARD_PATTERN = re.compile(r"^shard-(\d{3,})-of-(\d{3,})\.h5$")
BACKBONE_INFO_FILE = "backbone.json"


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
    """Everything cached for one image (numpy arrays; frames as in the module docstring).

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


def entry_checksum(entry: CacheEntry, feature_names: Iterable[str]) -> int:
    """CRC-32 over the entry's arrays, in a fixed order, exactly as stored (float16 etc.)."""
    crc = 0
    arrays = [entry.features[name] for name in feature_names]
    arrays += [entry.logits, entry.promptset_ids, entry.branch_index, entry.iou_predictions,
               np.asarray(entry.original_hw, np.int32), np.asarray(entry.input_hw, np.int32)]
    for array in arrays:
        crc = zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1), crc)
    return zlib.crc32(entry.promptset_md5.encode("ascii"), crc)


def _normalise_entry(entry: CacheEntry) -> CacheEntry:
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


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk ``(1, k, *rest)`` of an ``N x K x ...`` dataset: K split into equal chunks of
    at most 1 MiB (e.g. K = 10 logit maps of 128 KiB -> two chunks of 5, not 8 + 8 with 6 unused)."""
    per_row = int(np.prod(shape[2:], dtype=np.int64)) * itemsize
    largest = max(1, min(shape[1], MAX_CHUNK_BYTES // max(per_row, 1)))
    num_chunks = -(-shape[1] // largest)
    return (1, -(-shape[1] // num_chunks), *shape[2:])


def _create_allocated(group: h5py.Group, name: str, shape: tuple[int, ...], dtype,
                      chunks: tuple[int, ...] | None = None) -> None:
    """A dataset whose storage is allocated now (so later writes never touch HDF5 metadata).

    Contiguous small tables are zero-filled at allocation; chunked bulk arrays are left
    unfilled (their rows only count once the entry's flag is set).
    """
    space = h5py.h5s.create_simple(tuple(shape))
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if chunks is not None:
        dcpl.set_chunk(tuple(chunks))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER if chunks is not None else h5py.h5d.FILL_TIME_ALLOC)
    type_id = h5py.h5t.py_create(np.dtype(dtype))
    h5py.h5d.create(group.id, name.encode(), type_id, space, dcpl=dcpl)


def _fixed_bytes(values: Iterable[str]) -> np.ndarray:
    encoded = [v.encode("utf-8") for v in values]
    width = max([len(v) for v in encoded] + [1])
    return np.array(encoded, dtype=f"S{width}")


def _create_shard_file(path: Path, layout: ShardLayout) -> None:
    """Write an empty, fully allocated shard file at ``path`` (the caller makes it atomic)."""
    n, p, m = len(layout.slots), layout.max_promptsets, layout.num_outputs
    with h5py.File(path, "w") as handle:
        handle.attrs.update(layout.attrs())
        slots = handle.create_group("slots")
        # Small tables first, so they sit at the front of the file (salvage of truncated files).
        for name, values in (("split", [s for s, _ in layout.slots]), ("safe_id", [i for _, i in layout.slots])):
            array = _fixed_bytes(values)
            _create_allocated(slots, name, (n,), array.dtype)
            if n:
                slots[name][...] = array
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
            _create_allocated(entries, name, shape, dtype)
        features = handle.create_group("features")
        for name, (channels, height, width) in layout.feature_shapes:
            shape = (n, channels, height, width)
            _create_allocated(features, name, shape, np.float16, _chunk_shape(shape, 2) if n else None)
        shape = (n, p, FRAME256, FRAME256)
        _create_allocated(handle, "logits", shape, np.float16, _chunk_shape(shape, 2) if n else None)


def _layout_matches(handle: h5py.File, layout: ShardLayout) -> str | None:
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
    stored_slots = list(zip(_decode_strings(handle["slots/split"][:]), _decode_strings(handle["slots/safe_id"][:])))
    if stored_slots != [tuple(s) for s in layout.slots]:
        return "its sample list differs from this shard's samples"
    return None


def _decode_strings(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8") for v in values]


# --------------------------------------------------------------------------- reading one file


def _read_entry(handle: h5py.File, slot: int, feature_names: Iterable[str]) -> CacheEntry:
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


def _feature_names(handle: h5py.File) -> list[str]:
    return json.loads(handle.attrs["feature_names"])


_STORED_EOF = re.compile(r"stored_eof = (\d+)")



class _ReadableCopy:
    """Open a possibly damaged shard file read-only, padding a truncated copy if needed.

    A truncated HDF5 file refuses to open (``truncated file: ... stored_eof = N``). Padding a
    copy back to ``N`` bytes with zeros makes it open; whatever was cut off reads as zeros and
    fails its entry checksum, so only intact entries survive a salvage.
    """

    def __init__(self, path: Path):
        self.path = path
        self.handle: h5py.File | None = None
        self.problem: str | None = None
        self._padded: Path | None = None

    def __enter__(self) -> "_ReadableCopy":
        try:
            self.handle = h5py.File(self.path, "r", locking=False)
            return self
        except OSError as exc:
            self.problem = error_line(exc)
            match = _STORED_EOF.search(str(exc))
        if match is None:
            return self
        fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".salvage", dir=self.path.parent)
        os.close(fd)
        self._padded = Path(name)
        shutil.copyfile(self.path, self._padded)
        os.truncate(self._padded, int(match.group(1)))
        try:
            self.handle = h5py.File(self._padded, "r", locking=False)
        except OSError as exc:
            self.problem += f"; padded copy unreadable too ({error_line(exc)})"
        return self

    def __exit__(self, *exc_info) -> None:
        if self.handle is not None:
            self.handle.close()
        if self._padded is not None:
            self._padded.unlink(missing_ok=True)


def salvage_entries(path: Path, wanted: dict[str, str]) -> Iterator[CacheEntry]:
    """Complete, checksum-verified entries of a (possibly damaged) shard file.

    ``wanted``: safe_id -> the md5 its prompt-set file has now; other entries, and entries made
    from another prompt-set file, are skipped. Unreadable entries are skipped silently (the
    caller recomputes whatever is not yielded).
    """
    with _ReadableCopy(path) as source:
        handle = source.handle
        if handle is None:
            return
        try:
            names = _feature_names(handle)
            safe_ids = _decode_strings(handle["slots/safe_id"][:])
            complete = handle["entries/complete"][:]
            md5s = handle["entries/promptset_md5"][:]
            checksums = handle["entries/checksum"][:]
        except (OSError, KeyError, ValueError) as exc:
            log.warning("%s: cannot read its tables (%s); nothing salvaged", path, error_line(exc))
            return
        for slot, safe_id in enumerate(safe_ids):
            if not complete[slot] or wanted.get(safe_id) != md5s[slot].decode("ascii", "replace"):
                continue
            try:
                entry = _read_entry(handle, slot, names)
            except (OSError, KeyError, ValueError, UnicodeDecodeError):
                continue
            if entry_checksum(entry, names) == int(checksums[slot]):
                yield entry


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes the entries of one shard into its HDF5 file (see the module docstring).

    ``ShardWriter.open(folder, layout, promptset_md5s)`` uses an existing file made for the same
    layout in place; otherwise (missing, truncated, corrupt, other samples or shapes) it builds a
    fresh file atomically, salvaging every still-valid entry of the old file and of the other
    shard files in the folder (e.g. after a change of shard count). ``messages`` says what was
    found and done, for the stage to print.
    """

    def __init__(self, path: Path, layout: ShardLayout, handle: h5py.File, messages: list[str]):
        self.path = path
        self.layout = layout
        self.messages = messages
        self._handle = handle
        self._slot_of = {safe_id: slot for slot, (_, safe_id) in enumerate(layout.slots)}
        entries = handle["entries"]
        self._complete = entries["complete"][:].astype(bool)
        self._md5 = [v.decode("ascii", "replace") for v in entries["promptset_md5"][:]]

    # ----------------------------------------------------------- opening

    @classmethod
    def open(cls, folder: Path, layout: ShardLayout, promptset_md5s: dict[str, str],
             rebuild: bool = False) -> "ShardWriter":
        """The writer of ``layout``'s shard file in ``folder``.

        ``promptset_md5s``: safe_id -> current md5 of its prompt-set file (entries made from
        another file are not salvaged). ``rebuild``: start from an empty file (``--force``).
        """
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / shard_file_name(layout.shard_index, layout.shard_count)
        messages: list[str] = []
        if path.is_file() and not rebuild:
            try:
                handle = h5py.File(path, "r+")
            except OSError as exc:
                if "unable to lock file" in str(exc).lower():
                    raise SamCacheError(f"{path}: open by another writer ({error_line(exc)})") from None
                messages.append(f"{path.name}: truncated or corrupt HDF5 file ({error_line(exc)}); "
                                "salvaging its complete entries into a fresh file")
            else:
                try:
                    mismatch = _layout_matches(handle, layout)
                except (OSError, KeyError, ValueError) as exc:
                    mismatch = f"unreadable tables ({error_line(exc)})"
                if mismatch is None:
                    return cls(path, layout, handle, messages)
                handle.close()
                messages.append(f"{path.name}: made for another layout ({mismatch}); "
                                "rebuilding it, keeping the entries that are still valid")
        sources = [] if rebuild else [path] * path.is_file() + [p for p in shard_files(folder) if p != path]
        salvaged = cls._build(path, layout, promptset_md5s, sources)
        if sources:
            messages.append(f"{path.name}: {salvaged} complete entries kept from {len(sources)} file(s)")
        return cls(path, layout, h5py.File(path, "r+"), messages)

    @staticmethod
    def _build(path: Path, layout: ShardLayout, promptset_md5s: dict[str, str], sources: list[Path]) -> int:
        """Create ``path`` for ``layout`` atomically, copying valid entries from ``sources``."""
        wanted = {safe_id: promptset_md5s[safe_id] for _, safe_id in layout.slots if safe_id in promptset_md5s}
        slot_of = {safe_id: slot for slot, (_, safe_id) in enumerate(layout.slots)}
        shapes = dict(layout.feature_shapes)
        copied = 0
        with atomic_path(path) as tmp:
            _create_shard_file(tmp, layout)
            with h5py.File(tmp, "r+") as handle:
                for source in sources:
                    for entry in salvage_entries(source, wanted):
                        if entry.num_promptsets > layout.max_promptsets or any(
                            tuple(entry.features.get(n, np.empty(0)).shape) != shapes[n] for n in shapes
                        ):
                            continue
                        _write_entry_rows(handle, slot_of[entry.safe_id], entry, layout.feature_names)
                        handle["entries/complete"][slot_of[entry.safe_id]] = 1
                        wanted.pop(entry.safe_id)
                        copied += 1
        return copied

    # ----------------------------------------------------------- state

    def is_complete(self, safe_id: str, promptset_md5: str) -> bool:
        """The entry exists, its flag is set, and it was made from this prompt-set file."""
        slot = self._slot_of.get(safe_id)
        return slot is not None and bool(self._complete[slot]) and self._md5[slot] == promptset_md5

    def invalidate(self, safe_ids: Iterable[str]) -> int:
        """Clear the flags of these (stale) entries before their slots are overwritten."""
        slots = sorted(self._slot_of[s] for s in safe_ids if self._complete[self._slot_of[s]])
        for slot in slots:
            self._handle["entries/complete"][slot] = 0
            self._complete[slot] = False
        if slots:
            self._handle.flush()
        return len(slots)

    # ----------------------------------------------------------- writing

    def write_batch(self, entries: list[CacheEntry], before_flags=None) -> None:
        """Write a batch of entries: all data rows, flush, then the flags, flush.

        ``before_flags``: optional callable run between the two flushes (a test hook).
        """
        if not entries:
            return
        slots = []
        for entry in entries:
            slot = self._slot_of.get(entry.safe_id)
            if slot is None:
                raise SamCacheError(f"{self.path}: {entry.safe_id} is not a sample of this shard")
            if self._complete[slot]:
                self.invalidate([entry.safe_id])
            if entry.num_promptsets > self.layout.max_promptsets:
                raise SamCacheError(f"{self.path}: {entry.safe_id} has {entry.num_promptsets} prompt sets, "
                                    f"the cache holds at most {self.layout.max_promptsets}")
            _write_entry_rows(self._handle, slot, entry, self.layout.feature_names)
            slots.append((slot, entry.promptset_md5))
        self._handle.flush()
        if before_flags is not None:
            before_flags()
        flags = self._handle["entries/complete"]
        for slot, md5 in slots:
            flags[slot] = 1
            self._complete[slot] = True
            self._md5[slot] = md5
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def manifest_rows(self) -> list[dict]:
        """The cache manifest rows of this shard (one per slot)."""
        return [
            {"safe_id": safe_id, "split": split, "shard_file": self.path.name, "slot": slot,
             "complete": int(self._complete[slot]), "promptset_md5": self._md5[slot] if self._complete[slot] else "",
             "backbone_id": self.layout.backbone_id, "checkpoint_md5": self.layout.checkpoint_md5}
            for slot, (split, safe_id) in enumerate(self.layout.slots)
        ]

    def write_manifest(self) -> Path:
        """``shard-III-of-NNN.manifest.csv`` beside the shard file, written atomically."""
        import pandas as pd

        path = self.path.with_suffix(".manifest.csv")
        atomic_write_text(path, pd.DataFrame(self.manifest_rows()).to_csv(index=False))
        return path


def _write_entry_rows(handle: h5py.File, slot: int, entry: CacheEntry, feature_names: tuple[str, ...]) -> None:
    """All rows of one entry except its completion flag."""
    entry = _normalise_entry(entry)
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
    entries["checksum"][slot] = entry_checksum(entry, feature_names)


def write_backbone_info(folder: Path, info: dict) -> None:
    """``backbone.json`` (rewritten only when it changes; shards write the same content)."""
    path = folder / BACKBONE_INFO_FILE
    try:
        if json.loads(path.read_text(encoding="utf-8")) == info:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, info)


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
    not pickled. ``as_torch=True`` returns torch tensors instead of numpy arrays.
    """

    def __init__(self, root: str | os.PathLike, backbone: str | None = None, as_torch: bool = False):
        self.folder = self._resolve_folder(Path(root), backbone)
        self.as_torch = as_torch
        self._index: dict[str, _Location] = {}
        self._feature_names: dict[Path, list[str]] = {}
        self._md5: dict[str, str] = {}
        self._split: dict[str, str] = {}
        for path in sorted(shard_files(self.folder), key=lambda p: p.stat().st_mtime_ns):
            try:
                with h5py.File(path, "r", locking=False) as handle:
                    names = _feature_names(handle)
                    safe_ids = _decode_strings(handle["slots/safe_id"][:])
                    splits = _decode_strings(handle["slots/split"][:])
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

    def entry(self, safe_id: str, verify: bool = False) -> CacheEntry:
        """The cached outputs of one image; ``verify`` recomputes the checksum (slow)."""
        location = self._index.get(safe_id)
        if location is None:
            raise KeyError(f"{safe_id}: not in the SAM cache {self.folder}")
        handle = self._handle(location.path)
        names = self._feature_names[location.path]
        try:
            entry = _read_entry(handle, location.slot, names)
            stored = int(handle["entries/checksum"][location.slot]) if verify else None
        except (OSError, KeyError, ValueError) as exc:
            raise SamCacheError(f"{location.path}: entry {safe_id} unreadable ({error_line(exc)}); "
                                "rerun precompute_sam_outputs.py to repair the cache") from None
        if verify and entry_checksum(entry, names) != stored:
            raise SamCacheError(f"{location.path}: entry {safe_id} fails its checksum; "
                                "rerun precompute_sam_outputs.py to repair the cache")
        if self.as_torch:
            import torch

            entry.features = {k: torch.from_numpy(v) for k, v in entry.features.items()}
            for name in ("logits", "promptset_ids", "branch_index", "iou_predictions"):
                setattr(entry, name, torch.from_numpy(getattr(entry, name)))
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
