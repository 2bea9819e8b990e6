"""Child-process lifetime: no process a stage (or the pipeline) starts outlives it.

Two mechanisms, used for every child the pipeline makes:

- ``DieWithParent``, run first thing in a freshly forked child (a DataLoader ``worker_init_fn``, a
  ``subprocess`` ``preexec_fn``): the kernel SIGKILLs the child as soon as its parent dies, even by
  SIGKILL (Linux ``prctl(PR_SET_PDEATHSIG)``). Without it a DataLoader worker of a killed stage 3
  lived on and kept the shard file's HDF5 lock, so the rerun failed until someone killed the orphan.
  The kernel ties the signal to the *thread* that forked the child, so loaders must be iterated
  (workers started) on a thread that lives as long as the loader: the main thread, in this project.
  On other systems it does nothing: there, workers fall back on PyTorch's own check that their
  parent is alive (every 5 s while idle).
- ``run_child`` (``run_pipeline.py``'s stages): the child runs in its own session and dies with the
  pipeline; SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to the pipeline are forwarded to the child's
  process group (the stage and its workers), and the pipeline exits with the child's status. Its
  own session keeps a terminal's Ctrl-C from reaching the stage twice (directly and forwarded), so
  Ctrl-Z (SIGTSTP) and ``fg`` (SIGCONT) are passed on too: the stage stops and continues with the
  pipeline.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

#: ``<linux/prctl.h>``: set the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1

#: Signals ``run_child`` passes on to the running child instead of acting on them itself.
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def _load_prctl():
    """libc's ``prctl`` with its argument types (Linux), else None. Looked up once at import, in the
    parent, so a freshly forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (no longer exists, or is a zombie waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if Path("/proc/self/stat").exists():
            return True
        try:  # no procfs: ask the kernel (a zombie still counts as alive here)
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def die_with_parent(parent_pid: int) -> None:
    """Make the kernel SIGKILL this process when its parent dies (Linux; a no-op elsewhere).

    ``parent_pid``: the process that started this one, recorded before the fork. If it died
    between the fork and this call, the signal would never come, so this process kills itself.
    """
    if _PRCTL is None:
        return
    if _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if process_gone(parent_pid):
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class DieWithParent:
    """``die_with_parent`` bound to the process that builds this object, to run in a child it starts:
    a DataLoader ``worker_init_fn`` (called with the worker id) or a ``subprocess`` ``preexec_fn``
    (called without arguments). Build it in the parent; it is picklable, for spawned workers."""

    parent_pid: int = field(default_factory=os.getpid)

    def __call__(self, worker_id: int | None = None) -> None:
        die_with_parent(self.parent_pid)


@dataclass(frozen=True)
class ChildExit:
    """How a child run by ``run_child`` ended.

    ``returncode``: its exit code, negative when a signal killed it (as ``subprocess``);
    ``forwarded``: the last signal this process received and passed on to it, else None.
    """

    returncode: int
    forwarded: int | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.forwarded is None

    @property
    def exit_status(self) -> int:
        """The status to exit with: the child's (128 + n when signal n killed it, as a shell
        reports it), or 128 + the forwarded signal when the child finished normally anyway."""
        if self.returncode < 0:
            return 128 - self.returncode
        if self.returncode == 0 and self.forwarded is not None:
            return 128 + self.forwarded
        return self.returncode

    def describe(self) -> str:
        if self.returncode < 0:
            return f"was killed by {signal.Signals(-self.returncode).name}"
        if self.returncode == 0 and self.forwarded is not None:
            return f"stopped after {signal.Signals(self.forwarded).name}"
        return f"failed with exit code {self.returncode}"


def run_child(argv: Sequence[str]) -> ChildExit:
    """Run ``argv`` to completion as a child that cannot outlive this process.

    The child starts in its own session (so a terminal's Ctrl-C reaches it once, through this
    process) with ``DieWithParent``; while it runs, ``FORWARDED_SIGNALS`` received here go to its
    whole process group. Call from the main thread (signal handlers, and see ``DieWithParent``).
    """
    received: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum, _frame) -> None:
        received.append(signum)
        if child is not None:
            _signal_group(child.pid, signum)

    def suspend(_signum, _frame) -> None:
        # The child's group has no parent in its session, so the kernel would drop a SIGTSTP sent
        # to it (an orphaned process group): stop it, and then this process, with SIGSTOP.
        if child is not None:
            _signal_group(child.pid, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGSTOP)

    def resume(_signum, _frame) -> None:
        if child is not None:
            _signal_group(child.pid, signal.SIGCONT)

    handlers = {**{signum: forward for signum in FORWARDED_SIGNALS}, signal.SIGTSTP: suspend, signal.SIGCONT: resume}
    parent = DieWithParent()

    def setup_child() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, handlers)  # the mask survives fork and exec
        parent()

    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        # Signals that arrive while the child starts wait until ``child`` is set, then run the handlers.
        signal.pthread_sigmask(signal.SIG_BLOCK, handlers)
        try:
            child = subprocess.Popen(list(argv), start_new_session=True, preexec_fn=setup_child)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, handlers)
        returncode = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return ChildExit(returncode, received[-1] if received else None)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):  # the group has already exited
        pass
