"""Crash-safe file writes and content hashes.

Every artifact of the pipeline is written through these helpers: the data goes to a temporary
file in the destination folder, is flushed to disk, and only then renamed over the final name.
A reader therefore sees either the old file or the complete new one, never a torn write, even
when the writer is killed with SIGKILL.

Deleting goes through ``remove_tree`` and ``remove_file`` only: both refuse (``PathError``) a path
that does not resolve inside the folder the caller names (the project root, a run folder), so no
id, config value or symlink can make the pipeline delete anything outside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from modules.core.paths import PathError, ensure_inside


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The caller writes to the yielded path with any library (h5py, torch.save, PIL, ...). On an
    exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts get normal permissions
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_tree(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Delete the folder ``path`` with everything in it (nothing when it is missing). Refused with a
    ``PathError`` unless ``path`` resolves strictly inside ``root``; a symlink inside ``root`` (to a
    place inside it) is removed as a link, never followed."""
    path = Path(path)
    if ensure_inside(root, path, "folder to delete") == Path(root).resolve():
        raise PathError(f"folder to delete: {path} is {root} itself; refusing to delete it")
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def remove_file(path: str | os.PathLike, root: str | os.PathLike) -> None:
    """Delete the file ``path`` (nothing when it is missing); refused with a ``PathError`` unless it
    resolves inside ``root``."""
    path = Path(path)
    ensure_inside(root, path, "file to delete")
    if path.is_dir() and not path.is_symlink():
        raise PathError(f"file to delete: {path} is a folder")
    path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_yaml(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def atomic_write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame as CSV atomically (no index column)."""
    atomic_write_text(path, frame.to_csv(index=False))


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def file_md5(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def cached_file_md5(path: str | os.PathLike) -> str:
    """``file_md5`` memoised on (path, size, mtime): large checkpoints are hashed once per process."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_CACHE:
        _MD5_CACHE[key] = file_md5(path)
    return _MD5_CACHE[key]
