"""Configuration, dispatch, schemas and error shapes: no model, no server."""

from __future__ import annotations

import json

import pytest

from serve import validation
from serve.app import dispatch
from serve.config import ConfigError, Settings
from serve.handlers import chat, completions, generate
from serve.protocol import errors
from serve.protocol.generate import GenerateRequest
from serve.protocol.openai import ChatCompletionRequest, CompletionRequest


@pytest.mark.parametrize(
    "env, mode",
    [
        ({}, "auto"),
        ({"OAI_ENABLED": "true"}, "openai"),
        ({"OAI_ENABLED": "false"}, "generate"),
        ({"MESSAGES_API_ENABLED": "TRUE"}, "openai"),
        ({"MESSAGES_API_ENABLED": "0"}, "generate"),
        ({"OAI_ENABLED": "false", "MESSAGES_API_ENABLED": "true"}, "generate"),  # the real name wins
    ],
)
def test_mode_from_env(env, mode):
    assert Settings.from_env(env).mode == mode


def test_settings_defaults_and_overrides(tmp_path):
    s = Settings.from_env({})
    assert (s.port, s.max_concurrent_requests, s.max_stop_sequences, s.max_top_n_tokens) == (8080, 128, 4, 5)
    assert s.payload_limit == 6291456 and s.model_dir == "/opt/ml/model" and s.dtype is None
    assert s.prefix_cache_tokens is None and s.cpu_packed_linear is True
    s = Settings.from_env({"PREFIX_CACHE_TOKENS": "0", "CPU_PACKED_LINEAR": "false"})
    assert s.prefix_cache_tokens == 0 and s.cpu_packed_linear is False
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    s = Settings.from_env({"SAGEMAKER_BIND_TO_PORT": "9000", "DTYPE": "bf16", "MAX_TOTAL_TOKENS": "512",
                           "CHAT_TEMPLATE": str(template), "HF_MODEL_TRUST_REMOTE_CODE": "true"})
    assert (s.port, s.dtype, s.max_total_tokens, s.trust_remote_code) == (9000, "bfloat16", 512, True)
    assert s.chat_template.startswith("{% for")


@pytest.mark.parametrize(
    "env, words",
    [({"SAGEMAKER_BIND_TO_PORT": "x"}, "SAGEMAKER_BIND_TO_PORT"), ({"DTYPE": "int3"}, "DTYPE"),
     ({"OAI_ENABLED": "maybe"}, "OAI_ENABLED"), ({"MAX_CONCURRENT_REQUESTS": "0"}, "MAX_CONCURRENT_REQUESTS"),
     ({"CHAT_TEMPLATE": "/no/such/file"}, "CHAT_TEMPLATE"), ({"PREFIX_CACHE_TOKENS": "-1"}, "PREFIX_CACHE_TOKENS"),
     ({"CPU_PACKED_LINEAR": "fast"}, "CPU_PACKED_LINEAR")],
)
def test_bad_settings_name_the_variable(env, words):
    with pytest.raises(ConfigError, match=words):
        Settings.from_env(env)


INPUTS, MESSAGES, PROMPT = {"inputs": "x"}, {"messages": []}, {"prompt": "x"}


@pytest.mark.parametrize(
    "mode, body, expected",
    [
        ("openai", INPUTS, "OpenAI mode"), ("openai", MESSAGES, chat.handle), ("openai", PROMPT, completions.handle),
        ("generate", INPUTS, generate.handle), ("generate", MESSAGES, "OAI_ENABLED=true"),
        ("generate", PROMPT, "OAI_ENABLED=true"),
        ("auto", INPUTS, generate.handle), ("auto", MESSAGES, chat.handle), ("auto", PROMPT, completions.handle),
        ("auto", {"x": 1}, "`inputs` (TGI generate)"), ("auto", [1, 2], "`messages`"),
    ],
)
def test_dispatch_table(mode, body, expected):
    if callable(expected):
        assert dispatch(mode, body)[1] is expected
    else:
        with pytest.raises(errors.ApiError) as info:
            dispatch(mode, body)
        assert info.value.status == 422 and expected in info.value.message


def test_error_shapes_and_stream_events():
    err = errors.validation("bad top_k", "top_k")
    assert err.body(errors.Api.GENERATE) == {"error": "bad top_k", "error_type": "validation"}
    assert err.body(errors.Api.OPENAI) == {"error": {"message": "bad top_k", "type": "validation", "param": "top_k",
                                                 "code": 422}}
    assert err.sse(errors.Api.GENERATE) == 'data:{"error": "bad top_k", "error_type": "validation"}\n\n'
    sse = err.sse(errors.Api.OPENAI)
    assert sse.endswith("data: [DONE]\n\n") and json.loads(sse.split("\n\n")[0][6:])["error"]["param"] == "top_k"


def test_generate_schema_is_lenient_where_tgi_annoyed_users():
    req = GenerateRequest.model_validate({"inputs": "x", "parameters": {"temperature": 0, "top_p": 1.0,
                                                                        "stop": "END", "unknown": 1}})
    assert req.parameters.stop == ["END"] and req.parameters.temperature == 0
    params = validation.generate_params(req.parameters, 5)
    assert params.greedy and params.max_new_tokens == 5 and params.stop == ["END"]
    assert GenerateRequest.model_validate({"inputs": "x", "parameters": None}).parameters.details is False


@pytest.mark.parametrize(
    "parameters, words",
    [({"best_of": 2}, "sampling"), ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed`"),
     ({"top_k": 0}, "greater than 0"), ({"stop": [""]}, "empty"), ({"typical_p": 0}, "greater than 0")],
)
def test_generate_schema_rejects(parameters, words):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        GenerateRequest.model_validate({"inputs": "x", "parameters": parameters})
    assert words in errors.from_pydantic(info.value).message


def test_openai_schemas():
    req = ChatCompletionRequest.model_validate({
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "stop": "x", "max_tokens": 5, "max_completion_tokens": 7, "logit_bias": {"12": -100}, "extra": True,
        "stream_options": {"include_usage": True}, "tool_choice": "none", "response_format": {"type": "text"}})
    assert req.messages[0].text() == "ab" and req.stop == ["x"] and req.token_limit == 7
    assert req.logit_bias == {12: -100} and req.include_usage
    params = validation.openai_params(req, 7, 1, 0)
    assert params.do_sample and not params.greedy  # OpenAI samples by default (temperature 1)
    assert validation.openai_params(req.model_copy(update={"temperature": 0}), 7, 1, 0).greedy
    comp = CompletionRequest.model_validate({"prompt": [1, 2, 3]})
    assert comp.prompts() == [[1, 2, 3]]
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompts() == ["a", "b"]
