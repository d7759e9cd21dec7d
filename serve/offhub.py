"""CPU work of a request (tokenizing, chat-template rendering) on a few real OS threads, off the hub.

The gevent hub serves every connection of the worker: while it tokenizes a 6 MB `inputs` (seconds on
a busy core) or renders and tokenizes a 1024-message chat (~0.7 s), /ping and every stream wait. So
the handler's greenlet hands such work to this pool and waits cooperatively (the hub keeps serving);
the answer, or the exception the work raised (an ApiError included), comes back to that greenlet
as if the call had run there.

The pool is small on purpose, two threads by default (PREPARE_THREADS): a fast tokenizer called the
transformers way (`tokenizer(text)`, a batch encode underneath) releases the GIL while it encodes, so
each thread can take a whole core, and the engine's forward passes need the cores too. (The backend's
single `encode` does not release it: 13 s of GIL for a 6 MB text, measured; do not call it here.
Turning the ids into Python lists still holds the GIL, ~0.2-0.4 s for 1.3 M tokens.) Two let a small request's tokenizing go on beside one huge body's; more
would only take cores from decoding. Jinja rendering is Python and holds the GIL, but the interpreter
switches threads every few milliseconds, so the hub still gets its turns.

Outside a monkey-patched gevent process (unit tests, scripts) the work runs in the caller's thread:
there is no hub to keep free.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from serve.engine.osthread import allocate_lock, original, start_os_thread

T = TypeVar("T")
DEFAULT_THREADS = 2


def in_greenlet() -> bool:
    """True in a greenlet of a monkey-patched gevent process (blocking there would freeze the hub)."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey
    from gevent._hub_local import get_hub_if_exists

    return monkey.is_module_patched("threading") and get_hub_if_exists() is not None


class _Job:
    """One call: run on a pool thread; its outcome is handed back through `notify`."""

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]):
        self.fn, self.args = fn, args
        self.result: Any = None
        self.error: BaseException | None = None
        self._lock = allocate_lock()
        self._notify: Callable[[], None] | None = None
        self._done = False

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args)
        except BaseException as exc:  # handed to the waiting greenlet, which raises it
            self.error = exc
        with self._lock:
            self._done = True
            notify, self._notify = self._notify, None
        if notify is not None:
            notify()

    def on_done(self, notify: Callable[[], None]) -> None:
        """Call `notify` once done (from the pool thread), or now if it already is."""
        with self._lock:
            if not self._done:
                self._notify = notify
                return
        notify()

    def forget(self) -> None:
        """The waiter leaves (killed): its watcher is about to be closed, never call it."""
        with self._lock:
            self._notify = None


class OffHub:
    """`threads` OS threads, started on first use, running calls handed over by greenlets."""

    def __init__(self, threads: int = DEFAULT_THREADS):
        self.threads = threads
        self._queue = original("queue", "SimpleQueue")()  # the C queue: real OS locks, even when patched
        self._lock = allocate_lock()
        self._started = False

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on a pool thread; this greenlet yields to the hub until it is done."""
        if not in_greenlet():
            return fn(*args)
        import gevent
        from gevent.event import Event

        job = _Job(fn, args)
        done = Event()
        watcher = gevent.get_hub().loop.async_()  # the one hub call that is safe from another thread
        watcher.start(done.set)
        try:
            job.on_done(watcher.send)
            self._start()
            self._queue.put(job)
            done.wait()  # no timeout: the caps (PAYLOAD_LIMIT, MAX_MESSAGES, MAX_PROMPTS) bound the work
        finally:
            job.forget()
            watcher.stop()
            watcher.close()
        if job.error is not None:
            raise job.error
        return job.result

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        for _ in range(self.threads):
            start_os_thread(self._work)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            job.run()


_pool: OffHub | None = None
_pool_lock = allocate_lock()


def pool(threads: int = DEFAULT_THREADS) -> OffHub:
    """The process's pool (one gunicorn worker, one pool), made with `threads` on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = OffHub(threads)
        return _pool
