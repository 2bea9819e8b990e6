"""The packed splits as training data: ``PackedSplitDataset`` (items) and ``PackedBatches`` (batches).

Both read ``<split>.h5`` as written by ``cache.packing``; file handles open lazily, once per
process, so the datasets are safe in forked or spawned ``DataLoader`` workers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from modules.cache.hdf5_rows import decode_strings
from modules.cache.packing import PACK_FORMAT_VERSION, row_checksum
from modules.cache.training_index import PackingError, read_index_csv
from modules.core.config import PipelineConfig
from modules.core.paths import packed_path

#: ``in_memory="auto"`` loads a split when its arrays take less than this share of available RAM.
IN_MEMORY_FRACTION = 0.25


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

    Integrity: every row carries a CRC-32 of its stored bytes (``packing.row_checksum``). Rows
    read from the file are checked as they are read; a split loaded into memory is checked once,
    when it is loaded (the cost of each: README, packed splits). A damaged row is a one-line
    ``PackingError`` naming the file and the row.

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
        if self._arrays is not None:  # checked once here; rows in memory are not re-read
            self._verify_rows(np.arange(len(self)), self._arrays["inputs"], self._arrays["targets"])
            if with_embeddings:
                samples = np.arange(len(self.sample_safe_ids))
                self._verify_embeddings(samples, self._arrays["samples/embedding"])

    def _read_metadata(self, handle: h5py.File) -> None:
        if int(handle.attrs.get("format_version", -1)) != PACK_FORMAT_VERSION:
            raise PackingError(f"{self.path}: packed with format version {handle.attrs.get('format_version')}, "
                               f"this version reads {PACK_FORMAT_VERSION}; rerun pack_to_hdf5.py to repack it")
        if not handle["rows/complete"][:].all():
            raise PackingError(f"{self.path}: not every row is packed; rerun pack_to_hdf5.py")
        if self.with_embeddings and "samples/embedding" not in handle:
            raise PackingError(f"{self.path}: packed without image embeddings; set head.use_image_embedding=true "
                               "and rerun pack_to_hdf5.py --force")
        self.split = str(handle.attrs["split"])
        self.logit_clip = float(handle.attrs["logit_clip"])
        self.row_sample = handle["rows/sample"][:]
        self.promptset_ids = handle["rows/promptset_id"][:]
        self.sample_safe_ids = decode_strings(handle["samples/safe_id"][:])
        self.index = read_index_csv(handle["index_csv"][:].tobytes())
        self.row_checksums = handle["rows/checksum"][:]
        self.embedding_checksums = handle["samples/checksum"][:] if self.with_embeddings else None

    def _damaged(self, what: str) -> PackingError:
        return PackingError(f"{self.path}: {what} fails its checksum (damaged data); "
                            "rerun pack_to_hdf5.py --force to repack it")

    def _verify_rows(self, rows: np.ndarray, inputs: np.ndarray, targets: np.ndarray) -> None:
        for position, row in enumerate(rows):
            if row_checksum(inputs[position], targets[position]) != int(self.row_checksums[row]):
                raise self._damaged(f"row {int(row)} (sample {self.sample_safe_ids[self.row_sample[row]]})")

    def _verify_embeddings(self, samples: np.ndarray, embeddings: np.ndarray) -> None:
        for position, sample in enumerate(samples):
            if row_checksum(embeddings[position]) != int(self.embedding_checksums[sample]):
                raise self._damaged(f"the embedding of sample {self.sample_safe_ids[sample]}")

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
        inputs, targets = self._rows("inputs", rows), self._rows("targets", rows)
        if self._arrays is None:
            self._verify_rows(rows, inputs, targets)
        batch = {
            "inputs": torch.from_numpy(inputs),
            "target": torch.from_numpy(targets),
            "index": torch.from_numpy(rows),
            "safe_id": [self.sample_safe_ids[sample] for sample in samples],
            "promptset_id": torch.from_numpy(self.promptset_ids[rows].astype(np.int64)),
        }
        if self.with_embeddings:
            unique, position = np.unique(samples, return_inverse=True)
            embeddings = self._rows("samples/embedding", unique)
            if self._arrays is None:
                self._verify_embeddings(unique, embeddings)
            batch["image_embedding"] = torch.from_numpy(embeddings)[position]
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
