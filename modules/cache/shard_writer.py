"""Writing one shard of the SAM cache (stage 3) crash-safely, and salvaging damaged shard files.

``ShardWriter`` only overwrites bytes of a fully allocated file whose disk blocks are reserved
(``hdf5_rows.open_for_row_writes``): data rows, sync, read back and check each entry's CRC, then the
flags, sync (``write_entries``). A full disk or a lost write is a ``StorageError`` naming the shard
file, and no entry is flagged whose data is not on disk. A shard file that is truncated, corrupt or
made for another layout is rebuilt atomically from the entries that still pass their checksum, so
only the rest is recomputed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np
import pandas as pd

from modules.cache.hdf5_rows import decode_strings, open_for_row_writes, sync_file
from modules.cache.sam_cache import (
    BACKBONE_INFO_FILE,
    CacheEntry,
    SamCacheError,
    ShardLayout,
    create_shard_file,
    entry_checksum,
    layout_mismatch,
    read_entry,
    shard_file_name,
    shard_files,
    stored_entry_matches,
    stored_feature_names,
    write_entry_rows,
)
from modules.core.errors import error_line
from modules.core.fileio import (
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    lost_write_error,
    storage_error,
    storage_faults,
)

log = logging.getLogger("pipeline.sam_cache")

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
        try:
            shutil.copyfile(self.path, self._padded)
            os.truncate(self._padded, int(match.group(1)))
        except BaseException:  # a full disk: the partial copy must not stay and hold the space
            self._padded.unlink(missing_ok=True)
            raise
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
            names = stored_feature_names(handle)
            safe_ids = decode_strings(handle["slots/safe_id"][:])
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
                entry = read_entry(handle, slot, names)
            except (OSError, KeyError, ValueError, UnicodeDecodeError):
                continue
            if entry_checksum(entry, names) == int(checksums[slot]):
                yield entry


def drop_damaged_entries(handle: h5py.File) -> list[str]:
    """Clear the completion flag of every complete entry of an open (``r+``) shard file that fails
    its checksum or does not read, so a rerun recomputes exactly those; their safe ids."""
    names = stored_feature_names(handle)
    safe_ids = decode_strings(handle["slots/safe_id"][:])
    flags = handle["entries/complete"]
    complete = flags[:]
    checksums = handle["entries/checksum"][:]
    dropped = []
    for slot, safe_id in enumerate(safe_ids):
        if not complete[slot]:
            continue
        try:
            intact = entry_checksum(read_entry(handle, slot, names), names) == int(checksums[slot])
        except (OSError, KeyError, ValueError):
            intact = False
        if not intact:
            flags[slot] = 0
            dropped.append(safe_id)
    if dropped:
        handle.flush()
    return dropped


# --------------------------------------------------------------------------- writing


def write_entries(handle: h5py.File, path: Path, items: list[tuple[int, CacheEntry]],
                  feature_names: tuple[str, ...], before_flags=None, durable: bool = True) -> None:
    """Write ``items`` (``(slot, entry)``) into an open shard file, durable first, flagged last.

    Data rows, sync, read every entry back and check its CRC, then the flags, sync, read them back.
    A failed write (a full disk) or a read-back mismatch raises a ``StorageError`` naming ``path``
    before any flag of ``items`` is written. ``durable=False`` skips the syncs (a file that is synced
    before it is published, ``atomic_path``). ``before_flags``: a callable run before the flags (a
    test hook).
    """
    with storage_faults(path):
        checksums = [write_entry_rows(handle, slot, entry, feature_names) for slot, entry in items]
        if durable:
            sync_file(handle)
        for (slot, entry), checksum in zip(items, checksums):
            if not stored_entry_matches(handle, slot, feature_names, checksum):
                raise lost_write_error(path, f"entry {entry.safe_id}")
        if before_flags is not None:
            before_flags()
        flags = handle["entries/complete"]
        for slot, _ in items:
            flags[slot] = 1
        if durable:
            sync_file(handle)
        stored = flags[:]
        for slot, entry in items:
            if stored[slot] != 1:
                raise lost_write_error(path, f"the completion flag of entry {entry.safe_id}")


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
                handle = open_for_row_writes(path)
            except OSError as exc:
                fault = storage_error(exc, path)
                if fault is not None:  # not damage: rebuilding would fail the same way
                    raise fault from None
                messages.append(f"{path.name}: truncated or corrupt HDF5 file ({error_line(exc)}); "
                                "salvaging its complete entries into a fresh file")
            else:
                try:
                    mismatch = layout_mismatch(handle, layout)
                except (OSError, KeyError, ValueError) as exc:
                    mismatch = f"unreadable tables ({error_line(exc)})"
                if mismatch is None:
                    with storage_faults(path):
                        dropped = drop_damaged_entries(handle)
                    if dropped:
                        messages.append(f"{path.name}: {len(dropped)} complete entries fail their checksum "
                                        f"({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}); "
                                        "recomputing them")
                    return cls(path, layout, handle, messages)
                handle.close()
                messages.append(f"{path.name}: made for another layout ({mismatch}); "
                                "rebuilding it, keeping the entries that are still valid")
        sources = [] if rebuild else [path] * path.is_file() + [p for p in shard_files(folder) if p != path]
        salvaged = cls._build(path, layout, promptset_md5s, sources)
        if sources:
            messages.append(f"{path.name}: {salvaged} complete entries kept from {len(sources)} file(s)")
        return cls(path, layout, open_for_row_writes(path), messages)

    @classmethod
    def reopen(cls, path: Path, layout: ShardLayout) -> "ShardWriter":
        """The writer of a shard file that ``open`` prepared (disk blocks reserved) and closed, opened
        again as it is: no layout check, salvage or second reservation (the stage, holding the
        file's lock, hands it to its writer process and takes it back for the manifest)."""
        return cls(path, layout, open_for_row_writes(path, reserve=False), [])

    @staticmethod
    def _build(path: Path, layout: ShardLayout, promptset_md5s: dict[str, str], sources: list[Path]) -> int:
        """Create ``path`` for ``layout`` atomically, copying valid entries from ``sources``."""
        wanted = {safe_id: promptset_md5s[safe_id] for _, safe_id in layout.slots if safe_id in promptset_md5s}
        slot_of = {safe_id: slot for slot, (_, safe_id) in enumerate(layout.slots)}
        shapes = dict(layout.feature_shapes)
        copied = 0
        with atomic_path(path) as tmp:
            create_shard_file(tmp, layout)
            with open_for_row_writes(tmp) as handle:
                for source in sources:
                    for entry in salvage_entries(source, wanted):
                        if entry.num_promptsets > layout.max_promptsets or any(
                            tuple(entry.features.get(n, np.empty(0)).shape) != shapes[n] for n in shapes
                        ):
                            continue
                        # Not synced entry by entry: atomic_path syncs the file before publishing it.
                        write_entries(handle, path, [(slot_of[entry.safe_id], entry)], layout.feature_names,
                                      durable=False)
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
        with storage_faults(self.path):
            for slot in slots:
                self._handle["entries/complete"][slot] = 0
                self._complete[slot] = False
            if slots:
                self._handle.flush()
        return len(slots)

    # ----------------------------------------------------------- writing

    def write_batch(self, entries: list[CacheEntry], before_flags=None) -> None:
        """Write a batch of entries durably, then flag them (``write_entries``): on a full disk or a
        lost write, a ``StorageError`` naming the shard file, and none of the batch is flagged.

        ``before_flags``: optional callable run after the data is on disk, before the flags (a test hook).
        """
        if not entries:
            return
        items = []
        for entry in entries:
            slot = self._slot_of.get(entry.safe_id)
            if slot is None:
                raise SamCacheError(f"{self.path}: {entry.safe_id} is not a sample of this shard")
            if self._complete[slot]:
                self.invalidate([entry.safe_id])
            if entry.num_promptsets > self.layout.max_promptsets:
                raise SamCacheError(f"{self.path}: {entry.safe_id} has {entry.num_promptsets} prompt sets, "
                                    f"the cache holds at most {self.layout.max_promptsets}")
            items.append((slot, entry))
        write_entries(self._handle, self.path, items, self.layout.feature_names, before_flags)
        for slot, entry in items:
            self._complete[slot] = True
            self._md5[slot] = entry.promptset_md5

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
        path = self.path.with_suffix(".manifest.csv")
        atomic_write_text(path, pd.DataFrame(self.manifest_rows()).to_csv(index=False))
        return path


def write_backbone_info(folder: Path, info: dict) -> None:
    """``backbone.json`` (rewritten only when it changes; shards write the same content)."""
    path = folder / BACKBONE_INFO_FILE
    try:
        if json.loads(path.read_text(encoding="utf-8")) == info:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(path, info)
