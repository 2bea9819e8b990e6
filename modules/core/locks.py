"""One writer per stage output: an exclusive lock per output, held for the life of the stage.

A stage takes the lock of its output (a folder, or one shard file of the SAM cache) before it
writes anything there; a second copy of the same stage on the same output refuses at once with one
line naming the holder's pid and the output (``OutputLocked``, exit code 2), so it can neither
crash on a half-written file nor repeat work. Refusing, not waiting: a copy started by mistake
(a SLURM job submitted twice, a pipeline started in two terminals) says so at once instead of
sitting silently behind the first and then skipping everything it finished.

The lock is a POSIX record lock (``fcntl.lockf``, ``F_SETLK``) on the whole of a lock file. Unlike
``flock``, a record lock belongs to a process, not to an open file: a forked child (a DataLoader
worker) never holds it, and the kernel drops it the moment its owner dies, SIGKILL included. So an
orphaned child can never keep an output locked, and no stale lock file ever needs cleaning up: the
file stays, the lock does not. Caveat of record locks: closing ANY descriptor of the lock file
releases the process's lock on it, so only this module opens lock files, each once.

Lock files live in ``<project_root>/.locks/``, mirroring the output's path (``.locks/manifests.lock``,
``.locks/sam_cache/<backbone>/shard-000-of-001.h5.lock``), not inside the output folder, which
``--force`` may delete and recreate while the stage holds the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import sys
from pathlib import Path

from modules.core.errors import PipelineError
from modules.core.paths import ensure_inside

#: Folder under the project root that holds the lock files.
LOCKS_DIR = ".locks"

# struct flock on Linux (64-bit off_t): l_type, l_whence, l_start, l_len, l_pid, padding.
_FLOCK = "hhqqi4x"


class OutputLocked(PipelineError):
    """Another process holds the lock of this output."""


def lock_path(project_root: Path, target: Path) -> Path:
    """The lock file of ``target`` (a path under ``project_root``)."""
    relative = Path(os.path.relpath(Path(target).absolute(), Path(project_root).absolute()))
    return Path(project_root) / LOCKS_DIR / relative.parent / f"{relative.name}.lock"


def lock_holder(path: Path) -> int | None:
    """The pid of the process holding the lock file ``path`` (Linux), else None (free, or unknown)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
    except OSError:
        return None
    finally:
        os.close(fd)  # no lock of this process is on the file: we only ask about it
    return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


class OutputLock:
    """The exclusive lock of one stage output, held from ``acquire`` until ``release`` or the end of
    this process; a context manager. ``target``: the output it guards, ``path``: its lock file."""

    def __init__(self, target: Path, path: Path, fd: int):
        self.target, self.path, self._fd = target, path, fd

    @classmethod
    def acquire(cls, project_root: Path, target: Path) -> "OutputLock":
        """Lock ``target`` (under ``project_root``), or raise ``OutputLocked`` naming the holder."""
        path = lock_path(project_root, target)
        ensure_inside(project_root, path, "lock file")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):  # e.g. ENOLCK: no locks on this file system
                raise PipelineError(f"{target}: cannot lock {path} ({exc.strerror})") from None
            holder = lock_holder(path)
            by = f"process {holder}" if holder else "another process"
            raise OutputLocked(
                f"{target}: {by} is writing this output (lock {path}); wait for it to finish or stop it, "
                "then rerun"
            ) from None
        return cls(Path(target), path, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the record lock
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
