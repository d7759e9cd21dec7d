"""The worker's model runtime: load after fork on a real OS thread, then serve, then drain.

`/ping` only reads `Runtime.ready` (a few attribute reads), so it answers within milliseconds
while the model loads or the engine is saturated. Loading runs on an unpatched OS thread because
in the gevent worker a `threading.Thread` is a greenlet and a 20 s load would freeze the hub.
"""

from __future__ import annotations

import enum
import logging
import sys
import time
from typing import Any

from serve.config import Settings

log = logging.getLogger("serve")


class Status(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


def start_os_thread(target: Any, *args: Any) -> None:
    """Run `target(*args)` on a real OS thread even when gevent has patched `threading`."""
    if "gevent" in sys.modules:
        from gevent import monkey

        start = monkey.get_original("_thread", "start_new_thread")
    else:
        import _thread

        start = _thread.start_new_thread
    start(target, args)


class Runtime:
    """Holds the settings, the tokenizer, the engine and the readiness state of this worker."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.status = Status.LOADING
        self.engine: Any = None
        self.engine_config: Any = None
        self.tokenizer: Any = None
        self.model_name = "model"
        self.error: str | None = None
        self.inflight = 0  # /invocations requests being answered (streams until their last byte)

    @classmethod
    def from_parts(cls, settings: Settings, engine: Any, engine_config: Any, tokenizer: Any, model_name: str) -> Runtime:
        """A ready runtime around an engine built elsewhere (tests, notebooks)."""
        rt = cls(settings)
        rt.engine, rt.engine_config, rt.tokenizer, rt.model_name = engine, engine_config, tokenizer, model_name
        rt.status = Status.READY
        return rt

    @property
    def ready(self) -> bool:
        """What /ping reports: loaded, warmed up, loop alive and not draining."""
        return self.status is Status.READY and self.engine is not None and bool(self.engine.healthy)

    def start_loading(self) -> None:
        """Load the model on a background OS thread; `ready` turns true when it is warmed up.

        That thread exits once the engine runs, taking its OpenMP pool along: from then on only the
        engine thread runs torch. A second live pool, even idle, slows the engine's CPU matmuls
        1.3-2x (libgomp stops spinning once it manages more threads than there are cores).
        """
        start_os_thread(self._load_safely)

    def _load_safely(self) -> None:
        try:
            self.load()
        except Exception as exc:  # the worker stays up so /ping can say 503 and logs say why
            self.error = f"{type(exc).__name__}: {exc}"
            self.status = Status.FAILED
            log.exception("model loading failed; /ping will answer 503")

    def load(self) -> None:
        """Resolve, load, build and warm up the engine (blocking; SPEC section 2 and 6)."""
        from serve.engine.engine import Engine, EngineConfig
        from serve.model_loading import load_model, pick_dtype, resolve_model

        s = self.settings
        t0 = time.monotonic()
        source = resolve_model(s.model_dir, s.hf_model_id, s.hf_model_revision)
        dtype = pick_dtype(s.dtype, on_gpu=_gpus_visible(s.num_gpus))
        model, tokenizer = load_model(source, dtype, num_gpus=s.num_gpus, trust_remote_code=s.trust_remote_code,
                                      pack_linear=s.cpu_packed_linear)
        cfg = EngineConfig.from_model(
            model,
            max_batch_prefill_tokens=s.max_batch_prefill_tokens,
            max_batch_total_tokens=s.max_batch_total_tokens,
            max_concurrent_requests=s.max_concurrent_requests,
            max_input_tokens=s.max_input_tokens,
            max_total_tokens=s.max_total_tokens,
            prefix_cache_tokens=s.prefix_cache_tokens,
        )
        engine = Engine(model, tokenizer, cfg)
        engine.start()
        engine.warmup()
        self.engine, self.engine_config, self.tokenizer = engine, cfg, tokenizer
        self.model_name = s.hf_model_id or source.name
        devices = getattr(model, "hf_device_map", None) or str(next(model.parameters()).device)
        log.info(
            "serving model=%s source=%s reason=%r dtype=%s devices=%s max_input_tokens=%s max_total_tokens=%s "
            "max_batch_prefill_tokens=%s max_batch_total_tokens=%s prefix_cache_tokens=%s max_concurrent_requests=%s mode=%s "
            "ready_in=%.1fs",
            self.model_name, source.path, source.reason, str(dtype).removeprefix("torch."), devices,
            cfg.max_input_tokens, cfg.max_total_tokens, cfg.max_batch_prefill_tokens, cfg.max_batch_total_tokens,
            cfg.prefix_cache_tokens, cfg.max_concurrent_requests, s.mode, time.monotonic() - t0,
        )
        self.status = Status.READY

    def drain(self) -> None:
        """SIGTERM: /ping turns 503 and new work is refused; in-flight requests carry on."""
        if self.status is Status.READY:
            self.status = Status.DRAINING
        if self.engine is not None:
            self.engine.drain()

    def shutdown(self) -> None:
        """Stop the engine loop (after draining)."""
        if self.engine is not None:
            self.engine.shutdown()


def _gpus_visible(num_gpus: int | None) -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0 and num_gpus != 0
