"""When the engine says it has gone idle: one log line per idle spell, at most one per interval.

An idle engine should hold nothing: no request, no row, no KV block (the prefix cache keeps copies
of its own, outside the pool). The line says so, or shows what leaked, for an operator reading the
log after a burst of traffic, and for the load test (bench/load.py), which reads the last one.

At the same moment the engine hands the heap pages that malloc keeps free back to the system
(`trim_heap`). A burst's many tensor sizes leave glibc's arenas fragmented: in the load test the
worker's free-but-kept heap grew by 175 MB (in-use bytes flat, per malloc_stats) and never shrank.
"""

from __future__ import annotations

import ctypes
import math
import time
from collections.abc import Callable

IDLE_LOG_INTERVAL = 10.0  # seconds: the most lines one engine writes in a busy/idle flicker


class IdleReport:
    """Decides when the idle line is due: once per idle spell, never twice within `interval` seconds.

    A spell that starts within `interval` of the last line is reported when the interval is up, if it
    lasts that long, so the last line after any traffic always says how the engine was left.
    """

    def __init__(self, interval: float = IDLE_LOG_INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.interval, self._clock = interval, clock
        self._last = -math.inf
        self._pending = False  # the engine has worked since the last line

    def busy(self) -> None:
        """A step ran: the next idle spell gets its line."""
        self._pending = True

    def due_in(self) -> float | None:
        """Seconds until the line is due (<= 0: now); None when this spell has had its line."""
        if not self._pending:
            return None
        return self._last + self.interval - self._clock()

    def reported(self) -> None:
        self._pending, self._last = False, self._clock()


def _malloc_trim() -> Callable[[int], int] | None:
    try:  # the process's own symbols: glibc's when linked against it (no ldconfig lookup, no subprocess)
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> bool:
    """glibc's malloc_trim(0): free pages in every arena go back to the system. False where there is none."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
