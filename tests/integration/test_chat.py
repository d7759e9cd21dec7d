"""OpenAI chat completions and legacy completions against the real server (docs/api.md, "Chat completions")."""

from __future__ import annotations

import json
import math
import time

import pytest
import requests

from tests.server import NO_EOS

pytestmark = pytest.mark.slow
T = 120
Q = [{"role": "user", "content": "What is the capital of France?"}]


def chat(server, stream: bool = False, **fields):
    body = {"messages": Q, "max_tokens": 16, "temperature": 0, **fields, "stream": stream}
    return requests.post(server.invocations, json=body, timeout=T, stream=stream)


def ok(server, **fields) -> dict:
    r = chat(server, **fields)
    assert r.status_code == 200, r.text
    return r.json()


def chunks(r) -> list:
    """Parse an OpenAI SSE body; asserts every event is `data: ...` followed by a blank line."""
    raw = r.content.decode()
    assert raw.endswith("\n\n")
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1]]


def test_answer_shape_and_a_coherent_answer(openai_server):
    out = ok(openai_server, model="my-model")
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion"
    assert out["model"] == "my-model" and isinstance(out["created"], int) and out["system_fingerprint"]
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    u = out["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and u["prompt_tokens"] > 10


def test_max_tokens_bounds_usage_and_finish_length(openai_server):
    out = ok(openai_server, max_tokens=3)
    assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "length"
    new = ok(openai_server, max_tokens=None, max_completion_tokens=2)
    assert new["usage"]["completion_tokens"] == 2


def test_stop_is_cut_from_content(openai_server):
    full = ok(openai_server)["choices"][0]["message"]["content"]
    assert "Paris" in full
    cut = ok(openai_server, stop="Paris")["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["message"]["content"] == full[: full.index("Paris")]


def test_seed_n_and_sampling(openai_server):
    a = ok(openai_server, temperature=1.0, seed=11, n=3, max_tokens=12)
    b = ok(openai_server, temperature=1.0, seed=11, n=3, max_tokens=12)
    texts = [c["message"]["content"] for c in a["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert texts == [c["message"]["content"] for c in b["choices"]]
    assert len(set(texts)) > 1  # n really samples n different answers
    assert a["usage"]["completion_tokens"] >= 3  # summed over the n choices


def test_logprobs_are_negative_and_consistent_with_top_logprobs(openai_server):
    out = ok(openai_server, logprobs=True, top_logprobs=3)
    content = out["choices"][0]["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == out["choices"][0]["message"]["content"]
    for c in content:
        assert c["logprob"] <= 0 and len(c["top_logprobs"]) == 3
        assert math.isclose(c["logprob"], c["top_logprobs"][0]["logprob"], abs_tol=1e-4)  # greedy: the top one
        assert c["bytes"] == list(c["token"].encode())


def test_presence_and_frequency_penalties_change_a_repetitive_answer(openai_server):
    msgs = [{"role": "user", "content": "Write the word cat ten times, separated by spaces."}]
    base = ok(openai_server, messages=msgs, max_tokens=20)["choices"][0]["message"]["content"]
    assert base.lower().count("cat") >= 3
    for field in ("presence_penalty", "frequency_penalty"):
        other = ok(openai_server, messages=msgs, max_tokens=20, **{field: 2.0})["choices"][0]["message"]["content"]
        assert other != base  # the repeated tokens were pushed down


def test_logit_bias_bans_and_forces_tokens(auto_server):
    """Token ids come from TGI details on the auto server; completions share its tokenization."""
    prompt = "The capital of France is"
    d = requests.post(auto_server.invocations, json={"inputs": prompt, "parameters": {
        "max_new_tokens": 1, "details": True, "top_n_tokens": 3}}, timeout=T).json()[0]["details"]
    first, runner_up = d["tokens"][0], d["top_tokens"][0][2]
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0}
    plain = requests.post(auto_server.invocations, json=body, timeout=T).json()["choices"][0]["text"]
    assert plain == first["text"]
    banned = requests.post(auto_server.invocations, json={**body, "logit_bias": {str(first["id"]): -100}},
                           timeout=T).json()["choices"][0]["text"]
    assert banned != first["text"]
    forced = requests.post(auto_server.invocations, json={**body, "logit_bias": {str(runner_up["id"]): 100}},
                           timeout=T).json()["choices"][0]["text"]
    assert forced == runner_up["text"]


def test_stream_chunk_sequence_and_equality(openai_server):
    full = ok(openai_server)
    r = chat(openai_server, stream=True, stream_options={"include_usage": True})
    assert r.headers["Content-Type"].startswith("text/event-stream")
    evs = chunks(r)
    assert len({e["id"] for e in evs}) == 1 and all(e["object"] == "chat.completion.chunk" for e in evs)
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in evs if e["choices"])
    assert text == full["choices"][0]["message"]["content"]
    finish = evs[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "stop"
    assert evs[-1]["choices"] == [] and evs[-1]["usage"] == full["usage"]


def test_stream_never_leaks_a_stop_string(openai_server):
    full = ok(openai_server)["choices"][0]["message"]["content"]
    evs = chunks(chat(openai_server, stream=True, stop=["Paris"]))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in evs)
    assert text == full[: full.index("Paris")] and "Par" not in text[len(full[: full.index("Paris")]):]
    assert evs[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"temperature": 3}, "temperature"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "requires `logprobs`"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}},
         "`tools` and `response_format` cannot be used together"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                   "function": {"name": "g"}}},
         "`tool_choice` names `g`, which is not in `tools`"),
        ({"response_format": {"type": "xml"}}, "`response_format.type` must be one of"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "image_url"),
        ({"messages": []}, "messages"),
        ({"max_tokens": 100000}, "max_tokens"),
    ],
)
def test_validation_errors_in_openai_shape(openai_server, fields, words):
    r = chat(openai_server, **fields)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 422
    assert words in err["message"]


