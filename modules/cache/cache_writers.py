"""Stage 3's background writers: a batch's entries go to the shard file while the next batch encodes.

One interface, two implementations, chosen by ``sam.cache_writer`` (``CACHE_WRITERS``):

- ``process`` (default): a child process owns the shard file. h5py holds the GIL while HDF5 writes,
  so a writer *thread* takes turns with the stage's main thread, the one that feeds the GPU
  (``benchmarks/bench_cache_writer.py``). The stage copies each batch's results from the device
  straight into a slot of shared memory (``host_arrays``) and sends the child a small message. The
  child dies with the stage (``PR_SET_PDEATHSIG``), ignores SIGINT (the stage decides what a Ctrl-C
  stops), and writes each batch with ``ShardWriter.write_batch`` (data, sync, check, then flags), so
  a SIGKILL of either process leaves only unflagged rows, which the rerun recomputes.
- ``thread``: a thread of the stage's process (no extra process).

Both keep at most ``depth`` batches in flight and raise a writer's error (a ``StorageError`` naming
the shard file) in the stage at the next ``put`` or at ``close``. ``release`` ends the writer, also
after an error or an interrupt, and returns a ``ShardWriter`` of the file for the manifest. Per batch
the stage calls ``host_arrays()`` (the allocator for its host copies), then ``put(entries)``.
"""

from __future__ import annotations

import collections
import mmap
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable

import numpy as np

from modules.cache.sam_cache import CacheEntry, ShardLayout, normalise_entry
from modules.cache.shard_writer import ShardWriter
from modules.core.errors import PipelineError, error_line
from modules.core.processes import DieWithParent
from modules.core.stage import KillSwitch

#: Test hook: SIGKILL the stage after the data rows of the batch holding the n-th written image
#: are on disk and before their completion flags are (the worst moment for the cache).
KILL_AFTER_IMAGES_ENV = "PIPELINE_TEST_KILL_AFTER_IMAGES"

REPO = Path(__file__).resolve().parents[2]
ALIGN = 64  # bytes: where each array starts in a shared-memory slot


class CacheWriterError(PipelineError):
    """The writer process died or failed in a way that has no error of its own to report."""


class ThreadWriter:
    """Writes batches on one thread of the stage's process (``batch_size``: unused; the interface's,
    with which ``ProcessWriter`` sizes its shared memory)."""

    def __init__(self, writer: ShardWriter, on_written: Callable[[int], None], batch_size: int = 1,
                 depth: int = 2):
        self.writer = writer
        self.on_written = on_written
        kill_switch = KillSwitch.from_env(KILL_AFTER_IMAGES_ENV)
        self.before_flags = kill_switch.advance if kill_switch else None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="sam-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            entries = self._queue.get()
            try:
                if entries is None:
                    return
                if self._error is None and not self._abandoned:
                    hook = (lambda n=len(entries): self.before_flags(n)) if self.before_flags else None
                    self.writer.write_batch(entries, before_flags=hook)
                    self.on_written(len(entries))
            except BaseException as exc:  # re-raised on the main thread
                self._error = exc
            finally:
                self._queue.task_done()

    def host_arrays(self) -> Callable[[tuple[int, ...], object], np.ndarray]:
        """The allocator for the next batch's host copies (plain arrays)."""
        return plain_array

    def put(self, entries: list[CacheEntry]) -> None:
        if self._error is not None:
            raise self._error
        if entries:
            self._queue.put(entries)

    def flush(self) -> None:
        """Wait until every batch put so far is written and flagged."""
        self._queue.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def release(self) -> ShardWriter:
        """Stop (the batch being written is finished, queued ones are dropped); the shard's writer."""
        if self._thread.is_alive():
            self._abandoned = True
            self._queue.put(None)
            self._thread.join()
        return self.writer


