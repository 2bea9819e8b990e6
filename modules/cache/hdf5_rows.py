"""HDF5 datasets allocated at creation, so that writing rows later never changes file metadata.

Both crash-safe writers (the SAM cache shards and the packed splits) create every dataset through
``allocate_dataset``: fixed shape, storage allocated now, no compression. Afterwards only raw
bytes are overwritten in place, so a killed writer can leave unflagged rows but never a file
whose metadata is half-written.

Durable, then flagged: a writer opens its file with ``open_for_row_writes`` (disk blocks reserved,
no HDF5 write caches, so a failed write raises at the write instead of being swallowed when h5py
frees a dataset), writes a batch's rows, ``sync_file``, reads them back and checks their CRC, and
only then writes the completion flags and syncs again. A row whose flag is set is therefore on disk
and verified.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import h5py
import numpy as np

from modules.core.fileio import reserve_space, storage_faults

#: h5py's advice: chunks between 10 KiB and 1 MiB.
MAX_CHUNK_BYTES = 1 << 20


def row_chunks(shape: tuple[int, ...], itemsize: int, balanced: bool = False) -> tuple[int, ...]:
    """Chunk ``(1, k, *rest)`` of an ``N x K x ...`` dataset: one row, at most ``MAX_CHUNK_BYTES``.

    ``k`` is as large as fits; ``balanced=True`` instead splits K into equal chunks (e.g. K = 10
    maps of 128 KiB -> two chunks of 5, not 8 + 8 with 6 unused).
    """
    per_item = int(np.prod(shape[2:], dtype=np.int64)) * itemsize
    k = max(1, min(shape[1], MAX_CHUNK_BYTES // max(per_item, 1)))
    if balanced:
        num_chunks = -(-shape[1] // k)
        k = -(-shape[1] // num_chunks)
    return (1, k, *shape[2:])


def allocate_dataset(group: h5py.Group, name: str, shape: tuple[int, ...], dtype,
                     chunks: tuple[int, ...] | None = None) -> None:
    """A dataset whose file space is allocated now.

    Chunked bulk arrays are not filled (a row only counts once its flag is set); contiguous
    small tables (``chunks=None``) are zero-filled at allocation.
    """
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if chunks is not None:
        dcpl.set_chunk(tuple(chunks))
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER if chunks is not None else h5py.h5d.FILL_TIME_ALLOC)
    space = h5py.h5s.create_simple(tuple(shape))
    h5py.h5d.create(group.id, name.encode(), h5py.h5t.py_create(np.dtype(dtype)), space, dcpl=dcpl)


def allocate_rows(group: h5py.Group, name: str, shape: tuple[int, ...], dtype, balanced: bool = False) -> None:
    """A bulk ``N x K x ...`` array chunked by ``row_chunks`` (contiguous when it has no rows)."""
    chunks = row_chunks(shape, np.dtype(dtype).itemsize, balanced) if shape[0] > 0 else None
    allocate_dataset(group, name, shape, dtype, chunks)


def allocate_table(group: h5py.Group, name: str, values: np.ndarray) -> None:
    """A contiguous, allocated dataset holding ``values`` (written once, at creation)."""
    allocate_dataset(group, name, values.shape, values.dtype)
    if values.size:
        group[name][...] = values


def open_for_row_writes(path: str | os.PathLike, reserve: bool = True) -> h5py.File:
    """Open an allocated file ``r+`` for in-place row writes, after reserving its disk blocks
    (``reserve=False``: they were reserved by an earlier open and the length has not changed since).

    The raw-data chunk cache and the sieve buffer are off: with them on, HDF5 writes a row when it
    evicts it or closes the dataset, where h5py reports a failure (a full disk) only as an ignored
    exception, and the row later reads back as zeros. The writers write whole rows, so the caches
    would save nothing. HDF5's own file lock is off: the stage's output lock (``core.locks``) already
    guarantees one writer, and HDF5's lock, inherited by forked DataLoader workers, is what an
    orphaned worker kept after a SIGKILL.
    """
    path = Path(path)
    if reserve:
        reserve_space(path)
    with storage_faults(path):
        fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
        fapl.set_fclose_degree(h5py.h5f.CLOSE_STRONG)  # what h5py.File sets: close frees every object
        fapl.set_cache(0, 0, 0, 0.0)  # no raw-data chunk cache
        fapl.set_sieve_buf_size(0)
        fapl.set_file_locking(False, True)
        return h5py.File(h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl))


def sync_file(handle: h5py.File) -> None:
    """Flush HDF5's buffers and ``fsync`` the file: what was written is on disk when this returns."""
    handle.flush()
    os.fsync(handle.id.get_vfd_handle())


def fixed_bytes(values: Iterable[str]) -> np.ndarray:
    """UTF-8 strings as one fixed-length byte-string array (width of the longest, at least 1)."""
    encoded = [v.encode("utf-8") for v in values]
    width = max([len(v) for v in encoded] + [1])
    return np.array(encoded, dtype=f"S{width}")


def decode_strings(values: np.ndarray) -> list[str]:
    """A fixed-length byte-string array back to ``str`` (UTF-8)."""
    return [v.decode("utf-8") for v in values]
