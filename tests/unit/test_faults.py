"""What a failure costs (serve/engine/faults.py): one request, one forward's requests, or the worker."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

from serve.config import Settings
from serve.engine import sequence
from serve.engine.batch import KVBatch
from serve.engine.detokenize import IncrementalDetokenizer
from serve.engine.faults import Action, Scope, decide, is_device_error, is_out_of_memory
from serve.engine.request import (
    EngineError,
    EngineUnavailable,
    GenerationRequest,
    PrefillEvent,
    SamplingParams,
)
from serve.engine.stopping import StopCriteria
from serve.service import ModelService
from serve.watchdog import Watchdog
from tests.unit.conftest import generate_alone

CUDA_ERROR = "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be asynchronously reported"
CPU_OOM = "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB"


def events_of(handle) -> list:
    return [ev for ev in handle if not isinstance(ev, PrefillEvent)]


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


@pytest.mark.parametrize("exc, scope, action", [
    (Exception("Invalid prefix encountered"), Scope.REQUEST, Action.FAIL_REQUEST),  # tokenizers' DecodeStream
    (ValueError("a stop criterion broke"), Scope.REQUEST, Action.FAIL_REQUEST),
    (MemoryError(), Scope.REQUEST, Action.FAIL_REQUEST),
    (RuntimeError("shape mismatch"), Scope.FORWARD, Action.FAIL_FORWARD),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), Scope.FORWARD, Action.FAIL_FORWARD),
    (RuntimeError(CPU_OOM), Scope.FORWARD, Action.FAIL_FORWARD),
    (RuntimeError(CUDA_ERROR), Scope.FORWARD, Action.RESTART),
    (RuntimeError(CUDA_ERROR), Scope.REQUEST, Action.RESTART),  # a poisoned CUDA context is nobody's row
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"), Scope.FORWARD, Action.RESTART),
    (torch.OutOfMemoryError("CUDA out of memory"), Scope.BATCH_UPDATE, Action.RESTART),
    (RuntimeError("index out of range"), Scope.BATCH_UPDATE, Action.RESTART),
    (KeyboardInterrupt(), Scope.REQUEST, Action.RESTART),
])
def test_classification_table(exc, scope, action):
    assert decide(exc, scope) is action


def test_out_of_memory_is_never_taken_for_a_device_error():
    for exc in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDA error: out of memory"),
                RuntimeError(CPU_OOM), MemoryError()):
        assert is_out_of_memory(exc) and not is_device_error(exc)


class DetokFault(IncrementalDetokenizer):
    """The real detokenizer, raising tokenizers' own error for prompts that end with token 999."""

    def __init__(self, tokenizer, prompt_ids):
        super().__init__(tokenizer, prompt_ids)
        self.armed = prompt_ids[-1] == 999

    def step(self, token_id: int) -> str:
        if self.armed:
            raise Exception("Invalid prefix encountered")
        return super().step(token_id)


class StopFault(StopCriteria):
    """Stop criteria raising on the third token of requests asking for exactly 17 tokens."""

    def __call__(self, token_id, text, new_chars, generated):
        if self.max_new_tokens == 17 and generated == 3:
            raise RuntimeError("a stop criterion broke")
        return super().__call__(token_id, text, new_chars, generated)


@pytest.mark.parametrize("where", ["detokenizer", "stop criteria", "top-n texts"])
def test_a_failure_in_one_row_fails_only_its_request(engine, model, tokenizer, monkeypatch, where):
    bad_prompt, bad = tokenizer.encode("this one breaks"), SamplingParams(max_new_tokens=17, n=2, ignore_eos=True)
    if where == "detokenizer":
        monkeypatch.setattr(sequence, "IncrementalDetokenizer", DetokFault)
        bad_prompt = bad_prompt + [999]
    elif where == "stop criteria":
        monkeypatch.setattr(sequence, "StopCriteria", StopFault)
    else:
        real_text = engine._publisher.token_text

        def token_text(token_id: int) -> str:
            if engine.steps >= 3:
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
            return real_text(token_id)

        monkeypatch.setattr(engine._publisher, "token_text", token_text)
        bad.top_n_tokens = 2
    prompts = [tokenizer.encode(f"good neighbour {i}") for i in range(3)]
    good = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=12, ignore_eos=True))) for p in prompts]
    faulty = engine.submit(GenerationRequest(bad_prompt, bad))
    with pytest.raises(EngineError, match="failed: (Invalid prefix|a stop criterion|'utf-8' codec)"):
        events_of(faulty)
    for p, h in zip(prompts, good):
        assert [ev.token.id for ev in events_of(h)] == generate_alone(model, p, 12)
    wait_for(lambda: engine.batch_size == 0)
    assert engine.healthy and engine.active_requests == 0