def entry_bytes_bound(layout: ShardLayout) -> int:
    """The most bytes the arrays of one normalised entry of ``layout`` take (``ALIGN`` padding included)."""
    features = sum(2 * c * h * w + ALIGN for _, (c, h, w) in layout.feature_shapes)
    per_promptset = 2 * 256 * 256 + 4 + 1 + 4 * layout.num_outputs
    return features + layout.max_promptsets * per_promptset + 4 * ALIGN


def plain_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """The host-array allocator of a writer without shared memory."""
    return np.empty(shape, dtype=dtype)


def address(buffer) -> int:
    """Where a buffer's memory starts (also for read-only buffers)."""
    return np.frombuffer(buffer, dtype=np.uint8).__array_interface__["data"][0]


class SharedRing:
    """``slots`` equal regions of one anonymous shared-memory file (Linux ``memfd``), which a child
    maps through the file descriptor it inherits; the kernel frees it when both are gone."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.fd = os.memfd_create("sam-cache-batches")
        os.ftruncate(self.fd, slots * slot_bytes)
        self.map = mmap.mmap(self.fd, slots * slot_bytes)
        self.bytes = np.frombuffer(self.map, dtype=np.uint8)
        self.base = self.bytes.__array_interface__["data"][0]
        self.slots, self.slot_bytes = slots, slot_bytes

    def allocator(self, slot: int) -> Callable[[tuple[int, ...], object], np.ndarray]:
        """Host arrays in ``slot``, one after the other; plain arrays once it is full."""
        cursor = slot * self.slot_bytes
        end = (slot + 1) * self.slot_bytes

        def allocate(shape: tuple[int, ...], dtype) -> np.ndarray:
            nonlocal cursor
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if cursor + nbytes > end:
                return np.empty(shape, dtype=dtype)
            view = self.bytes[cursor:cursor + nbytes].view(dtype).reshape(shape)
            cursor += -(-nbytes // ALIGN) * ALIGN
            return view

        return allocate

    def place(self, slot: int, buffers: list[pickle.PickleBuffer]) -> list[tuple[int, int]] | None:
        """The ``(offset, length)`` of each buffer in ``slot``: where it already lies (an array from
        ``allocator(slot)``) or where it is copied to, after those; None when they do not fit."""
        start, end = slot * self.slot_bytes, (slot + 1) * self.slot_bytes
        raws = [buffer.raw() for buffer in buffers]
        offsets = [address(raw) - self.base if raw.nbytes else -1 for raw in raws]
        inside = [start <= o and o + raw.nbytes <= end for o, raw in zip(offsets, raws)]
        cursor = max([o + raw.nbytes for o, raw, kept in zip(offsets, raws, inside) if kept], default=start)
        placements = []
        for raw, offset, kept in zip(raws, offsets, inside):
            if not kept:
                cursor = -(-cursor // ALIGN) * ALIGN
                if cursor + raw.nbytes > end:
                    return None
                self.map[cursor:cursor + raw.nbytes] = raw
                offset, cursor = cursor, cursor + raw.nbytes
            placements.append((offset, raw.nbytes))
        return placements

    def close(self) -> None:
        del self.bytes
        try:
            self.map.close()
        except BufferError:  # arrays handed out still view it: unmapped when the last one goes
            pass
        os.close(self.fd)


def shared_ring(slots: int, slot_bytes: int) -> SharedRing | None:
    """A ``SharedRing``, or None where the system has no ``memfd`` (not Linux, or a sandbox that
    refuses it): the batches then go through the socket."""
    if not hasattr(os, "memfd_create"):
        return None
    try:
        return SharedRing(slots, slot_bytes)
    except OSError:
        return None


class ProcessWriter:
    """Writes batches in a child process that owns the shard file (``python -m`` this module).

    The arrays of a batch go through shared memory, a ring of ``depth + 1`` slots of
    ``batch_size`` entries each; the child's reply to a batch frees its slot. ``host_arrays()``
    hands out a free slot's memory for the next batch's device-to-host copies, so ``put`` sends only
    a small message (pickle protocol 5, the arrays out of band); arrays from elsewhere are copied
    into a slot. Through the socket alone, the sending thread would wait for the GIL once per
    socket buffer's worth (a few hundred KiB) while the stage's main thread keeps it. Without a
    ``memfd`` (``shared_ring``) the arrays go through the socket.
    """

    def __init__(self, writer: ShardWriter, on_written: Callable[[int], None], batch_size: int = 1,
                 depth: int = 2):
        self.path, self.layout = writer.path, writer.layout
        self.on_written = on_written
        self.depth = max(1, depth)  # with the slot host_arrays holds, a batch in parts needs two
        self.batch_size = max(1, batch_size)
        writer.close()  # one process writes the file at a time: the child, from here on
        slots = self.depth + 1
        self._ring = shared_ring(slots, self.batch_size * entry_bytes_bound(self.layout))
        self._conn, child_end = Pipe(duplex=True)
        shared = (self._ring.fd,) if self._ring else ()
        python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "modules.cache.cache_writers", str(child_end.fileno()), *map(str, shared)],
            pass_fds=(child_end.fileno(), *shared), preexec_fn=DieWithParent(),
            env={**os.environ, "PYTHONPATH": python_path})
        child_end.close()
        self._pending: collections.deque = collections.deque()  # the slot (or None) of each unanswered request
        self._free_slots = list(range(slots)) if self._ring else []
        self._staged: int | None = None  # the slot host_arrays handed out for the next put
        self._error: BaseException | None = None
        self._send(("open", str(self.path), self.layout))
        if self._ring is not None:
            self._send(("ring", slots, self._ring.slot_bytes))

    @property
    def pid(self) -> int:
        return self._process.pid

    # ----------------------------------------------------------- talking to the child

    def _died(self) -> CacheWriterError:
        try:
            code = self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exit code {code}")
        return CacheWriterError(f"{self.path}: the cache writer process (pid {self.pid}) died ({how}); "
                                "rerun the same command to resume: flagged entries are kept")

    def _send(self, message: tuple, slot: int | None = None, buffers: list | None = None) -> None:
        try:
            self._conn.send(message)
            for buffer in buffers or ():
                self._conn.send_bytes(buffer.raw())
        except OSError:  # BrokenPipeError, ConnectionResetError
            raise self._died() from None
        self._pending.append(slot)

    def _settle(self, at_most: int) -> None:
        """Read replies until at most ``at_most`` requests are unanswered (and any already there)."""
        while len(self._pending) > at_most or (self._pending and self._conn.poll()):
            try:
                kind, value = self._conn.recv()
            except (EOFError, OSError):
                raise self._died() from None
            slot = self._pending.popleft()
            if slot is not None:
                self._free_slots.append(slot)
            if kind == "written" and value:
                self.on_written(value)
            elif kind == "failed" and value is not None and self._error is None:
                self._error = value

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _free_slot(self) -> int:
        while not self._free_slots:
            self._settle(len(self._pending) - 1)
        return self._free_slots.pop()

    def _send_batch(self, entries: list[CacheEntry]) -> None:
        chunks = [[normalise_entry(entry) for entry in entries[start:start + self.batch_size]]
                  for start in range(0, len(entries), self.batch_size)]
        staged, self._staged = self._staged, None
        if self._ring is None:
            for chunk in chunks:
                buffers: list[pickle.PickleBuffer] = []
                payload = pickle.dumps(chunk, protocol=5, buffer_callback=buffers.append)
                self._send(("batch", payload, len(buffers)), None, buffers)
            return
        # One chunk goes out in the slot its arrays were decoded into; a batch larger than a slot is
        # copied chunk by chunk into fresh slots, and its staged slot is freed after the copies.
        for chunk in chunks:
            buffers = []
            payload = pickle.dumps(chunk, protocol=5, buffer_callback=buffers.append)
            slot = staged if staged is not None and len(chunks) == 1 else self._free_slot()
            placements = self._ring.place(slot, buffers)
            if placements is None:  # cannot happen for normalised entries of this layout
                raise CacheWriterError(f"{self.path}: a batch of {len(chunk)} entries does not fit its "
                                       f"{self._ring.slot_bytes} bytes of shared memory")
            self._send(("shared", payload, placements), slot)
        if staged is not None and len(chunks) > 1:
            self._free_slots.append(staged)

    # ----------------------------------------------------------- the interface

    def host_arrays(self) -> Callable[[tuple[int, ...], object], np.ndarray]:
        """An allocator ``(shape, dtype) -> array`` for the host copies of the next ``put``'s batch:
        views into a free shared-memory slot, which ``put`` then sends without copying them."""
        if self._ring is None:
            return plain_array
        if self._staged is None:
            self._staged = self._free_slot()
        return self._ring.allocator(self._staged)

    def put(self, entries: list[CacheEntry]) -> None:
        self._settle(self.depth)
        self._raise_error()
        if entries:
            self._send_batch(list(entries))
        elif self._staged is not None:  # nothing decoded (every image failed): the slot is free again
            self._free_slots.append(self._staged)
            self._staged = None

    def flush(self) -> None:
        """Wait until every batch put so far is written and flagged (the file opened, at first)."""
        self._settle(0)
        self._raise_error()

    def close(self) -> None:
        self._settle(0)
        self._send(("close",))
        self._settle(0)
        self._process.wait()
        self._raise_error()

    def release(self) -> ShardWriter:
        """End the child (killed if ``close`` did not end it: unflagged rows are recomputed next time);
        the shard file's writer, opened again in this process."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._conn.close()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        return ShardWriter.reopen(self.path, self.layout)


