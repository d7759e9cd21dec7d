"""Fuzz the real server (issue 12): bad input never answers 5xx, never hangs, errors keep their shape.

Two servers (gunicorn + one gevent worker + the unit tests' tiny random Llama), one after the other:
OAI_ENABLED=true for chat completions and legacy completions, OAI_ENABLED=false for TGI generate.
Each gets property-based bodies generated from the pydantic request schemas (hypothesis-jsonschema's
`from_schema` on `model_json_schema()`), half of them mutated with a hostile value in a known field,
then the hand-written nasties of issue 12 and JSON-lines batches of them. Asserted for every answer:
a status below 500, within REQUEST_TIMEOUT, valid strict JSON (no NaN, no Infinity) in the API's own
error shape when it is an error; and /ping still 200 afterwards.

CI runs a fixed seed (`derandomize=True`) and FUZZ_EXAMPLES bodies per API (>= 1,000 in all);
`make fuzz` runs a longer one and prints the figures (bodies sent, status histogram).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from serve.protocol.generate import GenerateRequest
from serve.protocol.openai import ChatCompletionRequest, CompletionRequest
from tests.server import Server, running_server, sse_events

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(os.environ.get("FUZZ_TIMEOUT", "1500")))]

# Generated bodies per API (chat's schema is the slowest to draw from: it gets fewer); with the ~200
# hand-written nasties and JSON-lines batches, a CI run sends over 1,000 bodies in all.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
CHAT_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "220"))
CLIENTS = 4  # requests in flight at once
REQUEST_TIMEOUT = 60.0  # an answer slower than this is a hang (the tiny model writes 4 tokens in well under 1 s)
MAX_NEW = 4  # generated bodies ask for at most this many tokens, so that a run stays short
SERVER_ENV = {"MAX_INPUT_TOKENS": "48", "MAX_TOTAL_TOKENS": "64", "PAYLOAD_LIMIT": str(256 * 1024),
              "GRAMMAR_COMPILE_TIMEOUT": "5", "LOG_LEVEL": "warning"}
SEED = os.environ.get("FUZZ_SEED")  # unset (CI): derandomized, the same bodies every run
HYPOTHESIS = settings(derandomize=SEED is None, deadline=None, database=None,
                      phases=(Phase.generate, Phase.shrink), suppress_health_check=list(HealthCheck))


class Tally:
    """Every answer's status; the figures `make fuzz` prints."""

    def __init__(self, name: str):
        self.name, self.statuses, self.started = name, Counter[int](), time.monotonic()
        self.lock = threading.Lock()

    def count(self, status: int) -> None:
        with self.lock:
            self.statuses[status] += 1

    def report(self) -> str:
        hist = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return (f"fuzz {self.name}: {sum(self.statuses.values())} bodies in {time.monotonic() - self.started:.0f} s; "
                f"statuses {{{hist}}}; seed {SEED or 'derandomized'}")


def _no_constant(name: str) -> Any:
    raise AssertionError(f"{name} written into JSON")


def strict_json(text: str) -> Any:
    """JSON as a strict decoder reads it: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=_no_constant)


def check_error(body: Any, openai: bool, status: int | None = None) -> None:
    """The API's own error shape (docs/api.md, "Errors"), and no echoed exception."""
    if openai:
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, body
        assert isinstance(err["message"], str) and isinstance(err["type"], str), body
        assert status is None or err["code"] == status, body
        message = err["message"]
    else:
        assert set(body) >= {"error", "error_type"} and isinstance(body["error"], str), body
        message = body["error"]
    assert not message.startswith("Internal server error"), body


