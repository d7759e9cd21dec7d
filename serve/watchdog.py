"""The worker's watchdog: a dead or stuck engine takes the worker down so that a fresh one replaces it.

`/ping` says 503 from the moment the engine fails or stalls (`ModelService.ready` reads the engine's
health flag and its stall clock). This thread makes the endpoint heal without anyone's help: it
fails every request still in flight with a clear error, gives their clients a moment to receive it,
then calls the service's `on_fatal` hook, with which the gunicorn worker exits non-zero so that the
arbiter forks a fresh worker (see container/gunicorn.conf.py). It never touches torch: a second
thread running torch would bring its own OpenMP pool, which slows the engine's matmuls.

A stall is "work waiting or running, and no step finished for ENGINE_STALL_TIMEOUT seconds": a
hung kernel, a deadlock, a step that never ends. The default timeout is sized from the model at
start-up: a timed warm-up prefill, extrapolated to a full MAX_BATCH_PREFILL_TOKENS prefill, times a
generous factor, never under a floor (a legitimate step must never be mistaken for a hang).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from serve.engine.channel import OSEvent
from serve.engine.osthread import start_os_thread
from serve.engine.request import GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from serve.engine.engine import Engine
    from serve.service import ModelService

log = logging.getLogger("serve")

STALL_FACTOR = 10.0  # a step may take this many times the extrapolated full prefill before it is a stall
STALL_FLOOR = 30.0  # seconds; also covers a busy CPU, a cold cache, a first-seen shape
TIMED_PREFILL_TOKENS = 256
FLUSH_SECONDS = 5.0  # time the failed requests' clients get to receive their error before the exit
TICK = 0.25  # seconds between looks at the engine (reads two attributes)


def time_prefill(engine: Engine, tokens: int, runs: int = 2) -> float:
    """Seconds the engine takes to prefill a `tokens`-long prompt: the best of `runs` (the first one
    may pay one-time costs such as oneDNN primitives for new shapes)."""
    best = float("inf")
    for run in range(runs):
        prompt = [(7 + 31 * i + 101 * run) % engine.vocab_size for i in range(tokens)]  # no prefix-cache hit
        handle = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=1)))
        for _ in handle:
            pass
        t = handle.timings
        best = min(best, (t.first_token or time.monotonic()) - (t.prefill_start or t.queued))
    return best


def default_stall_timeout(prefill_seconds: float, prefill_tokens: int, max_prefill_tokens: int) -> float:
    """ENGINE_STALL_TIMEOUT when unset: STALL_FACTOR x a full prefill (linear extrapolation), at least STALL_FLOOR."""
    return max(STALL_FLOOR, STALL_FACTOR * prefill_seconds * max_prefill_tokens / max(1, prefill_tokens))


class Watchdog:
    """Watches one service's engine from its own OS thread; acts once, then ends."""

    def __init__(self, service: ModelService, stall_timeout: float | None):
        self.service, self.stall_timeout = service, stall_timeout
        self._stop = OSEvent()

    def start(self) -> None:
        start_os_thread(self._watch)

    def stop(self) -> None:
        """Stop watching (shutdown: the engine is about to stop on purpose)."""
        self._stop.set()

    def verdict(self) -> str | None:
        """Why the engine can no longer serve, or None while it can."""
        engine = self.service.engine
        if engine is None:
            return None
        if not engine.healthy:
            return engine.error or "the engine stopped"
        waited = engine.seconds_since_progress()
        if self.stall_timeout and waited > self.stall_timeout:
            return f"engine stalled: no step finished for {waited:.1f}s (ENGINE_STALL_TIMEOUT={self.stall_timeout:g}s)"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(TICK):
            reason = self.verdict()
            if reason is not None:
                self._act(reason)
                return

    def _act(self, reason: str) -> None:
        svc = self.service
        log.critical("%s; failing the requests in flight and restarting the worker", reason)
        svc.fail(reason)
        deadline = time.monotonic() + FLUSH_SECONDS
        while svc.inflight > 0 and time.monotonic() < deadline and not self._stop.wait(0.05):
            pass  # the clients' greenlets are writing their error events
        if svc.on_fatal is None:
            log.critical("no restart hook (not running under gunicorn): this process stays unhealthy")
            return
        svc.on_fatal(reason)
