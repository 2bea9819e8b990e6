"""Timing shared by the benchmarks."""

from __future__ import annotations

import time
from typing import Callable


def best_of(repeats: int, run: Callable[[], object]) -> float:
    """The shortest wall time in seconds of ``repeats`` calls of ``run`` (the least disturbed one)."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)
