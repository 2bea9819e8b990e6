"""Crash-safe file writes, storage faults, and content hashes.

Every artifact of the pipeline is written through these helpers: the data goes to a temporary
file in the destination folder, is flushed to disk, and only then renamed over the final name,
and the folder is synced so the rename itself is durable. A reader therefore sees either the old
file or the complete new one, never a torn write, even when the writer is killed with SIGKILL.

Storage faults (a full disk, a quota, a file-size limit, a read-only or unwritable folder) have one
home here: ``storage_error`` turns the ``OSError`` of any library (h5py hides the errno in its
message; ``torch.save`` raises a bare ``RuntimeError``) into a ``StorageError``, one line naming the
folder, which the stage runner prints like every ``PipelineError``. ``atomic_path`` applies it to
whatever its caller writes, the stage runner to anything else a stage raises.

Deleting goes through ``remove_tree`` and ``remove_file`` only: both refuse (``PathError``) a path
that does not resolve inside the folder the caller names (the project root, a run folder), so no
id, config value or symlink can make the pipeline delete anything outside it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml

from modules.core.errors import PipelineError
from modules.core.paths import PathError, ensure_inside


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class StorageError(PipelineError):
    """The file system refused a write (full, over quota, file-size limit, read-only, not writable)
    or lost one: one line naming the folder; what was finished before it is kept."""


#: errno -> what it means for a write (``storage_error``); the strerror texts find them in the
#: messages of libraries that drop the errno.
STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
_ERRNO_IN_MESSAGE = re.compile(r"errno = (\d+)")  # h5py: "... errno = 28, error message = ..."
_FILENAME_IN_MESSAGE = re.compile(r"filename = '([^']+)'")
#: Free space below which a write that failed without an errno (``torch.save``'s "unexpected pos")
#: is taken to have failed for lack of space.
FULL_DISK_BYTES = 1 << 20


def _fault_errno(error: BaseException) -> int | None:
    code = getattr(error, "errno", None)
    if code in STORAGE_ERRNOS:
        return code
    text = str(error)
    match = _ERRNO_IN_MESSAGE.search(text)
    if match and int(match.group(1)) in STORAGE_ERRNOS:
        return int(match.group(1))
    lowered = text.lower()
    for code in STORAGE_ERRNOS:
        if os.strerror(code).lower() in lowered:
            return code
    return None


def _existing_folder(path: Path) -> Path:
    """``path``'s nearest existing ancestor folder (``path`` itself if it is one)."""
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            return candidate
    return Path("/")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes this process may still write on the file system holding ``path`` (root may use the
    reserved blocks too); None when it cannot be asked."""
    try:
        stat = os.statvfs(_existing_folder(Path(path)))
    except OSError:
        return None
    if stat.f_files and not (stat.f_ffree if os.geteuid() == 0 else stat.f_favail):
        return 0  # no inodes left: no new file fits
    return (stat.f_bfree if os.geteuid() == 0 else stat.f_bavail) * stat.f_frsize


_TEMPORARY_NAME = re.compile(r"^\.(.+)\.[^.]+\.tmp$")  # what atomic_path's mkstemp makes


def _shown(path: Path) -> Path:
    """``path``, with an ``atomic_path`` temporary file shown under the final name it will take."""
    match = _TEMPORARY_NAME.match(path.name)
    return path.with_name(match.group(1)) if match else path


def _full_standard_output() -> Path | None:
    """The file stdout is redirected to when its file system is full (Linux), else None: an error
    that names no file and comes with a full stdout file most likely came from a ``print``."""
    try:
        target = Path(os.readlink(f"/proc/self/fd/{sys.stdout.fileno()}"))
    except (OSError, ValueError, AttributeError):
        return None
    free = free_bytes(target.parent) if target.is_file() else None
    return target if free is not None and free < FULL_DISK_BYTES else None


def _fault_path(error: BaseException, code: int) -> Path | None:
    """The file the failed operation wrote, as far as ``error`` tells."""
    name = getattr(error, "filename", None)
    if isinstance(name, (str, os.PathLike)):
        return Path(name)
    match = _FILENAME_IN_MESSAGE.search(str(error))
    if match:
        return Path(match.group(1))
    return _full_standard_output() if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else None


def storage_error(error: BaseException, path: str | os.PathLike | None = None,
                  default_folder: str | os.PathLike | None = None) -> StorageError | None:
    """The ``StorageError`` that ``error`` means, or None when it is no storage fault.

    ``path``: the file being written (else the one the error names: ``OSError.filename``, h5py's
    ``filename = '...'``; else stdout's file when that disk is full; else ``default_folder``). Recognised: the errnos of ``STORAGE_ERRNOS``
    (also inside h5py's message text), and, when ``path`` is given, an ``OSError``/``RuntimeError``
    without one while the file system holding ``path`` is full (``torch.save``).
    """
    if isinstance(error, PipelineError):
        return error if isinstance(error, StorageError) else None
    if not isinstance(error, (OSError, RuntimeError)):
        return None
    code = _fault_errno(error)
    if code is None and path is not None:
        free = free_bytes(Path(path).parent)
        if free is not None and free < FULL_DISK_BYTES:
            code = errno.ENOSPC
    if code is None:
        return None
    target = Path(path) if path is not None else _fault_path(error, code)
    target = _shown(target) if target is not None else None
    if target is None and default_folder is None:
        return None
    folder = target.parent if target is not None else Path(default_folder)
    doing = f" (writing {target.name})" if target is not None else ""
    if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        advice = "free space and rerun" if code != errno.EFBIG else "raise the file size limit and rerun"
        return StorageError(f"{STORAGE_ERRNOS[code]} under {folder}{doing}; {advice}: finished work is kept")
    return StorageError(f"{folder} is not writable ({STORAGE_ERRNOS[code]}){doing}; make it writable and "
                        "rerun: finished work is kept")


def lost_write_error(path: str | os.PathLike, what: str) -> StorageError:
    """A write that raised nothing but reads back different (a library swallowed the failure)."""
    path = _shown(Path(path))
    free = free_bytes(path.parent)
    cause = "no space left on device" if free is not None and free < FULL_DISK_BYTES else "a write was lost"
    return StorageError(f"{cause} under {path.parent} (writing {path.name}: {what} reads back different from "
                        "what was written); free space or check the disk and rerun: finished work is kept")


@contextlib.contextmanager
def storage_faults(path: str | os.PathLike) -> Iterator[None]:
    """Raise the ``StorageError`` an ``OSError``/``RuntimeError`` inside means (writing ``path``);
    other errors pass unchanged."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        error = storage_error(exc, path)
        if error is None:
            raise
        raise error from None


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make the renames and new names in ``folder`` durable (a no-op where folders cannot be synced)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def durable_replace(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Sync ``source``, rename it over ``target``, sync the folder: after this returns, a crash or
    power loss leaves the new content under ``target``."""
    with storage_faults(target):
        with open(source, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(source, target)
        fsync_folder(Path(target).parent)


def reserve_space(path: str | os.PathLike) -> None:
    """Allocate real disk blocks for the whole current length of ``path`` (``posix_fallocate``).

    A file written in place later (the HDF5 writers allocate their datasets at creation, which only
    sets the length) then cannot hit a full disk midway; a disk too small is a ``StorageError`` now.
    Where the system or file system cannot reserve (no ``posix_fallocate``), nothing happens and the
    writers' read-back checks remain the guard.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0 or not hasattr(os, "posix_fallocate"):  # macOS and Windows have none
        return
    with storage_faults(path):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                free = free_bytes(path.parent) or 0
                raise StorageError(f"{STORAGE_ERRNOS[exc.errno]} under {path.parent} (reserving "
                                   f"{size / 2**20:.1f} MiB for {_shown(path).name}, {free / 2**20:.1f} MiB free); "
                                   "free space and rerun: finished work is kept") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically and durably.

    The caller writes to the yielded path with any library (h5py, torch.save, PIL, ...). On an
    exception the temporary file is removed and ``path`` is left untouched; a storage fault raised
    by the library (or by the sync and rename) becomes a ``StorageError`` naming the folder.
    """
    path = Path(path)
    with storage_faults(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp creates 0600; artifacts get normal permissions
    tmp = Path(tmp_name)
    try:
        yield tmp
        durable_replace(tmp, path)
    except BaseException as exc:
        # Asked before the temporary file is removed: it may be what filled the disk.
        error = storage_error(exc, path) if isinstance(exc, Exception) else None
        tmp.unlink(missing_ok=True)
        if error is None or error is exc:
            raise
        raise error from None


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


def remove_stale_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files ``atomic_path`` left under ``folder`` (recursively) when their
    writer was killed mid-write, or only those of the final file ``name`` in ``folder`` itself; the
    paths removed. Call it only while holding the lock of everything written there (``core.locks``):
    a live writer's temporary file looks the same."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    candidates = folder.glob(f".{glob.escape(name)}.*.tmp") if name else folder.rglob(".*.tmp")
    removed = []
    for path in candidates:
        if _TEMPORARY_NAME.match(path.name) and path.is_file() and not path.is_symlink():
            remove_file(path, folder)
            removed.append(path)
    return removed


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
