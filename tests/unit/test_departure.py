"""Gone clients stop costing anything (serve/handlers/departure.py), over a real engine and a tiny Llama.

The engine is slowed by a logits processor that sleeps, so a request left running would still be in
the engine seconds later; each test asserts the engine is empty well before that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from serve import validation
from serve.app import Invocations, create_app
from serve.config import Settings
from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.handlers import departure, generate
from serve.protocol.errors import Api, ApiError
from serve.service import ModelService

SLOW = 0.05  # seconds per token of a slowed request: 200 tokens take 10 s
GEN = {"inputs": "tell me a long story", "parameters": {"max_new_tokens": 200}}


def slow(history, row):
    time.sleep(SLOW)
    return row


@pytest.fixture
def svc(model, tokenizer):
    cfg = EngineConfig.from_model(model, max_batch_total_tokens=8192, max_total_tokens=256, max_concurrent_requests=8)
    eng = Engine(model, tokenizer, cfg)
    eng.start()
    yield ModelService.from_parts(Settings(), eng, cfg, tokenizer, "tiny")
    eng.shutdown()


def slowed(monkeypatch, name: str, first=None) -> None:
    """Every request built by validation.`name` gets the sleeping processor (the first one `first` instead)."""
    original, calls = getattr(validation, name), []

    def build(*args):
        params = original(*args)
        calls.append(1)
        params.logits_processors.append(first if first is not None and len(calls) == 1 else slow)
        return params

    monkeypatch.setattr(validation, name, build)


def engine_empty_within(svc: ModelService, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while svc.engine.active_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    return svc.engine.active_requests == 0


def leave_after(client: departure.Client, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, client.leave)
    timer.start()
    return timer


def test_a_plain_request_is_cancelled_when_its_client_leaves(svc, monkeypatch):
    slowed(monkeypatch, "generate_params")
    client = departure.Client()
    leave_after(client, 0.3)
    with client.attached(), pytest.raises(ApiError) as err:
        generate.handle(svc, GEN)
    assert err.value.status == 499 and err.value.error_type == "client_closed_request"
    assert engine_empty_within(svc, 2.0)


def test_nothing_is_submitted_for_a_client_already_gone(svc):
    client = departure.Client()
    client.leave()
    with client.attached(), pytest.raises(ApiError) as err:
        generate.handle(svc, GEN)
    assert err.value.status == 499 and svc.engine.active_requests == 0


def test_one_failed_prompt_cancels_the_other_prompts_of_a_completion(svc, monkeypatch):
    seen = []

    def explode(history, row):  # the first prompt fails after a few tokens
        seen.append(1)
        if len(seen) > 3:
            raise RuntimeError("boom on purpose")
        return row

    slowed(monkeypatch, "openai_params", first=explode)
    body = {"prompt": ["first prompt", "second prompt", "third prompt"], "max_tokens": 200, "logit_bias": {"2": -100}}
    r = create_app(service=svc).test_client().post("/invocations", json=body)
    assert r.status_code == 424 and "boom on purpose" in r.get_json()["error"]["message"]
    assert engine_empty_within(svc, 2.0), f"{svc.engine.active_requests} prompts still generating"


def test_a_jsonlines_batch_stops_when_its_client_leaves(svc, monkeypatch):
    slowed(monkeypatch, "generate_params")
    client = departure.Client()
    leave_after(client, 0.3)
    text = "\n".join(json.dumps(GEN) for _ in range(4))
    with client.attached():
        out = Invocations(svc, Api.GENERATE).jsonlines(text).get_data(as_text=True).splitlines()
    assert [json.loads(line)["error_type"] for line in out] == ["client_closed_request"] * 4
    assert engine_empty_within(svc, 2.0)


def test_jsonlines_concurrency_defaults_to_a_quarter_of_the_concurrent_requests():
    assert Settings().jsonlines_concurrency == 32
    assert Settings.from_env({"MAX_CONCURRENT_REQUESTS": "2"}).jsonlines_concurrency == 1
    assert Settings.from_env({"MAX_CONCURRENT_REQUESTS": "2", "JSONLINES_CONCURRENCY": "5"}).jsonlines_concurrency == 5


def test_the_watcher_sees_a_peer_close_under_gevent():
    """A greenlet watching a socket (as gunicorn's) cancels when the peer closes, not before; pipelined
    bytes are not mistaken for a close; closing the response stops the watcher."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "tests.unit.departure_probe"], cwd=root, capture_output=True,
                         text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == {"open": 0, "pipelined": 0, "closed": 1, "pipelined_then_closed": 1,
                                      "watcher_dead": True}


def test_a_cancelled_request_frees_its_slot_before_the_engine_steps(model, tokenizer):
    """The door counts requests whose clients wait: a cancelled one stops counting at once, not at the
    engine's next step (a step takes seconds under load, and 128 clients of which some hang up would
    otherwise get 429s meanwhile; the load test, bench/load.py, saw 1,919 of 2,300 answers be 429)."""
    from serve.engine.request import EngineOverloaded, GenerationRequest, SamplingParams

    cfg = EngineConfig.from_model(model, max_batch_total_tokens=8192, max_total_tokens=256, max_concurrent_requests=2)
    eng = Engine(model, tokenizer, cfg)
    eng.start()
    try:
        step = threading.Event()

        def stuck(history, row):  # the step never ends until the test says so
            step.wait(30)
            return row

        prompt = tokenizer.encode("a long story")
        params = SamplingParams(max_new_tokens=50, ignore_eos=True, logits_processors=[stuck])
        first, second = (eng.submit(GenerationRequest(prompt, params)) for _ in range(2))
        with pytest.raises(EngineOverloaded):
            eng.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=2)))
        first.cancel()
        steps = eng.steps
        third = eng.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=2)))  # no 429
        assert eng.steps == steps  # admitted while the engine was still inside the same step
        with pytest.raises(EngineOverloaded):  # the limit still holds for the requests that are live
            eng.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=2)))
        step.set()
        second.cancel()
        assert len([e for e in third if not hasattr(e, "tokens")]) == 2
        assert engine_empty_within(ModelService.from_parts(Settings(), eng, cfg, tokenizer, "tiny"), 10.0)
    finally:
        step.set()
        eng.shutdown()