def send(server: Server, tally: Tally, data: str | bytes, openai: bool, content_type: str = "application/json") -> int:
    """POST one body; assert the answer is no 5xx, arrives in time, and is well-formed JSON or SSE."""
    stream = isinstance(data, str) and '"stream": true' in data
    try:
        r = requests.post(server.invocations, data=data.encode("utf-8") if isinstance(data, str) else data,
                          headers={"Content-Type": content_type}, timeout=REQUEST_TIMEOUT, stream=stream)
        if r.headers.get("Content-Type", "").startswith("text/event-stream"):
            events = sse_events(r)
            assert events, "an empty stream"
            for event in events:
                if event != "[DONE]":
                    parsed = strict_json(event)
                    if "error" in parsed:
                        check_error(parsed, openai)
        else:
            text = r.text
    except requests.Timeout:
        raise AssertionError(f"no answer within {REQUEST_TIMEOUT} s (a hang) to {str(data)[:300]!r}") from None
    tally.count(r.status_code)
    assert r.status_code < 500, f"{r.status_code} to {str(data)[:300]!r}: {r.text[:500]}"
    if r.headers.get("Content-Type", "").startswith("application/jsonlines"):
        for line in text.splitlines():
            answer = strict_json(line)
            if isinstance(answer, dict) and "error" in answer:
                check_error(answer, openai)
    elif not r.headers.get("Content-Type", "").startswith("text/event-stream"):
        answer = strict_json(text)
        if r.status_code >= 400:
            check_error(answer, openai, r.status_code)
    return r.status_code


# -- bodies from the schemas -------------------------------------------------------------------------
SMALL_INTS = {"max_tokens": MAX_NEW, "max_completion_tokens": MAX_NEW, "max_new_tokens": MAX_NEW, "n": 2,
              "best_of": 2, "top_logprobs": 5, "logprobs": 5, "top_n_tokens": 5}


