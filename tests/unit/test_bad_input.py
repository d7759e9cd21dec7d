"""Bad input never answers 500 (issue 12): what a strict JSON decoder refuses is a 400, a field out of
the range the engine can take is a 422 naming it, and nothing writes NaN or Infinity into JSON.

Fast: the app over a service that never loads (decoding comes before readiness), and the validation
boundary with the word tokenizer of test_validation.py.
"""

from __future__ import annotations

import json
import math

import pytest

from serve.app import create_app
from serve.config import Settings
from serve.protocol import errors
from serve.protocol.generate import PrefillToken, Token
from serve.protocol.openai import LegacyLogprobs, TopLogprob
from serve.service import ModelService
from serve.validation import Validator
from tests.unit.test_validation import LIMITS, WordTokenizer, run

NASTY_BODIES = {
    "deep nesting": "[" * 5000 + "]" * 5000,
    "deep but under the recursion limit": '{"inputs": "x", "parameters": ' + "[" * 200 + "]" * 200 + "}",
    "an integer past 4300 digits": '{"inputs": "x", "parameters": {"seed": ' + "9" * 5000 + "}}",
    "NaN": '{"inputs": "x", "parameters": {"temperature": NaN}}',
    "Infinity": '{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}',
    "a float past the range": '{"inputs": "x", "parameters": {"temperature": 1e400}}',
    "a lone surrogate": '{"inputs": "\\ud800"}',
    "a lone low surrogate in a key": '{"inputs": "x", "\\udc00": 1}',
    "a lone surrogate in a response_format schema": (
        '{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", '
        '"json_schema": {"name": "a", "schema": {"type": "object", "properties": {"\\udfff": {"type": "string"}}}}}}'),
}


@pytest.fixture(scope="module")
def client():
    return create_app(service=ModelService(Settings()), load=False).test_client()


@pytest.mark.parametrize("name", NASTY_BODIES)
def test_bodies_a_strict_json_decoder_refuses_are_400(client, name):
    r = client.post("/invocations", data=NASTY_BODIES[name], content_type="application/json")
    body = r.get_json()
    assert r.status_code == 400 and body["error_type"] == "validation", body
    assert body["error"].startswith("The body is not valid JSON"), body
    assert "Error" not in body["error"]  # no exception name echoed


def test_a_valid_surrogate_pair_and_an_escaped_backslash_are_fine(client):
    for text in ('{"inputs": "\\ud83d\\ude00"}', '{"inputs": "\\\\ud800"}'):
        assert client.post("/invocations", data=text, content_type="application/json").status_code == 503  # not ready


def test_each_bad_jsonlines_line_gets_its_own_error_line(client):
    lines = [NASTY_BODIES["deep nesting"], NASTY_BODIES["a lone surrogate"], NASTY_BODIES["NaN"], '{"inputs": "x"}']
    r = client.post("/invocations", data="\n".join(lines), content_type="application/jsonlines")
    out = [json.loads(line) for line in r.get_data(as_text=True).splitlines()]
    assert r.status_code == 200 and len(out) == 4
    assert [o["error_type"] for o in out] == ["validation"] * 3 + ["unhealthy"]


@pytest.mark.parametrize("body, param", [
    ({"inputs": "a", "parameters": {"seed": 2**64}}, "parameters.seed"),
    ({"inputs": "a", "parameters": {"seed": -1}}, "parameters.seed"),
    ({"inputs": "a", "parameters": {"top_k": 2**64}}, "parameters.top_k"),
    ({"inputs": "a", "parameters": {"top_k": 2**31}}, "parameters.top_k"),
    ({"prompt": "a", "seed": 2**63}, "seed"),
    ({"prompt": "a", "seed": -(2**63) - 1}, "seed"),
    ({"messages": [{"role": "user", "content": "a"}], "seed": 2**64}, "seed"),
])
def test_integers_the_engine_cannot_hold_are_422_naming_the_field(body, param):
    with pytest.raises(errors.ApiError) as exc:
        run(body)
    assert exc.value.status == 422 and exc.value.param == param


def test_integers_in_range_are_taken():
    _, req = run({"inputs": "a", "parameters": {"seed": 2**64 - 1, "top_k": 2**31 - 1, "do_sample": True}})
    assert req.params.seed == 2**64 - 1 and req.params.top_k == 2**31 - 1
    _, [prompt] = run({"prompt": "a", "seed": -(2**63)})
    assert prompt.request.params.seed == -(2**63)


@pytest.mark.parametrize("asked, used", [
    (1e-46, 0.0), (1e-6, 0.0), (1e-4, 1e-2), (0.7, 0.7), (1e308, 1e4), (5e4, 1e4),
])
def test_temperatures_the_float32_sampler_cannot_divide_by_are_made_sane(asked, used):
    """vLLM's rule: below 1e-5 is greedy, below 1e-2 is raised to 1e-2; past 1e4 the distribution is flat."""
    _, req = run({"inputs": "a", "parameters": {"temperature": asked, "do_sample": True}})
    assert req.params.temperature == used and req.params.greedy == (used == 0.0)
    if asked <= 2:
        _, [prompt] = run({"prompt": "a", "temperature": asked})
        assert prompt.request.params.temperature == used and prompt.request.params.do_sample == (used > 0)


