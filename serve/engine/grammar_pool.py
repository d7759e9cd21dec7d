"""Grammar compilation off the gevent hub and off the engine loop, with an LRU cache.

A few real OS threads compile (llguidance releases the GIL while it builds a matcher, so they run
beside the engine's forward passes). `GrammarCompiler.submit` never blocks: it answers a
`PendingGrammar` that

- a handler greenlet `wait()`s on cooperatively (the hub keeps serving), to answer a 422 before
  any byte of the response is sent when the constraint is invalid, too large or too slow;
- the engine `poll()`s once per step without blocking, admitting the request once its grammar is
  ready, so one request's compile never delays the rows already decoding.

Equal constraints share one compilation (in flight or cached). Failures are cached too: the same
bad schema sent again fails at once. The time budget belongs to each waiter (its deadline), not to
the compilation: a compile that outlives one request's patience still fills the cache.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import llguidance

from serve.engine.channel import OSEvent
from serve.engine.grammar import (
    DEFAULT_LIMITS,
    CompiledGrammar,
    Constraint,
    GrammarError,
    GrammarLimits,
    GrammarTooSlow,
    InvalidGrammar,
    compile_grammar,
    grammar_tokenizer,
)
from serve.engine.osthread import allocate_lock, start_os_thread

log = logging.getLogger(__name__)


class _Compilation:
    """One constraint being compiled (or compiled): the result, or the error, once done."""

    def __init__(self, constraint: Constraint, deadline: float):
        self.constraint = constraint
        self.deadline = deadline  # the latest of its waiters' deadlines: past it, nobody waits
        self.grammar: CompiledGrammar | None = None
        self.error: GrammarError | None = None
        self.done = False
        self._lock = allocate_lock()
        self._callbacks: list[Callable[[], None]] = []

    def finish(self, grammar: CompiledGrammar | None, error: GrammarError | None) -> None:
        """Worker thread: store the outcome and run the waiters' callbacks."""
        with self._lock:
            self.grammar, self.error, self.done = grammar, error, True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a waiter's wakeup must not kill the worker thread
                log.exception("grammar waiter callback failed")

    def on_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from any thread) once done; at once if it already is."""
        with self._lock:
            if not self.done:
                self._callbacks.append(callback)
                return
        callback()

    def forget(self, callback: Callable[[], None]) -> None:
        """Drop a callback whose waiter gave up (its watcher is about to be closed)."""
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)


class PendingGrammar:
    """One request's handle on a compilation, with that request's deadline."""

    def __init__(self, compilation: _Compilation, deadline: float, timeout: float):
        self._compilation = compilation
        self.deadline = deadline  # time.monotonic() clock
        self._timeout = timeout

    @property
    def constraint(self) -> Constraint:
        return self._compilation.constraint

    def on_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the compiling thread, or now) once compiled or failed: the engine's
        wakeup, so that a loop with only compiling requests sleeps until one is ready."""
        self._compilation.on_done(callback)

    def poll(self) -> CompiledGrammar | None:
        """Non-blocking (the engine's call): the grammar, None while compiling, or a GrammarError."""
        c = self._compilation
        if c.done:
            if c.error is not None:  # a fresh instance: re-raising a shared one grows its traceback
                raise type(c.error)(c.error.message)
            return c.grammar
        if time.monotonic() > self.deadline:
            raise self._too_slow()
        return None

    def wait(self) -> CompiledGrammar:
        """Block until compiled or past the deadline; a greenlet yields to the hub meanwhile."""
        remaining = self.deadline - time.monotonic()
        if not self._compilation.done and remaining > 0:
            _wait_for(self._compilation, remaining)
        grammar = self.poll()
        if grammar is None:  # woken by the timeout, not by the compilation
            raise self._too_slow()
        return grammar

    def _too_slow(self) -> GrammarTooSlow:
        kind = self.constraint.kind.value
        return GrammarTooSlow(f"the {kind} did not compile within {self._timeout:g} s; simplify it")


def _in_greenlet() -> bool:
    """True in a greenlet of a monkey-patched gevent process (blocking there would freeze the hub)."""
    if "gevent" not in sys.modules:
        return False
    from gevent import monkey
    from gevent._hub_local import get_hub_if_exists

    return monkey.is_module_patched("threading") and get_hub_if_exists() is not None


