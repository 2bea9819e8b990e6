"""HDF5 datasets allocated at creation, so that writing rows later never changes file metadata.

Both crash-safe writers (the SAM cache shards and the packed splits) create every dataset through
``allocate_dataset``: fixed shape, storage allocated now, no compression. Afterwards only raw
bytes are overwritten in place, so a killed writer can leave unflagged rows but never a file
whose metadata is half-written.
"""

from __future__ import annotations

from typing import Iterable

import h5py
import numpy as np

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


def fixed_bytes(values: Iterable[str]) -> np.ndarray:
    """UTF-8 strings as one fixed-length byte-string array (width of the longest, at least 1)."""
    encoded = [v.encode("utf-8") for v in values]
    width = max([len(v) for v in encoded] + [1])
    return np.array(encoded, dtype=f"S{width}")


def decode_strings(values: np.ndarray) -> list[str]:
    """A fixed-length byte-string array back to ``str`` (UTF-8)."""
    return [v.decode("utf-8") for v in values]
