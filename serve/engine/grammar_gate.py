"""Requests whose grammar is still compiling wait here, not in the engine's admission queue.

`Engine.submit` hands a request with an unfinished `PendingGrammar` to the gate instead of the
queue; each step the loop calls `release()`: requests whose grammar is ready go to the queue (in
arrival order) and join the batch at the next admission, requests whose grammar failed or ran out
of time come back with their error to be failed alone. Rows already decoding never wait for a
compile. A loop with nothing but compiling requests sleeps at most `wake_in()` seconds: a finished
compile wakes it earlier through `wake` (registered with each grammar's `on_done`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from serve.engine.grammar import CompiledGrammar, GrammarError
from serve.engine.grammar_pool import PendingGrammar
from serve.engine.osthread import allocate_lock

T = TypeVar("T")


class GrammarGate(Generic[T]):
    """Holds (request, pending grammar) pairs until their grammar is compiled or has failed."""

    def __init__(self, wake: Callable[[], None]):
        self._wake = wake  # the engine loop's wakeup (thread-safe)
        self._held: list[tuple[T, PendingGrammar]] = []
        self._lock = allocate_lock()  # hold() runs on handler threads/greenlets, release() on the loop

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, item: T, pending: PendingGrammar) -> None:
        """Keep `item` until its grammar is done; never blocks."""
        with self._lock:
            self._held.append((item, pending))
        pending.on_done(self._wake)

    def release(self) -> tuple[list[tuple[T, CompiledGrammar]], list[tuple[T, GrammarError]]]:
        """(ready items with their grammar, failed items with their error), in arrival order."""
        ready: list[tuple[T, CompiledGrammar]] = []
        failed: list[tuple[T, GrammarError]] = []
        keep: list[tuple[T, PendingGrammar]] = []
        with self._lock:
            for item, pending in self._held:
                try:
                    grammar = pending.poll()
                except GrammarError as exc:
                    failed.append((item, exc))
                    continue
                if grammar is None:
                    keep.append((item, pending))
                else:
                    ready.append((item, grammar))
            self._held = keep
        return ready, failed

    def drop(self, gone: Callable[[T], bool]) -> list[T]:
        """Remove and return the items `gone` selects (cancelled requests)."""
        with self._lock:
            dropped = [item for item, _ in self._held if gone(item)]
            self._held = [(item, p) for item, p in self._held if not gone(item)]
        return dropped

    def wake_in(self) -> float | None:
        """Seconds until the nearest deadline (the loop's longest sleep), None when empty."""
        with self._lock:
            if not self._held:
                return None
            return max(0.0, min(p.deadline for _, p in self._held) - time.monotonic())