def _wait_for(compilation: _Compilation, timeout: float) -> None:
    if not _in_greenlet():
        event = OSEvent()
        compilation.on_done(event.set)
        event.wait(timeout)
        return
    import gevent
    from gevent.event import Event

    done = Event()
    watcher = gevent.get_hub().loop.async_()  # the one hub call that is safe from another thread
    watcher.start(done.set)
    send = watcher.send  # one bound method, so that `forget` finds the very callback it registered
    try:
        compilation.on_done(send)
        done.wait(timeout)
    finally:
        compilation.forget(send)
        watcher.stop()
        watcher.close()


class GrammarCompiler:
    """Compiles constraints for one tokenizer on `workers` OS threads; caches `cache_size` results."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, limits: GrammarLimits = DEFAULT_LIMITS,
                 workers: int = 2, cache_size: int = 64):
        self.tokenizer, self.limits = tokenizer, limits
        self.cache_size = cache_size
        self.hits = self.misses = 0
        self._lock = allocate_lock()
        self._wake = OSEvent()
        self._jobs: collections.deque[_Compilation] = collections.deque()
        self._inflight: dict[Constraint, _Compilation] = {}
        self._cache: collections.OrderedDict[Constraint, _Compilation] = collections.OrderedDict()
        self._workers = workers
        self._started = False
        self._closed = False

    @classmethod
    def for_tokenizer(cls, hf_tokenizer: Any, eos_ids: set[int] | None = None, **kwargs: Any) -> GrammarCompiler:
        """Build llguidance's tokenizer view (1-2 s: do it while the model loads) and the compiler."""
        return cls(grammar_tokenizer(hf_tokenizer, eos_ids), **kwargs)

    def submit(self, constraint: Constraint) -> PendingGrammar:
        """Start compiling `constraint` unless it is cached or already compiling; never blocks."""
        if self._closed:
            raise RuntimeError("the grammar compiler is closed")
        deadline = time.monotonic() + self.limits.compile_timeout
        with self._lock:
            compilation = self._cache.get(constraint) or self._inflight.get(constraint)
            if compilation is not None:
                self.hits += 1
                compilation.deadline = max(compilation.deadline, deadline)
                if constraint in self._cache:
                    self._cache.move_to_end(constraint)
            else:
                self.misses += 1
                compilation = self._inflight[constraint] = _Compilation(constraint, deadline)
                self._jobs.append(compilation)
                self._start_workers()
        self._wake.set()
        return PendingGrammar(compilation, deadline, self.limits.compile_timeout)

    def compile(self, constraint: Constraint) -> CompiledGrammar:
        """Submit and wait (tests, tools, the bench); raises a GrammarError."""
        return self.submit(constraint).wait()

    def close(self) -> None:
        """Stop the workers once they finish what they are compiling."""
        self._closed = True
        for _ in range(self._workers):
            self._wake.set()

    def _start_workers(self) -> None:
        if not self._started:  # lazily: a server without constrained requests runs no extra threads
            self._started = True
            for _ in range(self._workers):
                start_os_thread(self._work)

    def _work(self) -> None:
        self._serve_jobs()
        self._wake.set()  # closing: wake the next worker so that it exits too

    def _serve_jobs(self) -> None:
        while not self._closed:
            with self._lock:
                compilation = self._jobs.popleft() if self._jobs else None
                more = bool(self._jobs)
            if compilation is None:
                self._wake.wait()
                continue
            if more:
                self._wake.set()  # the event wakes one worker per set: pass the baton
            if time.monotonic() > compilation.deadline:
                self._abandon(compilation)  # queued past every waiter's patience: the queue stays bounded
            else:
                self._run(compilation)

    def _abandon(self, compilation: _Compilation) -> None:
        with self._lock:
            self._inflight.pop(compilation.constraint, None)
        kind = compilation.constraint.kind.value
        compilation.finish(None, GrammarTooSlow(f"the {kind} waited too long to be compiled; try again"))

    def _run(self, compilation: _Compilation) -> None:
        grammar = error = None
        cacheable = True
        try:
            grammar = compile_grammar(compilation.constraint, self.tokenizer, self.limits)
            log.debug("compiled %s grammar in %.1f ms", compilation.constraint.kind.value, grammar.seconds * 1e3)
        except GrammarError as exc:
            error = exc
        except BaseException as exc:  # a panic inside llguidance (PanicException) included
            log.exception("grammar compilation crashed")
            error, cacheable = InvalidGrammar(f"the grammar could not be compiled: {exc!r}"), False
        with self._lock:
            self._inflight.pop(compilation.constraint, None)
            if cacheable:
                self._cache[compilation.constraint] = compilation
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        compilation.finish(grammar, error)