def test_logprobs_are_always_finite_json_numbers():
    floor = -9999.0
    assert json.loads(Token(id=1, text="a", logprob=-math.inf, special=False).dumps())["logprob"] == floor
    assert json.loads(Token(id=1, text="a", logprob=math.nan, special=False).dumps())["logprob"] == floor
    assert json.loads(TopLogprob(token="a", logprob=-math.inf, bytes=[97]).dumps())["logprob"] == floor
    assert json.loads(PrefillToken(id=1, text="a", logprob=math.nan).dumps())["logprob"] is None
    legacy = LegacyLogprobs(tokens=["a"], token_logprobs=[-math.inf], top_logprobs=[{"a": math.nan}], text_offset=[0])
    assert json.loads(legacy.dumps()) == {"tokens": ["a"], "token_logprobs": [floor], "top_logprobs": [{"a": floor}],
                                          "text_offset": [0]}


class NoTokenizing(WordTokenizer):
    """A tokenizer that fails the test if called: a cap must refuse before any tokenizing or rendering."""

    def __call__(self, *args, **kwargs):
        raise AssertionError("tokenized before the caps were checked")

    def apply_chat_template(self, *args, **kwargs):
        raise AssertionError("rendered before the caps were checked")


CAPPED = Settings(max_stop_sequences=2, max_top_n_tokens=3, max_best_of=2, max_logit_bias=3, max_stop_length=8,
                  max_prompts=3, max_messages=2)
CHAT = {"messages": [{"role": "user", "content": "a"}]}


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": ["a"] * 4}, "prompt", "up to 3 prompts in one request. Given: 4"),
    ({"prompt": [[1, 2]] * 4}, "prompt", "up to 3 prompts"),
    ({"messages": [{"role": "user", "content": "a"}] * 3}, "messages", "up to 2 messages. Given: 3"),
    ({**CHAT, "stop": ["x" * 9]}, "stop", "at most 8 characters long. Given: 9"),
    ({"prompt": "a", "stop": "x" * 9}, "stop", "at most 8 characters"),
    ({"inputs": "a", "parameters": {"stop": ["x" * 9]}}, "parameters.stop", "at most 8 characters"),
    ({**CHAT, "n": 3}, "n", "`n` must be > 0 and <= 2. Given: 3"),
    ({"prompt": "a", "n": 3}, "n", "`n` must be > 0 and <= 2"),
    ({"prompt": "a", "best_of": 3}, "best_of", "`best_of` must be > 0 and <= 2. Given: 3"),
    ({**CHAT, "logprobs": True, "top_logprobs": 4}, "top_logprobs", "`top_logprobs` must be >= 0 and <= 3. Given: 4"),
    ({"prompt": "a", "logprobs": 4}, "logprobs", "`logprobs` must be >= 0 and <= 3. Given: 4"),
    ({**CHAT, "logit_bias": {str(i): 1 for i in range(4)}}, "logit_bias", "up to 3 entries"),
])
def test_caps_on_work_that_grows_with_the_request_refuse_before_tokenizing(body, param, words):
    with pytest.raises(errors.ApiError) as exc:
        run(body, Validator(CAPPED, LIMITS, NoTokenizing(), "tiny"))
    assert exc.value.status == 422 and exc.value.param == param and words in exc.value.message


def test_caps_are_settings_with_defaults():
    s = Settings.from_env({})
    assert (s.max_stop_length, s.max_prompts, s.max_messages) == (256, 64, 1024)
    s = Settings.from_env({"MAX_STOP_LENGTH": "20", "MAX_PROMPTS": "2", "MAX_MESSAGES": "9"})
    assert (s.max_stop_length, s.max_prompts, s.max_messages) == (20, 2, 9)


def test_front_door_settings_have_defaults():
    s = Settings.from_env({})
    assert (s.body_read_timeout, s.prepare_threads) == (60, 2)
    s = Settings.from_env({"BODY_READ_TIMEOUT": "0", "PREPARE_THREADS": "1"})
    assert (s.body_read_timeout, s.prepare_threads) == (0, 1)


def test_a_body_read_timeout_is_a_408_in_the_api_shape():
    err = errors.request_timeout(60)
    assert (err.status, err.error_type) == (408, "request_timeout")
    assert err.model(errors.Api.GENERATE).model_dump() == {
        "error": "The request body was not received within BODY_READ_TIMEOUT (60 s); send it at once",
        "error_type": "request_timeout"}


def test_within_the_caps_is_accepted():
    v = Validator(CAPPED, LIMITS, WordTokenizer(), "tiny")
    _, prompts = run({"prompt": ["a"] * 3, "stop": "x" * 8, "best_of": 2, "logprobs": 3, "max_tokens": 4}, v)
    assert len(prompts) == 3 and prompts[0].request.params.n == 2
    _, req = run({"messages": [{"role": "user", "content": "a"}] * 2, "n": 2, "logprobs": True, "top_logprobs": 3,
                  "max_tokens": 4}, v)
    assert req.params.n == 2 and req.params.top_n_tokens == 3