def failing_decodes(engine, monkeypatch, error: BaseException, times: int | None = None) -> None:
    """Make the model's one-token forwards (decodes, for prompts longer than a token) raise `error`."""
    real = engine.forward_model
    left = {"n": times}

    def forward(inputs, keep):
        if 1 in inputs["paged_kv"].new and (left["n"] is None or left["n"] > 0):
            if left["n"] is not None:
                left["n"] -= 1
            raise error
        return real(inputs, keep)

    monkeypatch.setattr(engine, "forward_model", forward)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
                                   RuntimeError(CPU_OOM)])
def test_out_of_memory_in_a_decode_fails_that_batch_and_the_engine_goes_on(engine, tokenizer, monkeypatch, error):
    failing_decodes(engine, monkeypatch, error, times=1)
    release = stuck_steps(engine, monkeypatch)  # both victims are admitted together, into the failing decode
    victims = [engine.submit(GenerationRequest(tokenizer.encode(f"v{i}"), SamplingParams(max_new_tokens=8)))
               for i in range(2)]
    release.set()
    for h in victims:
        with pytest.raises(EngineError, match="generation failed: .*allocate"):
            events_of(h)
    after = events_of(engine.submit(GenerationRequest(tokenizer.encode("after"), SamplingParams(max_new_tokens=5, ignore_eos=True))))
    assert len(after) == 5 and engine.healthy


def test_a_device_error_fails_every_request_and_stops_the_engine(engine, tokenizer, monkeypatch):
    failing_decodes(engine, monkeypatch, RuntimeError(CUDA_ERROR), times=1)
    handles = [engine.submit(GenerationRequest(tokenizer.encode(f"r{i}"), SamplingParams(max_new_tokens=8)))
               for i in range(3)]
    for h in handles:
        with pytest.raises(EngineError, match="device error in a decode forward: CUDA error: an illegal memory access"):
            events_of(h)
    assert not engine.healthy and "illegal memory access" in (engine.error or "")
    with pytest.raises(EngineUnavailable, match="illegal memory access"):
        engine.submit(GenerationRequest([5, 6], SamplingParams()))


def test_decode_steps_that_keep_failing_stop_the_engine(engine, tokenizer, monkeypatch):
    """A sticky error that is not recognisably a device error: each request fails, then the third step ends it."""
    failing_decodes(engine, monkeypatch, RuntimeError("cuDNN misbehaved in an unknown way"))
    for i in range(2):
        with pytest.raises(EngineError, match="generation failed: cuDNN misbehaved"):
            events_of(engine.submit(GenerationRequest(tokenizer.encode(f"try {i}"), SamplingParams(max_new_tokens=4))))
        assert engine.healthy
    with pytest.raises(EngineError):
        events_of(engine.submit(GenerationRequest(tokenizer.encode("the third try"), SamplingParams(max_new_tokens=4))))
    wait_for(lambda: not engine.healthy)
    assert "3 decode steps in a row failed" in (engine.error or "")


def test_an_error_while_merging_new_rows_stops_the_engine_without_repeating_tokens(engine, tokenizer, monkeypatch):
    running = engine.submit(GenerationRequest(tokenizer.encode("running"), SamplingParams(max_new_tokens=200, ignore_eos=True)))
    it = iter(running)
    next(it)  # the running batch exists
    monkeypatch.setattr(KVBatch, "merged", lambda self, other: (_ for _ in ()).throw(RuntimeError("half-merged")))
    newcomer = engine.submit(GenerationRequest(tokenizer.encode("newcomer"), SamplingParams(max_new_tokens=5)))
    got: list[int] = []
    with pytest.raises(EngineError, match="while merging new rows into the batch: half-merged"):
        for ev in newcomer:
            got.append(ev.index)
    assert got == []  # the merge comes before anything of the newcomer is sent: no token can go out twice
    with pytest.raises(EngineError, match="half-merged"):
        list(it)
    assert not engine.healthy


