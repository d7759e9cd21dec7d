"""TGI generate against the real server: every parameter does what it says (docs/api.md, "Generate")."""

from __future__ import annotations

import json

import pytest
import requests

pytestmark = pytest.mark.slow
T = 120
PROMPT = "The capital of France is"


def gen(server, stream: bool = False, inputs: str = PROMPT, **params):
    params.setdefault("max_new_tokens", 8)
    body = {"inputs": inputs, "parameters": params, "stream": stream}
    return requests.post(server.invocations, json=body, timeout=T, stream=stream)


def ok(server, **params) -> dict:
    r = gen(server, **params)
    assert r.status_code == 200, r.text
    return r.json()[0]


def test_details_tokens_headers_and_full_text(auto_server):
    r = gen(auto_server, details=True)
    out = r.json()[0]
    d = out["details"]
    assert out["generated_text"].startswith(PROMPT)  # return_full_text defaults to true
    assert d["finish_reason"] in ("length", "eos_token") and d["generated_tokens"] == len(d["tokens"])
    assert d["seed"] is None and d["prefill"] == []
    text = "".join(t["text"] for t in d["tokens"] if not t["special"])
    assert PROMPT + text == out["generated_text"]
    assert all(t["logprob"] <= 0 for t in d["tokens"])
    assert r.headers["x-generated-tokens"] == str(d["generated_tokens"])
    assert int(r.headers["x-prompt-tokens"]) == 5
    for h in ("x-compute-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert float(r.headers[h]) >= 0
    short = ok(auto_server, return_full_text=False, max_new_tokens=8)
    assert PROMPT + short["generated_text"] == out["generated_text"]


def test_max_new_tokens_and_unset_budget(auto_server, generate_server):
    d = ok(auto_server, max_new_tokens=3, details=True, stop=["never-matches"])["details"]
    assert d["generated_tokens"] <= 3
    # MAX_TOTAL_TOKENS=64 on this server: unset max_new_tokens means "the rest of the budget".
    body = {"inputs": "1, 2, 3, 4, 5, 6, 7, 8", "parameters": {"details": True}}
    r = requests.post(generate_server.invocations, json=body, timeout=T)
    d = r.json()[0]["details"]
    assert d["finish_reason"] == "eos_token" or d["generated_tokens"] == 64 - int(r.headers["x-prompt-tokens"])
    assert d["generated_tokens"] > 3


def test_stop_sequence_stays_at_the_end(auto_server):
    base = ok(auto_server, max_new_tokens=8, return_full_text=False)["generated_text"]
    stop = base.strip().split()[0]  # a word greedy decoding will produce
    out = ok(auto_server, max_new_tokens=8, return_full_text=False, stop=[stop], details=True)
    assert out["generated_text"].endswith(stop)
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert len(out["generated_text"]) <= len(base)


def test_seed_reproduces_and_sampling_varies(auto_server):
    a = ok(auto_server, do_sample=True, seed=7, max_new_tokens=12, details=True)
    b = ok(auto_server, do_sample=True, seed=7, max_new_tokens=12)
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 7
    texts = {ok(auto_server, do_sample=True, temperature=1.5, seed=s, max_new_tokens=12)["generated_text"]
             for s in range(4)}
    assert len(texts) > 1
    unseeded = ok(auto_server, do_sample=True, details=True)
    assert isinstance(unseeded["details"]["seed"], int)


def test_lenient_temperature_zero_and_top_p_one_are_greedy(auto_server):
    greedy = ok(auto_server)["generated_text"]
    assert ok(auto_server, temperature=0)["generated_text"] == greedy
    assert ok(auto_server, top_p=1.0)["generated_text"] == greedy


def test_penalties_and_warpers_change_the_output(auto_server):
    inputs = "one one one one one one one one"
    greedy = ok(auto_server, inputs=inputs, max_new_tokens=10)["generated_text"]
    assert ok(auto_server, inputs=inputs, max_new_tokens=10, repetition_penalty=3.0)["generated_text"] != greedy
    assert ok(auto_server, inputs=inputs, max_new_tokens=10, frequency_penalty=2.0)["generated_text"] != greedy
    # top_k=1 is greedy even when sampling; typical_p and top_p only narrow the choice.
    assert ok(auto_server, inputs=inputs, max_new_tokens=10, do_sample=True, top_k=1)["generated_text"] == greedy
    assert ok(auto_server, inputs=inputs, max_new_tokens=10, do_sample=True, seed=1, top_p=0.01)["generated_text"] == greedy
    typical = [ok(auto_server, inputs=inputs, max_new_tokens=10, do_sample=True, seed=3, typical_p=0.2)["generated_text"]
               for _ in range(2)]
    assert typical[0] == typical[1] and typical[0].startswith(inputs)


def test_watermark_changes_the_choice(auto_server):
    plain = ok(auto_server, max_new_tokens=16)["generated_text"]
    marked = ok(auto_server, max_new_tokens=16, watermark=True)["generated_text"]
    assert plain != marked


def test_top_n_tokens_decoder_input_details_and_truncate(auto_server):
    d = ok(auto_server, details=True, top_n_tokens=3, decoder_input_details=True)["details"]
    assert len(d["top_tokens"]) == len(d["tokens"])
    for tok, top in zip(d["tokens"], d["top_tokens"], strict=True):
        assert len(top) == 3 and top[0]["logprob"] >= top[1]["logprob"] >= top[2]["logprob"]
        assert tok["logprob"] <= top[0]["logprob"] + 1e-4
    assert [p["text"] for p in d["prefill"]][1:] == [" capital", " of", " France", " is"]
    assert d["prefill"][0]["logprob"] is None and all(p["logprob"] < 0 for p in d["prefill"][1:])
    cut = ok(auto_server, details=True, decoder_input_details=True, truncate=2)["details"]
    assert [p["text"] for p in cut["prefill"]] == [" France", " is"]


def test_best_of_returns_the_best_and_the_others(auto_server):
    out = ok(auto_server, best_of=2, do_sample=True, details=True, max_new_tokens=6)
    others = out["details"]["best_of_sequences"]
    assert len(others) == 1 and others[0]["generated_text"].startswith(PROMPT)
    best = sum(t["logprob"] for t in out["details"]["tokens"])
    assert best >= sum(t["logprob"] for t in others[0]["tokens"]) - 1e-3


def test_stream_equals_non_stream_and_last_event_has_details(auto_server):
    full = ok(auto_server, max_new_tokens=12, details=True)
    r = gen(auto_server, stream=True, max_new_tokens=12, details=True)
    assert r.headers["Content-Type"].startswith("text/event-stream")
    raw = r.content.decode()
    assert raw.endswith("\n\n") and "[DONE]" not in raw
    events = [json.loads(line[5:]) for line in raw.split("\n\n") if line.startswith("data:")]
    assert [e["index"] for e in events] == list(range(len(events)))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == full["generated_text"]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in full["details"]["tokens"]]
    assert last["details"]["input_length"] == 5 and last["details"]["finish_reason"] == full["details"]["finish_reason"]


@pytest.mark.parametrize(
    "params, words",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "up to 4 stop sequences"),
        ({"top_n_tokens": 6}, "top_n_tokens"),
        ({"best_of": 3, "do_sample": True}, "best_of"),
        ({"best_of": 2}, "sampling"),
        ({"max_new_tokens": 5000}, "must be <= 1024"),
        ({"grammar": {"type": "json", "value": {"type": "nope"}}}, "grammar"),
        ({"grammar": {"type": "regex", "value": "(unclosed"}}, "grammar"),
    ],
)
def test_validation_errors(auto_server, params, words):
    r = gen(auto_server, **params)
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and words in r.json()["error"]


def test_input_too_long_and_error_in_stream_shape(generate_server):
    r = gen(generate_server, inputs="word " * 100, max_new_tokens=2)
    assert r.status_code == 422
    assert "`inputs` must have less than 48 tokens. Given:" in r.json()["error"]
    r = gen(generate_server, stream=True, best_of=2, do_sample=True)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