def test_text_parts_and_system_messages(openai_server):
    msgs = [{"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": [{"type": "text", "text": "What is the capital of "}, {"type": "text",
                                                                                             "text": "France?"}]}]
    out = ok(openai_server, messages=msgs)
    assert "Paris" in out["choices"][0]["message"]["content"]


def test_overloaded_answers_429(openai_server):
    """MAX_CONCURRENT_REQUESTS=6 on this server: the 7th concurrent request is refused at the door."""
    streams = [chat(openai_server, stream=True, max_tokens=200, logit_bias=NO_EOS) for _ in range(6)]
    try:
        r = chat(openai_server)
        assert r.status_code == 429 and r.json()["error"]["type"] == "overloaded"
    finally:
        for s in streams:
            s.close()
    # The server notices each hang-up at its next write and frees the row: it is usable again soon.
    deadline = time.monotonic() + 60
    while chat(openai_server, max_tokens=1).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert chat(openai_server, max_tokens=1).status_code == 200


def test_completions(openai_server):
    body = {"prompt": ["The capital of France is", "One, two, three,"], "max_tokens": 6, "temperature": 0}
    out = requests.post(openai_server.invocations, json=body, timeout=T).json()
    assert out["object"] == "text_completion" and [c["index"] for c in out["choices"]] == [0, 1]
    assert "Paris" in out["choices"][0]["text"]
    echo = requests.post(openai_server.invocations, json={**body, "prompt": body["prompt"][0], "echo": True,
                                                          "logprobs": 2}, timeout=T).json()["choices"][0]
    assert echo["text"] == body["prompt"][0] + out["choices"][0]["text"]
    assert echo["logprobs"]["token_logprobs"][0] is None and len(echo["logprobs"]["top_logprobs"][-1]) == 2
    r = requests.post(openai_server.invocations, json={**body, "stream": True}, timeout=T, stream=True)
    evs = chunks(r)
    per = ["", ""]
    for e in evs:
        per[e["choices"][0]["index"]] += e["choices"][0]["text"]
    assert per == [c["text"] for c in out["choices"]]
    r = requests.post(openai_server.invocations, json={**body, "suffix": "x"}, timeout=T)
    assert r.status_code == 422 and "suffix" in r.json()["error"]["message"]