def stuck_steps(engine, monkeypatch) -> threading.Event:
    """From now on the next step blocks until the returned event is set."""
    release = threading.Event()
    real = engine.step

    def step():
        release.wait(30)
        real()

    monkeypatch.setattr(engine, "step", step)
    return release


def test_a_stuck_step_shows_and_abort_fails_its_requests_from_outside(engine, tokenizer, monkeypatch):
    assert engine.seconds_since_progress() == 0.0  # idle is not stuck
    release = stuck_steps(engine, monkeypatch)
    handle = engine.submit(GenerationRequest(tokenizer.encode("stuck"), SamplingParams(max_new_tokens=4)))
    wait_for(lambda: engine.seconds_since_progress() > 0.2)
    engine.abort("engine stalled: test")
    with pytest.raises(EngineError, match="engine stalled: test"):
        events_of(handle)
    assert not engine.healthy
    release.set()


@pytest.fixture
def service(engine, tokenizer):
    svc = ModelService.from_parts(Settings(), engine, engine.config, tokenizer, "tiny")
    fatal: list[str] = []
    svc.on_fatal = fatal.append
    yield svc, fatal
    if svc._watchdog is not None:
        svc._watchdog.stop()


def test_the_watchdog_restarts_a_worker_whose_step_hangs(service, engine, tokenizer, monkeypatch):
    svc, fatal = service
    svc.stall_timeout = 0.5
    svc._watchdog = Watchdog(svc, 0.5)
    svc._watchdog.start()
    assert svc.ready
    release = stuck_steps(engine, monkeypatch)
    t0 = time.monotonic()
    handle = engine.submit(GenerationRequest(tokenizer.encode("hang"), SamplingParams(max_new_tokens=4)))
    wait_for(lambda: not svc.ready)
    assert 0.5 <= time.monotonic() - t0 < 3.0
    with pytest.raises(EngineError, match=r"engine stalled: no step finished for 0\.\ds \(ENGINE_STALL_TIMEOUT=0\.5s\)"):
        events_of(handle)
    wait_for(lambda: bool(fatal))
    assert fatal[0].startswith("engine stalled") and svc.error == fatal[0]
    release.set()


def test_the_watchdog_restarts_a_worker_whose_engine_died(service, engine, tokenizer, monkeypatch):
    svc, fatal = service
    svc._watchdog = Watchdog(svc, None)
    svc._watchdog.start()
    failing_decodes(engine, monkeypatch, RuntimeError(CUDA_ERROR), times=1)
    with pytest.raises(EngineError):
        events_of(engine.submit(GenerationRequest(tokenizer.encode("boom"), SamplingParams(max_new_tokens=4))))
    assert not svc.ready  # from the moment the loop died, before the watchdog acts
    wait_for(lambda: bool(fatal))
    assert "illegal memory access" in fatal[0]


def test_importing_the_app_does_not_import_torch():
    """A replacement worker answers /ping as soon as it imports the app: torch loads later, on the loader thread."""
    code = "import sys, serve.app; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_the_stall_timeout_is_configured_or_sized_from_a_timed_prefill(engine):
    from serve.service import size_stall_timeout
    from serve.watchdog import STALL_FLOOR, default_stall_timeout

    assert default_stall_timeout(0.5, 256, 4096) == 80.0  # 10x a 4096-token prefill extrapolated from 256
    assert default_stall_timeout(0.01, 256, 4096) == STALL_FLOOR
    assert Settings.from_env({"ENGINE_STALL_TIMEOUT": "0"}).engine_stall_timeout == 0
    assert size_stall_timeout(0, engine, engine.config) is None  # 0: no stall watchdog
    assert size_stall_timeout(12, engine, engine.config) == 12.0
    assert size_stall_timeout(None, engine, engine.config) >= STALL_FLOOR
    assert engine.active_requests == 0 and engine.healthy
