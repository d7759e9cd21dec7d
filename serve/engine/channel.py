"""Hands events from the engine's OS thread to whoever waits for them.

Two kinds of waiter exist: gevent greenlets (the gunicorn worker) and plain OS threads (tests,
benchmarks, tools). A greenlet must never block its hub on an OS lock, so it is woken through a
loop async watcher, the one libev/libuv primitive that is safe to trigger from another thread.
Wakeups merge (many `send()`s may fire the callback once), so the waiter always drains the whole
queue, never one item per wakeup.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable, Iterator, Sequence

from serve.engine.osthread import allocate_lock
from serve.engine.request import EngineError, PrefillEvent, Timings, TokenEvent

Event = TokenEvent | PrefillEvent


def _in_gevent_hub_thread() -> bool:
    """True when the caller runs under a gevent hub in a monkey-patched process (a greenlet)."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey
    from gevent._hub_local import get_hub_if_exists

    # A plain OS thread (the engine's, a test's) has no hub; blocking it on a lock is fine.
    return monkey.is_module_patched("threading") and get_hub_if_exists() is not None


class OSEvent:
    """An auto-reset event made of raw `_thread` locks.

    threading.Condition/Event are unusable here even "unpatched": under gevent's monkey-patching
    the stdlib classes allocate their inner locks through the patched module, i.e. gevent locks.
    """

    def __init__(self) -> None:
        self._mutex = allocate_lock()
        self._gate = allocate_lock()
        self._gate.acquire()
        self._set = False

    def set(self) -> None:
        with self._mutex:
            if not self._set:
                self._set = True
                self._gate.release()

    def wait(self, timeout: float = -1) -> bool:
        """Block until `set` (or the timeout); consumes the signal."""
        if not self._gate.acquire(timeout=timeout):
            return False
        with self._mutex:
            self._set = False
        return True


class _ThreadWaker:
    """Blocks a plain OS thread until the engine calls `notify`."""

    def __init__(self) -> None:
        self._event = OSEvent()

    def notify(self) -> None:
        self._event.set()

    def wait(self) -> None:
        self._event.wait()

    def close(self) -> None:
        pass


class _GeventWaker:
    """Parks a greenlet until the engine thread calls `notify` (through an async watcher)."""

    def __init__(self) -> None:
        import gevent
        from gevent.event import Event as GEvent

        self._event = GEvent()
        self._watcher = gevent.get_hub().loop.async_()
        self._watcher.start(self._event.set)

    def notify(self) -> None:
        self._watcher.send()  # thread-safe: the only call the engine thread makes on the hub

    def wait(self) -> None:
        self._event.wait()
        self._event.clear()

    def close(self) -> None:
        self._watcher.stop()
        self._watcher.close()


class RequestHandle:
    """The consumer's side of one request: iterate it for events; `cancel()` to hang up.

    Iteration yields a `PrefillEvent` first (only when prefill logprobs were asked) and then
    `TokenEvent`s until every sequence has finished; it raises `EngineError` if the request failed.
    """

    def __init__(self, request_id: str, cancel: Callable[[str], None]):
        self.request_id = request_id
        self.timings = Timings()
        self._cancel = cancel
        # Events, then None (finished) or an exception (failed). Written by the engine thread (or the
        # watchdog's thread, when the engine is stuck), read by the consumer; deque ops are atomic.
        self._queue: collections.deque[Event | BaseException | None] = collections.deque()
        self._waker: _ThreadWaker | _GeventWaker = _GeventWaker() if _in_gevent_hub_thread() else _ThreadWaker()
        self._done = False

    # -- engine thread side -------------------------------------------------------------------
    def put(self, event: Event) -> None:
        """Engine thread: publish one event."""
        self._queue.append(event)
        self._waker.notify()

    def put_many(self, events: Sequence[Event]) -> None:
        """Engine thread: publish several events with one wakeup."""
        self._queue.extend(events)
        self._waker.notify()

    def fail(self, error: BaseException) -> None:
        """Engine thread (or the watchdog): end the request with an error, raised to the consumer as EngineError."""
        err = error if isinstance(error, EngineError) else EngineError(str(error) or type(error).__name__)
        self._queue.append(err)
        self._waker.notify()

    def close(self) -> None:
        """Engine thread: no more events will come."""
        self._queue.append(None)
        self._waker.notify()

    # -- consumer side ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Event]:
        try:
            while True:
                while self._queue:
                    item = self._queue.popleft()
                    if item is None:
                        self._done = True
                        return
                    if isinstance(item, BaseException):
                        self._done = True
                        raise item
                    yield item
                self._waker.wait()
        finally:
            if not self._done:  # the consumer stopped early (client hung up): free the row
                self.cancel()
            self._waker.close()

    def cancel(self) -> None:
        """Ask the engine to drop this request; its rows leave the batch at the next step."""
        if not self._done:
            self._done = True
            self._cancel(self.request_id)
