"""Structured output and tool calling on the real server (SmolLM2): the FORMAT is guaranteed.

SmolLM2-135M does not choose tools or fill fields wisely; these tests assert only what the grammar
guarantees: answers parse and validate against their schema (`jsonschema`), tool calls name an
offered function with arguments valid for it, the finish reasons and wire shapes are OpenAI's and
TGI's, and every refusal is a 422 naming the field. Greedy decoding keeps them reproducible.
"""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
import requests

from tests.server import sse_events

pytestmark = pytest.mark.slow
T = 300
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}},
                   "required": ["city"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def post(server, body: dict, stream: bool = False) -> requests.Response:
    return requests.post(server.invocations, json=body, timeout=T, stream=stream)


def chat(server, **fields) -> dict:
    r = post(server, {"messages": ASK, "temperature": 0, "max_tokens": 200, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def chat_chunks(server, **fields) -> list[dict]:
    with post(server, {"messages": ASK, "temperature": 0, "max_tokens": 200, "stream": True, **fields}, True) as r:
        assert r.status_code == 200, r.text
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def assert_valid_calls(calls: list[dict], tools: list[dict]) -> None:
    """Every call names an offered tool, has an OpenAI id, and arguments valid for that tool."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert CALL_ID.match(call["id"]) and call["type"] == "function", call
        assert call["function"]["name"] in schemas, call
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


def accumulate_tool_deltas(chunks: list[dict]) -> list[dict]:
    """Rebuild the calls from streamed `delta.tool_calls`, as OpenAI's client libraries do."""
    calls: dict[int, dict] = {}
    for c in chunks:
        for d in (c["choices"][0]["delta"].get("tool_calls") or []) if c["choices"] else []:
            call = calls.setdefault(d["index"], {"id": None, "type": None, "function": {"name": "", "arguments": ""}})
            call["id"] = d.get("id") or call["id"]
            call["type"] = d.get("type") or call["type"]
            call["function"]["name"] += d["function"].get("name") or ""
            call["function"]["arguments"] += d["function"].get("arguments") or ""
    return [calls[i] for i in sorted(calls)]


# -- response_format and grammar ---------------------------------------------------------------------
def test_json_schema_answer_validates_and_ends_by_the_grammar(openai_server):
    out = chat(openai_server, response_format={"type": "json_schema", "json_schema": {"name": "person",
                                                                                     "schema": PERSON}})
    choice = out["choices"][0]
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"]
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', choice["message"]["content"])
    assert not re.search(r"\s", outside_strings), choice["message"]["content"]  # compact JSON: no whitespace runs


def test_json_schema_stream_is_the_same_answer(openai_server):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    whole = chat(openai_server, response_format=fmt)["choices"][0]["message"]["content"]
    chunks = chat_chunks(openai_server, response_format=fmt)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("fmt", [
    {"type": "json", "value": PERSON},  # TGI's dialect, the schema as an object
    {"type": "json_object", "value": json.dumps(PERSON)},  # ... and as a JSON string
    {"type": "json_schema", "value": {"name": "person", "schema": PERSON}},
])
def test_tgi_response_format_dialect(openai_server, fmt):
    content = chat(openai_server, response_format=fmt)["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(content), PERSON)


def test_json_object_mode_answers_an_object(openai_server):
    out = chat(openai_server, response_format={"type": "json_object"}, max_tokens=400,
               messages=[{"role": "user", "content": "Describe Paris as a JSON object with two keys."}])
    assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)


def test_regex_response_format_and_logprobs_under_a_grammar(openai_server):
    out = chat(openai_server, response_format={"type": "regex", "value": "(yes|no), [0-9]{1,3} degrees"},
               logprobs=True, top_logprobs=2)
    choice = out["choices"][0]
    assert re.fullmatch("(yes|no), [0-9]{1,3} degrees", choice["message"]["content"])
    tokens = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == choice["message"]["content"]
    assert all(t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 for t in tokens)


def test_n_sampled_choices_each_follow_the_schema(openai_server):
    out = chat(openai_server, temperature=1.0, seed=7, n=3,
               response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert len(out["choices"]) == 3
    for choice in out["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_completions_response_format(openai_server):
    r = post(openai_server, {"prompt": "A person:", "max_tokens": 200, "temperature": 0,
                             "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    jsonschema.validate(json.loads(choice["text"]), PERSON)
    assert choice["finish_reason"] == "stop"


def test_generate_grammar_json_and_regex_streamed(auto_server):
    r = post(auto_server, {"inputs": "A person as JSON:", "parameters": {
        "max_new_tokens": 200, "grammar": {"type": "json", "value": PERSON}, "details": True,
        "return_full_text": False}})
    assert r.status_code == 200, r.text
    answer = r.json()[0]
    jsonschema.validate(json.loads(answer["generated_text"]), PERSON)
    assert answer["details"]["finish_reason"] == "eos_token"
    body = {"inputs": "Today's date:", "stream": True,
            "parameters": {"max_new_tokens": 30, "return_full_text": False, "grammar": {"type": "regex", "value": "20[0-9]{2}-[01][0-9]-[0-3][0-9]"}}}
    with post(auto_server, body, stream=True) as r:
        events = [json.loads(e) for e in sse_events(r)]
    assert re.fullmatch("20[0-9]{2}-[01][0-9]-[0-3][0-9]", events[-1]["generated_text"])
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == events[-1]["generated_text"]


def test_generate_grammar_that_fails_on_its_first_token_is_a_422(auto_server):
    """`a{1000000}` compiles, then fails deriving its first token: refused at compile time."""
    r = post(auto_server, {"inputs": "Say a:", "parameters": {"max_new_tokens": 4,
                                                              "grammar": {"type": "regex", "value": "a{1000000}"}}})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation"
    assert "`parameters.grammar` is not valid" in r.json()["error"]
    assert "too many expressions constructed" in r.json()["error"]


# -- tools ------------------------------------------------------------------------------------------
def test_required_tool_call_answer_shape(openai_server):
    out = chat(openai_server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    choice = out["choices"][0]
    assert choice["message"]["content"] is None and choice["finish_reason"] == "tool_calls"
    assert len(choice["message"]["tool_calls"]) == 1
    assert_valid_calls(choice["message"]["tool_calls"], TOOLS)


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_time"}}, "get_time"])
def test_named_tool_is_called_and_finishes_with_stop(openai_server, choice):
    out = chat(openai_server, tools=TOOLS, tool_choice=choice)["choices"][0]
    assert out["finish_reason"] == "stop" and out["message"]["content"] is None
    assert [c["function"]["name"] for c in out["message"]["tool_calls"]] == ["get_time"]
    assert_valid_calls(out["message"]["tool_calls"], TOOLS)


def test_streamed_tool_call_follows_openai_chunks(openai_server):
    fields = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}
    whole = chat(openai_server, **fields)["choices"][0]["message"]["tool_calls"]
    chunks = chat_chunks(openai_server, **fields)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    first = deltas[1]["tool_calls"][0]
    assert set(first) == {"index", "id", "type", "function"} and first["function"]["arguments"] == ""
    assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[2:-1])
    assert deltas[-1] == {} and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    streamed = accumulate_tool_deltas(chunks)
    assert_valid_calls(streamed, TOOLS)
    assert [c["function"] for c in streamed] == [c["function"] for c in whole]  # greedy: the same calls


def test_auto_answers_text_or_calls_in_one_pass(openai_server):
    out = chat(openai_server, tools=TOOLS)["choices"][0]
    if out["message"].get("tool_calls"):
        assert out["message"]["content"] is None and out["finish_reason"] == "tool_calls"
        assert_valid_calls(out["message"]["tool_calls"], TOOLS)
    else:
        assert "<tool_call>" not in out["message"]["content"] and out["finish_reason"] in ("stop", "length")


def test_tool_round_trip_with_history(openai_server):
    first = chat(openai_server, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    call = first["choices"][0]["message"]["tool_calls"][0]
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temperature": 21})}]
    final = chat(openai_server, messages=history, tools=TOOLS, tool_choice="none")["choices"][0]
    assert final["message"]["content"] and "tool_calls" not in final["message"]


# -- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "regex", "value": "(unclosed"}}, "response_format", "invalid regex"),
    # compiles, then fails on its first token: a 422 at compile time, not a 424 from the engine
    ({"response_format": {"type": "regex", "value": "a{1000000}"}}, "response_format",
     "too many expressions constructed"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "invalid json_schema"),
    ({"response_format": {"type": "json", "value": "{not json"}}, "response_format.value", "not valid JSON"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {f"field_{i:05d}": {"type": "string", "description": "x" * 40}
                                         for i in range(5000)}}}}},
     "response_format", "at most 262144 bytes"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "cannot be used together"),
    ({"tools": TOOLS, "tool_choice": "get_news"}, "tool_choice", "`get_news`, which is not in `tools`"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type", "must be `function`"),
])
def test_structured_refusals_are_422_naming_the_field(openai_server, fields, param, words):
    r = post(openai_server, {"messages": ASK, **fields})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"] and err["type"] == "validation", err


# -- validity over many mixed requests ------------------------------------------------------------------
ORDER = {"type": "object", "properties": {
    "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
        "qty": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["sku", "qty"],
        "additionalProperties": False}},
    "express": {"type": "boolean"},
    "note": {"type": "string", "maxLength": 30}},
    "required": ["items", "express"], "additionalProperties": False}
