"""Progress of the long loops (stage 3's images, training batches, the Laplace fit, stage 7's samples).

On a terminal a tqdm bar; otherwise (output to a file, a cluster job) a timestamped log line every
``interval_s`` seconds with done/total, the rate and the ETA, so a long loop is never silent::

    2026-11-30 14:03:10 INFO pipeline.progress: evaluating: 120/400 samples (30%), 1.9 samples/s, ETA 0:02:27

A loop that printed at least one such line ends with one more (its total time and rate); a short loop
prints nothing. Units skipped because they were finished before (``Progress.skip``) count toward
done/total but not toward the rate, so a resumed run's ETA is that of the work left.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

from tqdm.auto import tqdm

log = logging.getLogger("pipeline.progress")

Item = TypeVar("Item")

#: Seconds between two progress lines when the output is not a terminal (``--progress-every``).
DEFAULT_INTERVAL_S = 30.0
_interval_s = DEFAULT_INTERVAL_S


def set_interval(seconds: float) -> None:
    """Seconds between progress lines of every later ``Progress`` of this process (0: every update)."""
    global _interval_s
    if not seconds >= 0:
        raise ValueError(f"progress interval {seconds!r}: must be >= 0 seconds")
    _interval_s = float(seconds)


def interval() -> float:
    return _interval_s


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=int(round(seconds))))


class Progress:
    """Progress of one loop over ``total`` units (None: unknown).

    ``enabled=False`` shows nothing (e.g. torchrun ranks other than 0); ``terminal`` forces the bar
    (True) or the lines (False) instead of asking whether ``stream`` is a terminal.
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, enabled: bool = True,
                 terminal: bool | None = None, interval_s: float | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled
        self.interval_s = _interval_s if interval_s is None else float(interval_s)
        self.clock = clock
        self.done = 0
        self.skipped = 0
        self.postfix = ""
        self.lines = 0
        self.started = clock()
        self.last_line = self.started
        self.closed = False
        stream = sys.stderr if stream is None else stream
        use_bar = terminal if terminal is not None else bool(getattr(stream, "isatty", lambda: False)())
        self.bar = (tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False, file=stream)
                    if enabled and use_bar else None)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def update(self, n: int = 1, **postfix: object) -> None:
        """``n`` more units done (``postfix``: figures shown after the counts, e.g. ``loss="0.123"``)."""
        self._advance(n, postfix)

    def skip(self, n: int = 1) -> None:
        """``n`` units found finished before: they count as done but not toward the rate."""
        self.skipped += n
        self._advance(n, {})

    def _advance(self, n: int, postfix: dict) -> None:
        self.done += n
        if postfix:
            self.postfix = ", ".join(f"{key}={value}" for key, value in postfix.items())
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            return
        now = self.clock()
        if now - self.last_line >= self.interval_s:
            self.last_line = now
            self.lines += 1
            log.info("%s", self.line(now))

    def rate(self, now: float) -> float:
        """Units computed (not skipped) per second since the start."""
        elapsed = now - self.started
        return (self.done - self.skipped) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float) -> str:
        """``desc: done/total unit (pct), rate unit/s, ETA h:mm:ss[, postfix]``."""
        rate = self.rate(now)
        if self.total:
            counts = f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
            remaining = max(self.total - self.done, 0)
            eta = f", ETA {_duration(remaining / rate)}" if rate > 0 else ", ETA unknown"
        else:
            counts, eta = f"{self.done} {self.unit}", ""
        extra = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {counts}, {rate:.3g} {self.unit}/s{eta}{extra}"

    def close(self) -> None:
        """End the bar, or (after at least one progress line) log the loop's total time and rate."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.lines:
            now = self.clock()
            extra = f", {self.postfix}" if self.postfix else ""
            log.info("%s: %d/%s %s done in %s, %.3g %s/s%s", self.desc, self.done,
                     self.total if self.total is not None else "?", self.unit, _duration(now - self.started),
                     self.rate(now), self.unit, extra)


def track(items: Iterable[Item], desc: str, total: int | None = None, unit: str = "it",
          enabled: bool = True) -> Iterator[Item]:
    """``items`` with a ``Progress`` advanced after each (``total`` defaults to ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, enabled=enabled) as progress:
        for item in items:
            yield item
            progress.update()


class TrackedIterable:
    """``items`` (e.g. a DataLoader handed to a library's ``fit``) whose every full pass shows a
    ``Progress``; other attributes (``dataset``, ``batch_size``) are those of ``items``."""

    def __init__(self, items, desc: str, unit: str = "it") -> None:
        self.items, self.desc, self.unit = items, desc, unit

    def __iter__(self) -> Iterator:
        return track(self.items, self.desc, unit=self.unit)

    def __len__(self) -> int:
        return len(self.items)

    def __getattr__(self, name: str):
        return getattr(self.items, name)
