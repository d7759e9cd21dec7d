"""The model service of this worker: load after fork on a real OS thread, then serve, then drain.

`/ping` only reads `ModelService.ready` (a few attribute reads), so it answers within milliseconds
while the model loads, the engine is saturated, or it has just failed. Loading runs on an unpatched
OS thread because in the gevent worker a `threading.Thread` is a greenlet and a 20 s load would
freeze the hub. Once serving, a watchdog (watchdog.py) turns a dead or stalled engine into a worker
restart through `on_fatal`.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from serve.config import Settings
from serve.engine.osthread import start_os_thread
from serve.engine.request import EngineShutdown

if TYPE_CHECKING:
    from serve.engine.config import EngineConfig
    from serve.engine.engine import Engine
    from serve.engine.grammar_pool import GrammarCompiler
    from serve.watchdog import Watchdog

log = logging.getLogger("serve")

# SIGTERM: requests still running this long before the deadline are cut short, and their clients get
# up to FLUSH_SECONDS to receive the error (an error event and the stream's end, or a JSON 503).
CUT_SHORT_SECONDS = 3.0
FLUSH_SECONDS = 1.5


class Status(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class ModelService:
    """Holds the settings, the tokenizer, the engine and the readiness state of this worker."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.status = Status.LOADING
        self.engine: Engine | None = None
        self.engine_config: EngineConfig | None = None
        self.tokenizer: Any = None
        # Compiles response_format / grammar / tool constraints; a handler calls
        # `grammars.submit(constraint).wait()` to answer 422 before streaming. None: not available.
        self.grammars: GrammarCompiler | None = None
        self.model_name = "model"
        self.error: str | None = None
        self.inflight = 0  # /invocations requests being answered (streams until their last byte)
        self.stall_timeout: float | None = None  # seconds without a finished step that mean "stuck"
        # Called (on the watchdog's thread) once the engine is dead or stuck and the requests in
        # flight have been failed: the gunicorn worker exits there so that a fresh one replaces it.
        self.on_fatal: Callable[[str], None] | None = None
        self._watchdog: Watchdog | None = None

    @classmethod
    def from_parts(cls, settings: Settings, engine: Engine, engine_config: EngineConfig, tokenizer: Any,
                   model_name: str) -> ModelService:
        """A ready service around an engine built elsewhere (tests, notebooks)."""
        svc = cls(settings)
        svc.engine, svc.engine_config, svc.tokenizer, svc.model_name = engine, engine_config, tokenizer, model_name
        svc.grammars = engine.grammars
        svc.status = Status.READY
        return svc

    @property
    def ready(self) -> bool:
        """What /ping reports: loaded, warmed up, loop alive and stepping, not draining."""
        engine = self.engine
        if self.status is not Status.READY or engine is None or not engine.healthy:
            return False
        return not (self.stall_timeout and engine.seconds_since_progress() > self.stall_timeout)

    def start_loading(self) -> None:
        """Load the model on a background OS thread; `ready` turns true when it is warmed up.

        That thread exits once the engine runs, taking its OpenMP pool along: from then on only the
        engine thread runs torch. A second live pool, even idle, slows the engine's CPU matmuls
        1.3-2x (libgomp stops spinning once it manages more threads than there are cores).
        """
        start_os_thread(self._load_safely)

    def _load_safely(self) -> None:
        try:
            with collector_paused():
                self.load()
        except Exception as exc:  # the worker stays up so /ping can say 503 and logs say why
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = Status.FAILED
            log.exception("model loading failed; /ping will answer 503")

    def load(self) -> None:
        """Resolve, load, build, warm up and watch the engine (blocking; see the README's Configuration)."""
        from serve.engine.config import EngineConfig
        from serve.engine.engine import Engine
        from serve.engine.interfaces import eos_ids_of
        from serve.model_loading import load_model, pick_dtype, resolve_model
        from serve.watchdog import Watchdog

        s = self.settings
        t0 = time.monotonic()
        source = resolve_model(s.model_dir, s.hf_model_id, s.hf_model_revision)
        dtype, why = pick_dtype(s.dtype, on_gpu=_gpus_visible(s.num_gpus), quantize=s.quantize)
        log.info("dtype %s: %s", str(dtype).removeprefix("torch."), why)
        model, tokenizer = load_model(source, dtype, num_gpus=s.num_gpus, trust_remote_code=s.trust_remote_code,
                                      pack_linear=s.cpu_packed_linear, quantize=s.quantize)
        cfg = EngineConfig.from_model(
            model,
            max_batch_prefill_tokens=s.max_batch_prefill_tokens,
            max_batch_total_tokens=s.max_batch_total_tokens,
            max_concurrent_requests=s.max_concurrent_requests,
            max_input_tokens=s.max_input_tokens,
            max_total_tokens=s.max_total_tokens,
            prefix_cache_tokens=s.prefix_cache_tokens,
            max_batch_size=s.max_batch_size,
        )
        grammars = build_grammar_compiler(s, tokenizer, eos_ids_of(model, tokenizer))
        engine = Engine(model, tokenizer, cfg, grammars)
        engine.start()
        engine.warmup()
        self.stall_timeout = size_stall_timeout(s.engine_stall_timeout, engine, cfg)
        self.engine, self.engine_config, self.tokenizer, self.grammars = engine, cfg, tokenizer, grammars
        self.model_name = s.hf_model_id or source.name
        devices = getattr(model, "hf_device_map", None) or str(next(model.parameters()).device)
        log.info(
            "serving model=%s source=%s reason=%r dtype=%s devices=%s max_input_tokens=%s max_total_tokens=%s "
            "max_batch_prefill_tokens=%s max_batch_total_tokens=%s prefix_cache_tokens=%s max_concurrent_requests=%s mode=%s "
            "engine_stall_timeout=%s ready_in=%.1fs",
            self.model_name, source.path, source.reason, str(dtype).removeprefix("torch."), devices,
            cfg.max_input_tokens, cfg.max_total_tokens, cfg.max_batch_prefill_tokens, cfg.max_batch_total_tokens,
            cfg.prefix_cache_tokens, cfg.max_concurrent_requests, s.mode,
            f"{self.stall_timeout:.0f}s" if self.stall_timeout else "off", time.monotonic() - t0,
        )
        self._watchdog = Watchdog(self, self.stall_timeout)
        self._watchdog.start()
        self.status = Status.READY

    def fail(self, reason: str) -> None:
        """The engine is dead or stuck: /ping says 503 and every request in flight fails with `reason`."""
        self.status, self.error = Status.FAILED, reason
        if self.engine is not None and self.engine.healthy:  # stuck: its own loop cannot fail them
            self.engine.abort(reason)

    def drain(self) -> None:
        """SIGTERM: /ping turns 503 and new work is refused; in-flight requests carry on."""
        if self.status is Status.READY:
            self.status = Status.DRAINING
        if self.engine is not None:
            self.engine.drain()

    def shutdown(self, deadline: float, sleep: Callable[[float], None]) -> int:
        """SIGTERM's sequence, over by the monotonic `deadline`; returns how many requests were cut short.

        Drain: /ping says 503 and in-flight requests carry on until CUT_SHORT_SECONDS before the
        deadline. Those still running then fail with `EngineShutdown` (their clients get an error
        event and the stream's end, or a JSON 503) and get FLUSH_SECONDS to write it. Last, the
        engine loop is asked to stop. `sleep` must yield to the clients' greenlets (gevent.sleep
        in the worker): nothing here blocks the hub.
        """
        self.drain()
        cut_at = deadline - CUT_SHORT_SECONDS
        while self.inflight > 0 and time.monotonic() < cut_at:
            sleep(0.1)
        cut = self.inflight
        if self._watchdog is not None:
            self._watchdog.stop()  # from here on, a failing engine is the plan, not a fault
        if self.grammars is not None:
            self.grammars.close()  # non-blocking: its workers exit after their current compile
        engine = self.engine
        if engine is None:
            return cut
        if cut:
            log.warning("shutdown: %d requests could not finish before the deadline; failing them", cut)
            engine.abort("the server is shutting down and this request could not finish in time", EngineShutdown)
            flush_by = min(deadline, time.monotonic() + FLUSH_SECONDS)
            while self.inflight > 0 and time.monotonic() < flush_by:
                sleep(0.05)
        engine.shutdown(timeout=0)
        while not engine.stopped and time.monotonic() < deadline:
            sleep(0.05)
        return cut


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while the model loads, then everything alive frozen.

    Loading creates millions of objects (a GGUF reader makes a few numpy arrays per vocabulary entry),
    and each full collection walks all of them with the GIL held: SmolLM2's load ran 23 of 300-350 ms,
    each a stall of the gevent hub and so of /ping. Afterwards `gc.freeze` moves the ~415,000 objects
    still alive into the permanent generation (as vLLM does after start-up), so that later full
    collections walk only what serving creates. No collection first: it would free only the ~4,500
    objects the load left in reference cycles, for one more 250-350 ms stall.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def size_stall_timeout(configured: int | None, engine: Engine, cfg: EngineConfig) -> float | None:
    """ENGINE_STALL_TIMEOUT (0: off), or when unset a value sized from a timed prefill (watchdog.py)."""
    from serve.watchdog import TIMED_PREFILL_TOKENS, default_stall_timeout, time_prefill

    if configured is not None:
        return float(configured) or None
    tokens = min(TIMED_PREFILL_TOKENS, cfg.max_input_tokens)
    seconds = time_prefill(engine, tokens)
    timeout = default_stall_timeout(seconds, tokens, cfg.max_batch_prefill_tokens)
    log.info("a %d-token prefill took %.3fs: ENGINE_STALL_TIMEOUT defaults to %.0fs", tokens, seconds, timeout)
    return timeout


def build_grammar_compiler(settings: Settings, tokenizer: Any, eos_ids: set[int]) -> GrammarCompiler | None:
    """The grammar compiler for this tokenizer (1-2 s, while the model loads); None if llguidance cannot
    read the tokenizer (a slow, non-`tokenizers` one): the server then serves without structured output."""
    from serve.engine.grammar import GrammarLimits
    from serve.engine.grammar_pool import GrammarCompiler

    limits = GrammarLimits(max_bytes=settings.grammar_max_bytes, compile_timeout=float(settings.grammar_compile_timeout))
    try:
        return GrammarCompiler.for_tokenizer(tokenizer, eos_ids, limits=limits, cache_size=settings.grammar_cache_size)
    except Exception as exc:
        log.warning("structured output is off: llguidance cannot use this tokenizer (%s: %s)", type(exc).__name__, exc)
        return None


def _gpus_visible(num_gpus: int | None) -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0 and num_gpus != 0