#: ``sam.cache_writer`` -> the writer class.
CACHE_WRITERS: dict[str, type] = {"process": ProcessWriter, "thread": ThreadWriter}


# --------------------------------------------------------------------------- the child


def _transferable(error: BaseException) -> BaseException:
    """``error`` itself when it survives a pickle round trip, else a ``CacheWriterError`` saying it."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return CacheWriterError(f"cache writer process: {type(error).__name__}: {error_line(error)}")


def serve(conn: Connection, shared_fd: int | None = None) -> None:
    """The child's loop: ``open`` the shard file, map the ``ring``, write each batch (``shared``: its
    arrays in a ring slot; ``batch``: sent after the message), ``close``; one reply per request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    writer: ShardWriter | None = None
    ring: memoryview | None = None
    failure: BaseException | None = None
    kill_switch = KillSwitch.from_env(KILL_AFTER_IMAGES_ENV, with_parent=True)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the stage is gone without a close
            break
        kind = message[0]
        if kind == "batch":  # read the whole request even when it will not be written
            buffers = [conn.recv_bytes() for _ in range(message[2])]
        elif kind == "shared":
            buffers = [ring[offset:offset + length] for offset, length in message[2]]
        if kind == "close":
            if writer is not None:
                writer.close()
            conn.send(("closed", None))
            conn.close()
            return
        if kind == "ring":
            ring = memoryview(mmap.mmap(shared_fd, message[1] * message[2]))
            conn.send(("written", 0))
            continue
        if failure is not None:
            conn.send(("failed", None))
            continue
        try:
            if kind == "open":
                writer = ShardWriter.reopen(Path(message[1]), message[2])
                conn.send(("written", 0))
            else:
                entries = pickle.loads(message[1], buffers=buffers)
                hook = (lambda n=len(entries): kill_switch.advance(n)) if kill_switch else None
                writer.write_batch(entries, before_flags=hook)
                conn.send(("written", len(entries)))
        except BaseException as exc:  # reported to the stage, which raises it
            failure = _transferable(exc)
            conn.send(("failed", failure))


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])), int(sys.argv[2]) if len(sys.argv) > 2 else None)