REGEX = r"(Monday|Tuesday|Friday) at [0-2][0-9]:[0-5][0-9]"
SUBJECTS = ["Paris", "a red bicycle", "the planet Mars", "a chess club", "an apple pie", "a small dog"]


def mixed_request(i: int) -> tuple[dict, str, object]:
    """The i-th request of the validity run: (body, kind, what its answer must satisfy)."""
    rng = random.Random(i)
    sampling = {"temperature": 0} if i % 3 == 0 else {"temperature": rng.choice([0.7, 1.0, 1.2]), "seed": i}
    base = {"messages": [{"role": "user", "content": f"Request {i}: answer with the data asked for."}],
            "max_tokens": 400, **sampling}
    kind = ("schema_person", "schema_order", "json_object", "regex", "tools")[i % 5]
    if kind == "schema_person":
        return {**base, "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}}, \
            kind, PERSON
    if kind == "schema_order":
        return {**base, "response_format": {"type": "json", "value": ORDER}}, kind, ORDER
    if kind == "json_object":  # JSON mode wants the object described in the prompt (as OpenAI's guide says)
        ask = (f"Request {i}: describe {SUBJECTS[i % len(SUBJECTS)]} as a JSON object with the keys "
               '"name", "kind" and "summary" (one short sentence).')
        return {**base, "messages": [{"role": "user", "content": ask}], "response_format": {"type": "json_object"}}, \
            kind, {"type": "object"}
    if kind == "regex":
        return {**base, "response_format": {"type": "regex", "value": REGEX}}, kind, REGEX
    return {**base, "tools": TOOLS, "tool_choice": "required"}, kind, TOOLS


def check_answer(body: dict, kind: str, rule: object, answer: dict) -> str | None:
    """None when the answer satisfies its rule and ended by the grammar, else why not.

    `json_object` (any object) is the one unbounded grammar: its strings have no length limit, and
    SmolLM2-135M sampled at temperature 1.0-1.2 (or greedy, caught in a repetition loop) can write
    one string until `max_tokens` (6 of 30 such requests with the prompt above, 25 of 60 with a
    prompt that did not describe the object). Such an answer is cut by length, and "length" is then
    what the test accepts for that kind only (see LENGTH_OK); one that ends must parse."""
    choice = answer["choices"][0]
    try:
        if kind == "tools":
            assert choice["finish_reason"] == "tool_calls", choice["finish_reason"]
            assert_valid_calls(choice["message"]["tool_calls"], TOOLS)
        elif kind == "regex":
            assert choice["finish_reason"] == "stop", choice["finish_reason"]
            assert re.fullmatch(REGEX, choice["message"]["content"]), choice["message"]["content"]
        elif kind == "json_object" and choice["finish_reason"] == "length":
            return LENGTH_OK
        else:
            assert choice["finish_reason"] == "stop", choice["finish_reason"]
            jsonschema.validate(json.loads(choice["message"]["content"]), rule)
    except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
        return f"{kind} {body.get('temperature')}: {exc!r}: {json.dumps(choice)[:300]}"
    return None


LENGTH_OK = "json_object cut by max_tokens"


def test_300_mixed_structured_requests_all_valid_and_ended_by_the_grammar(auto_server):
    def one(i: int) -> tuple[str, str | None]:
        body, kind, rule = mixed_request(i)
        r = post(auto_server, body)
        if r.status_code != 200:
            return kind, f"{kind}: HTTP {r.status_code} {r.text[:200]}"
        return kind, check_answer(body, kind, rule, r.json())

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(300)))
    failures = [why for _, why in results if why and why != LENGTH_OK]
    cut = sum(1 for _, why in results if why == LENGTH_OK)
    print(f"\n300 structured requests (json_schema x120, json_object x60, regex x60, tools x60): "
          f"{300 - len(failures) - cut} valid and ended by the grammar, {cut} json_object cut by max_tokens, "
          f"{len(failures)} invalid")
    assert not failures, failures[:5]  # json_object cuts are reported, not asserted (see check_answer)
