"""The Flask app over a real engine running a tiny random Llama (fast; no gunicorn, no SmolLM2 weights).

What a real model cannot be made to do on demand is forced here: a generation failure (424) in a
plain and a streamed answer, a missing or raising chat template, a loading worker, an overload.
"""

from __future__ import annotations

import copy
import json
import math
import time

import pytest

from serve import validation
from serve.app import create_app
from serve.config import Settings
from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.service import ModelService

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
GEN = {"inputs": "hello there", "parameters": {"max_new_tokens": 4, "details": True}}


@pytest.fixture(scope="module")
def small_engine(model, tokenizer):
    cfg = EngineConfig.from_model(model, max_batch_total_tokens=4096, max_total_tokens=256, max_concurrent_requests=2)
    eng = Engine(model, tokenizer, cfg)
    eng.start()
    yield eng, cfg
    eng.shutdown()


def client_for(small_engine, tokenizer, **settings):
    eng, cfg = small_engine
    deadline = time.monotonic() + 10
    while eng.active_requests and time.monotonic() < deadline:  # cancelled rows leave at the next step
        time.sleep(0.01)
    svc = ModelService.from_parts(Settings(**settings), eng, cfg, tokenizer, "tiny")
    return create_app(service=svc).test_client()


def explode(history, row):
    raise RuntimeError("boom on purpose")


def test_generate_and_chat_answer(small_engine, tokenizer):
    c = client_for(small_engine, tokenizer)
    r = c.post("/invocations", json=GEN)
    out = r.get_json()[0]
    assert r.status_code == 200 and out["details"]["generated_tokens"] == 4
    assert out["generated_text"] == "hello there" + "".join(t["text"] for t in out["details"]["tokens"])
    r = c.post("/invocations", json=CHAT)
    assert r.status_code == 200 and r.get_json()["usage"]["completion_tokens"] <= 4


def test_generation_failure_is_424_plain_and_in_stream(small_engine, tokenizer, monkeypatch):
    c = client_for(small_engine, tokenizer)
    original = validation.generate_params

    def failing(p, max_new):
        params = original(p, max_new)
        params.logits_processors.append(explode)
        return params

    monkeypatch.setattr(validation, "generate_params", failing)
    r = c.post("/invocations", json=GEN)
    assert r.status_code == 424 and r.get_json()["error_type"] == "generation"
    assert "boom on purpose" in r.get_json()["error"]
    r = c.post("/invocations", json={**GEN, "stream": True, "parameters": {"max_new_tokens": 4}})
    events = [e for e in r.get_data(as_text=True).split("\n\n") if e]
    assert r.status_code == 200 and json.loads(events[-1][5:])["error_type"] == "generation"


def test_chat_failure_after_stream_start_ends_with_error_then_done(small_engine, tokenizer, monkeypatch):
    c = client_for(small_engine, tokenizer)
    original = validation.openai_params

    def failing(*args):
        params = original(*args)
        params.logits_processors.append(explode)
        return params

    monkeypatch.setattr(validation, "openai_params", failing)
    r = c.post("/invocations", json={**CHAT, "stream": True})
    events = [e for e in r.get_data(as_text=True).split("\n\n") if e]
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(events[-2][6:])["error"]["type"] == "generation" and events[-1] == "data: [DONE]"


def test_template_missing_raising_and_overridden(small_engine, tokenizer):
    eng, cfg = small_engine
    bare = copy.copy(tokenizer)
    bare.chat_template = None
    c = create_app(service=ModelService.from_parts(Settings(), eng, cfg, bare, "tiny")).test_client()
    r = c.post("/invocations", json=CHAT)
    assert r.status_code == 422 and r.get_json()["error"] == {
        "message": "Template error: template not found", "type": "template_error", "param": None, "code": 422}
    raising = "{{ raise_exception('roles must alternate') }}"
    c = client_for(small_engine, bare, chat_template=raising)
    r = c.post("/invocations", json=CHAT)
    assert r.status_code == 422 and "roles must alternate" in r.get_json()["error"]["message"]
    c = client_for(small_engine, bare, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert c.post("/invocations", json=CHAT).status_code == 200


def test_loading_worker_answers_503(tokenizer):
    c = create_app(service=ModelService(Settings())).test_client()
    r = c.get("/ping")
    assert r.status_code == 503 and r.get_json() == {"error": "unhealthy", "error_type": "healthcheck"}
    r = c.post("/invocations", json=GEN)
    assert r.status_code == 503 and r.get_json()["error_type"] == "unhealthy"


def test_overload_is_429_at_the_door(small_engine, tokenizer):
    c = client_for(small_engine, tokenizer)
    body = {**CHAT, "stream": True, "max_tokens": 200}
    held = [c.post("/invocations", json=body, buffered=False) for _ in range(2)]  # streams not read yet
    try:
        r = c.post("/invocations", json=CHAT)
        assert r.status_code == 429 and r.get_json()["error"]["type"] == "overloaded"
    finally:
        for h in held:
            h.close()


def test_jsonlines_in_a_plain_process(small_engine, tokenizer):
    c = client_for(small_engine, tokenizer)
    lines = [json.dumps(GEN), "[", json.dumps({"inputs": ""}), json.dumps(CHAT)]
    r = c.post("/invocations", data="\n".join(lines), content_type="application/jsonl")
    out = [json.loads(x) for x in r.get_data(as_text=True).splitlines()]
    assert r.status_code == 200 and r.mimetype == "application/jsonlines" and len(out) == 4, out
    assert out[0][0]["generated_text"].startswith("hello there")
    assert out[1]["error_type"] == "validation" and "cannot be empty" in out[2]["error"]
    assert out[3]["object"] == "chat.completion"


def test_chat_stream_carries_logprobs_and_usage(small_engine, tokenizer):
    c = client_for(small_engine, tokenizer)
    body = {**CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    events = [e for e in c.post("/invocations", json=body).get_data(as_text=True).split("\n\n") if e]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    plain = c.post("/invocations", json={**body, "stream": False}).get_json()
    streamed = [lp for ch in chunks if ch["choices"] and ch["choices"][0]["logprobs"]
                for lp in ch["choices"][0]["logprobs"]["content"]]
    assert [lp["token"] for lp in streamed] == [lp["token"] for lp in plain["choices"][0]["logprobs"]["content"]]
    assert all(len(lp["top_logprobs"]) == 2 for lp in streamed)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert all(ch["usage"] is None for ch in chunks[:-1])


def test_completions_best_of_keeps_the_n_most_likely(small_engine, tokenizer):
    c = client_for(small_engine, tokenizer)
    body = {"prompt": "hello", "max_tokens": 4, "temperature": 1.0, "seed": 3, "n": 1, "best_of": 2,
            "logprobs": 0}
    out = c.post("/invocations", json=body).get_json()
    assert len(out["choices"]) == 1 and out["usage"]["completion_tokens"] == 8  # both were generated
    both = c.post("/invocations", json={**body, "n": 2}).get_json()["choices"]
    scores = [sum(ch["logprobs"]["token_logprobs"]) for ch in both]
    assert math.isclose(sum(out["choices"][0]["logprobs"]["token_logprobs"]), max(scores), abs_tol=1e-4)
