"""Routes, dispatch and errors (docs/api.md) on the real server: dispatch rows, JSON lines, transport errors."""

from __future__ import annotations

import json

import pytest
import requests

pytestmark = pytest.mark.slow
T = 120  # seconds; every request is bounded

GEN = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}}
CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0}
COMP = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


def post(server, body, **kw):
    return requests.post(server.invocations, json=body, timeout=T, **kw)


def is_generate(r) -> bool:
    body = r.json()
    return r.status_code == 200 and isinstance(body, list) and body[0]["generated_text"].startswith(GEN["inputs"])


def test_auto_mode_dispatches_on_the_body(auto_server):
    assert is_generate(post(auto_server, GEN))
    chat = post(auto_server, CHAT).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"]
    comp = post(auto_server, COMP).json()
    assert comp["object"] == "text_completion" and comp["choices"][0]["text"]


def test_auto_mode_unknown_shape_names_the_three_shapes(auto_server):
    r = post(auto_server, {"text": "hi"})
    assert r.status_code == 422
    body = r.json()
    assert body["error_type"] == "validation"
    assert all(k in body["error"] for k in ("`inputs`", "`messages`", "`prompt`"))


def test_openai_mode_rows(openai_server):
    r = post(openai_server, GEN)
    assert r.status_code == 422
    err = r.json()["error"]
    assert "OpenAI mode" in err["message"] and err["type"] == "validation"
    assert post(openai_server, CHAT).json()["object"] == "chat.completion"
    assert post(openai_server, COMP).json()["object"] == "text_completion"
    none = post(openai_server, {"foo": 1})
    assert none.status_code == 422 and "`messages`" in none.json()["error"]["message"]


def test_generate_mode_rows(generate_server):
    assert is_generate(post(generate_server, GEN))
    for body in (CHAT, COMP):
        r = post(generate_server, body)
        assert r.status_code == 422
        assert "OAI_ENABLED=true" in r.json()["error"] and r.json()["error_type"] == "validation"


def test_jsonlines_five_lines_one_bad(auto_server):
    lines = [
        json.dumps({"inputs": "One, two,", "parameters": {"max_new_tokens": 3}}),
        json.dumps(CHAT),
        "{this is not json",
        json.dumps({"inputs": "Red, green,", "parameters": {"max_new_tokens": 3, "top_k": -1}}),
        json.dumps(COMP),
    ]
    r = requests.post(auto_server.invocations, data="\n".join(lines) + "\n",
                      headers={"Content-Type": "application/jsonlines"}, timeout=T)
    assert r.status_code == 200
    out = [json.loads(line) for line in r.text.splitlines()]
    assert len(out) == 5
    assert out[0][0]["generated_text"].startswith("One, two,")
    assert out[1]["object"] == "chat.completion"
    assert out[2]["error_type"] == "validation" and "not valid JSON" in out[2]["error"]
    assert out[3]["error_type"] == "validation" and "top_k" in out[3]["error"]
    assert out[4]["object"] == "text_completion"


def test_transport_errors(generate_server):
    url = generate_server.invocations
    r = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=T)
    assert r.status_code == 400 and r.json()["error_type"] == "validation"
    r = requests.post(url, data=b'{"inputs": "\xff\xfe"}', headers={"Content-Type": "application/json"}, timeout=T)
    assert r.status_code == 400 and "UTF-8" in r.json()["error"]
    r = requests.post(url, data=b"inputs=hi", headers={"Content-Type": "text/csv"}, timeout=T)
    assert r.status_code == 415 and r.json()["error_type"] == "unsupported_media_type"
    big = json.dumps({"inputs": "x" * 70000})
    r = requests.post(url, data=big, headers={"Content-Type": "application/json"}, timeout=T)
    assert r.status_code == 413 and r.json()["error_type"] == "payload_too_large"
    r = requests.get(generate_server.url + "/v1/models", timeout=T)
    assert r.status_code == 404 and "GET /ping" in r.json()["error"]
    r = requests.get(url, timeout=T)
    assert r.status_code == 405 and r.json()["error_type"] == "method_not_allowed"


def test_ping_get_and_post_and_custom_attributes(auto_server):
    assert requests.get(auto_server.url + "/ping", timeout=T).status_code == 200
    r = requests.post(auto_server.url + "/ping", timeout=T)
    assert r.status_code == 200 and r.content == b""
    r = requests.post(auto_server.invocations, json=GEN, timeout=T,
                      headers={"X-Amzn-SageMaker-Custom-Attributes": "trace=abc"})
    assert r.headers["X-Amzn-SageMaker-Custom-Attributes"] == "trace=abc"