def bounded(schema: dict[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    """The model's JSON schema with short generation forced: the token budgets small (and `required`
    among them always present), so that valid bodies finish in a few steps of the tiny model."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for name, prop in (node.get("properties") or {}).items():
                if name in SMALL_INTS:
                    prop.clear()
                    prop.update({"type": "integer", "minimum": 0 if name in ("logprobs", "top_logprobs",
                                                                             "top_n_tokens") else 1,
                                 "maximum": SMALL_INTS[name]})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    schema["required"] = sorted({*schema.get("required", []), *required})
    return schema


def generate_schema() -> dict[str, Any]:
    schema = bounded(GenerateRequest.model_json_schema(), ())
    params = schema["$defs"]["GenerateParameters"]
    params["required"] = ["max_new_tokens"]
    schema["properties"]["parameters"] = {"$ref": "#/$defs/GenerateParameters"}  # never null: the budget is in it
    schema["required"] = ["inputs", "parameters"]
    return schema


NASTY_VALUES = st.sampled_from([
    2**64, 2**63, -1, -(2**63) - 1, 10**30, 0, 1e308, -1e308, 1e-46, 5e-324, 1.5, -0.0, "", "\ud800", "\udfff x",
    "x" * 3000, [], {}, None, True, [[[[[]]]]], {"a": {"b": {"c": {}}}}, ["a"] * 300, list(range(300)),
    {str(i): 1 for i in range(400)}, {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}},
    {"type": "regex", "value": "((("}, {"type": "json", "value": {"$ref": "#/nowhere"}},
]) | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)


def mutated(bodies: st.SearchStrategy, fields: list[str], nested: str | None = None) -> st.SearchStrategy:
    """Half the bodies as generated; the other half with one field (top-level, or under `nested`) set
    to a hostile value. The token budgets are never replaced, so generation stays short."""
    hostile = [f for f in fields if f not in SMALL_INTS or f in ("n", "best_of", "top_logprobs", "logprobs",
                                                                  "top_n_tokens")]

    @st.composite
    def one(draw: Callable) -> Any:
        body = draw(bodies)
        if draw(st.booleans()) and isinstance(body, dict):
            target = body
            if nested and isinstance(body.get(nested), dict) and draw(st.booleans()):
                target = body[nested]
            target[draw(st.sampled_from(hostile))] = draw(NASTY_VALUES)
        return body

    return one()


def as_text(body: Any) -> str:
    # ensure_ascii: a lone surrogate is written as its `\ud800` escape, as a careless client writes it
    return json.dumps(body, ensure_ascii=True, separators=(", ", ": "))


# -- the hand-written nasties (issue 12) -------------------------------------------------------------
GOOD: dict[str, dict[str, Any]] = {
    "chat": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": MAX_NEW},
    "completions": {"prompt": "Hi", "max_tokens": MAX_NEW},
    "generate": {"inputs": "Hi", "parameters": {"max_new_tokens": MAX_NEW}},
}


def nasties(kind: str) -> list[str]:
    base = GOOD[kind]

    def with_(**fields: Any) -> str:
        body = copy.deepcopy(base)
        target = body["parameters"] if kind == "generate" else body
        target.update(fields)
        return as_text(body)

    out = [
        "[" * 5000 + "]" * 5000, "{" * 3000, '{"a": ' + "9" * 5000 + "}", "", "null", "[]", "1", '"x"', "{",
        '{"inputs": "x"', "\ufeff" + as_text(base), as_text(base)[:-3],
        as_text(base).replace('"Hi"', '"\\ud800"'), as_text(base).replace('"Hi"', '"a\\udc00b"'),
        as_text(base).replace("}", ', "x": NaN}', 1), as_text(base).replace("}", ', "x": -Infinity}', 1),
        as_text(base).replace("}", ', "x": 1e999}', 1),
        with_(seed=2**64), with_(seed=-1), with_(seed=2**63), with_(seed=-(2**63) - 1), with_(seed=10**100),
        with_(temperature=1e308), with_(temperature=1e-46), with_(temperature=5e-324), with_(temperature=-1),
        with_(temperature=1e-46, top_p=1e-46), with_(top_p=5e-324), with_(stop=["x" * 100_000]),
        with_(stop=[""] * 5), with_(stop=["\ud800"]), with_(stop=list("abcdefghij")),
    ]
    if kind == "generate":
        out += [
            with_(top_k=2**64), with_(top_k=2**63), with_(top_k=2**31), with_(top_k=-1), with_(top_k=1),
            with_(do_sample=True, temperature=1e-46), with_(do_sample=True, temperature=1e308, top_n_tokens=5,
                                                            details=True),
            with_(best_of=2**64), with_(best_of=16), with_(top_n_tokens=2**64), with_(truncate=2**64),
            with_(truncate=1, decoder_input_details=True, details=True), with_(max_new_tokens=2**64),
            with_(repetition_penalty=1e-46, do_sample=True), with_(repetition_penalty=1e308),
            with_(typical_p=1e-46, do_sample=True), with_(watermark=True, do_sample=True, temperature=1e-46),
            with_(grammar={"type": "json", "value": {"type": "object", "properties": {"\ud800": {}}}}),
            with_(grammar={"type": "json", "value": _deep_schema(120)}), with_(grammar={"type": "regex", "value": "("}),
            with_(grammar={"type": "regex", "value": "a{1000000}"}),
            as_text({"inputs": "x" * 200_000, "parameters": {"max_new_tokens": 1}}),
        ]
    else:
        out += [
            with_(n=2**64), with_(n=16), with_(logit_bias={str(i): 1 for i in range(5000)}),
            with_(logit_bias={str(2**64): 1}), with_(logit_bias={"0": 1e308}), with_(logit_bias={"-1": 1}),
            with_(logit_bias={"0": -100, "1": -100}, temperature=2, top_p=1e-9), with_(frequency_penalty=1e308),
            with_(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {
                "type": "object", "properties": {"\ud800": {"type": "string"}}}}}),
            with_(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": _deep_schema(120)}}),
            with_(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"$ref": "#/x"}}}),
            with_(response_format={"type": "regex", "value": "a{1000000}"}),
        ]
    if kind == "chat":
        out += [
            with_(logprobs=True, top_logprobs=2**64), with_(logprobs=True, top_logprobs=20, temperature=2),
            with_(logprobs=True, top_logprobs=5, temperature=1e-46),
            with_(messages=[{"role": "user", "content": "x"}] * 20_000),
            with_(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            with_(messages=[{"role": "user", "content": "\ud800"}]), with_(messages=[]),
            with_(tools=[{"type": "function", "function": {"name": "f", "parameters": _deep_schema(120)}}]),
            with_(tools=[{"type": "function", "function": {"name": "\ud800", "parameters": {}}}], tool_choice="required"),
            with_(stream=True, logprobs=True, top_logprobs=3, temperature=1e308),
            with_(stream=True, stream_options={"include_usage": True}, stop=["e"], n=2, temperature=1),
        ]
    if kind == "completions":
        out += [
            with_(prompt=["x"] * 100_000), with_(prompt=[[2**64]]), with_(prompt=[[-1]]), with_(prompt=[[]]),
            with_(prompt=[10**30]), with_(prompt=[]), with_(prompt="\ud800"),
            with_(logprobs=2**64), with_(logprobs=5, echo=True, temperature=1e308), with_(best_of=2**64),
            with_(best_of=16, n=16), with_(echo=True, logprobs=0, prompt=[[1, 2, 3]]),
            with_(stream=True, logprobs=3, temperature=1e-46), with_(stream=True, prompt=["a", "b"], n=2, temperature=1),
        ]
    return out


def _deep_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth // 2 - 2):  # two JSON levels per schema level: under MAX_JSON_DEPTH (128)
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def jsonlines_batches(kind: str) -> list[str]:
    """Good lines with the nasties between them: each line must get its own answer line."""
    good = as_text(GOOD[kind])
    bad = [n for n in nasties(kind) if "\n" not in n and len(n) < 20_000]  # a batch stays under PAYLOAD_LIMIT
    return ["\n".join([good, *bad[i:i + 6], good]) for i in range(0, len(bad), 6)]


def fuzz_apis(server: Server, openai: bool, apis: dict[str, tuple[st.SearchStrategy, int]]) -> None:
    """Generate each API's bodies while CLIENTS threads send them (the valid ones batch on the server,
    and generating overlaps answering); then the nasties; then every answer's checks, in order."""
    for kind, (bodies, examples) in apis.items():
        tally = Tally(kind)
        with ThreadPoolExecutor(CLIENTS) as pool:
            sent: list[Future] = []

            @settings(HYPOTHESIS, max_examples=examples)
            @given(bodies)
            @seed(int(SEED or 0))  # ignored when derandomized
            def one(body: Any) -> None:
                sent.append(pool.submit(send, server, tally, as_text(body), openai))  # noqa: B023

            one()
            for text in nasties(kind):
                sent.append(pool.submit(send, server, tally, text, openai))
            for batch in jsonlines_batches(kind):
                sent.append(pool.submit(send, server, tally, batch, openai, "application/jsonlines"))
            sent.append(pool.submit(send, server, tally, b'{"inputs": "\xff\xfe"}', openai))  # not UTF-8
            sent.append(pool.submit(send, server, tally, "inputs=x", openai, "text/plain"))  # not JSON at all
            failed = [exc for future in sent if (exc := future.exception()) is not None]
        print(f"\n{tally.report()}; {len(failed)} failed checks")
        for exc in failed[:5]:
            print(f"  {str(exc)[:400]}")
        if failed:
            raise failed[0]
        assert server.ping(timeout=10) == 200


@pytest.fixture(scope="module")
def model_env(tiny_model_dir) -> dict[str, str]:
    return {**SERVER_ENV, "SM_MODEL_DIR": str(tiny_model_dir)}


def test_openai_apis_never_answer_5xx(model_env):
    chat = from_schema(bounded(ChatCompletionRequest.model_json_schema(), ("max_tokens",)))
    completions = from_schema(bounded(CompletionRequest.model_json_schema(), ("max_tokens",)))
    with running_server({**model_env, "OAI_ENABLED": "true"}) as server:
        fuzz_apis(server, True, {
            "chat": (mutated(chat, sorted(ChatCompletionRequest.model_fields)), CHAT_EXAMPLES),
            "completions": (mutated(completions, sorted(CompletionRequest.model_fields)), EXAMPLES),
        })


def test_generate_api_never_answers_5xx(model_env):
    from serve.protocol.generate import GenerateParameters

    generate = from_schema(generate_schema())
    with running_server({**model_env, "OAI_ENABLED": "false"}) as server:
        fields = ["inputs", "stream", *sorted(GenerateParameters.model_fields)]
        fuzz_apis(server, False, {"generate": (mutated(generate, fields, "parameters"), EXAMPLES)})
