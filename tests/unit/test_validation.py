"""The validation boundary, from tables: every limit, its exact message, the field it names, and the
error as each API shapes it. No model and no engine: a word-per-token tokenizer and hand-set limits."""

from __future__ import annotations

import pytest

from serve.app import dispatch
from serve.config import Settings
from serve.engine.config import EngineConfig
from serve.handlers import common, openai
from serve.protocol import errors
from serve.protocol.errors import Api
from serve.protocol.generate import GenerateRequest
from serve.protocol.openai import ChatCompletionRequest, CompletionRequest
from serve.validation import Validator

LIMITS = EngineConfig(max_batch_prefill_tokens=64, max_batch_total_tokens=60, max_input_tokens=20,
                      max_total_tokens=40)
SETTINGS = Settings(max_stop_sequences=2, max_top_n_tokens=3, max_best_of=2, max_logit_bias=3)
VOCAB = 1000


class WordTokenizer:
    """One token per word (id 10 + its length); a chat template that joins the contents."""

    chat_template = "joined"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [10 + len(word) for word in text.split()]}

    def __len__(self) -> int:
        return VOCAB

    def decode(self, ids: list[int]) -> str:
        return " ".join("w" * (i - 10) for i in ids)

    def apply_chat_template(self, messages, chat_template=None, add_generation_prompt=True, tokenize=False) -> str:
        if chat_template == "raising":
            raise ValueError("Conversation roles must alternate")
        return " ".join(m["content"] for m in messages)


def words(n: int) -> str:
    return " ".join(["word"] * n)


def validator(tokenizer=None, model_vocab: int | None = None) -> Validator:
    return Validator(SETTINGS, LIMITS, tokenizer or WordTokenizer(), "tiny", model_vocab)


def run(body: dict, v: Validator | None = None):
    """Parse and validate `body` as the handlers do; returns the API family and the engine request(s)."""
    v = v or validator()
    api, _ = dispatch("auto", body)
    if "inputs" in body:
        return api, v.generate(common.parse(GenerateRequest, body))
    if "messages" in body:
        return api, v.chat(openai.parse(ChatCompletionRequest, body)).request
    return api, v.completions(openai.parse(CompletionRequest, body))


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
SAMPLING = {"do_sample": True}
REFUSALS = [  # (body, status, error type, message, param)
    ({"inputs": ""}, 422, "validation", "`inputs` cannot be empty", "inputs"),
    ({"inputs": "x", "parameters": {"stop": ["a", "b", "c"]}}, 422, "validation",
     "`stop` supports up to 2 stop sequences. Given: 3", "parameters.stop"),
    ({"inputs": "x", "parameters": {"top_n_tokens": 4}}, 422, "validation",
     "`top_n_tokens` must be >= 0 and <= 3. Given: 4", "parameters.top_n_tokens"),
    ({"inputs": "x", "parameters": {"best_of": 3, **SAMPLING}}, 422, "validation",
     "`best_of` must be > 0 and <= 2. Given: 3", "parameters.best_of"),
    ({"inputs": "x", "stream": True, "parameters": {"best_of": 2, **SAMPLING}}, 422, "validation",
     "`best_of` != 1 is not allowed for streaming", "parameters.best_of"),
    ({"inputs": "x", "stream": True, "parameters": {"decoder_input_details": True}}, 422, "validation",
     "`decoder_input_details` == true is not supported when streaming tokens", "parameters.decoder_input_details"),
    ({"inputs": "x", "parameters": {"grammar": {"type": "json"}}}, 422, "validation",
     "`parameters.grammar.value` must hold a JSON Schema for type `json`", "parameters.grammar.value"),
    ({"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}, 422, "validation",
     "structured output (`response_format`, `grammar`, `tools`) is not available: this model's tokenizer cannot "
     "drive a grammar", "parameters.grammar"),
    ({**CHAT, "response_format": {"type": "yaml"}}, 422, "validation",
     "`response_format.type` must be one of text, json_object, json_schema, json, regex; got `yaml`",
     "response_format.type"),
    ({**CHAT, "tool_choice": "required"}, 422, "validation", "`tool_choice` needs `tools`", "tool_choice"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}},
     422, "validation", "`tools` and `response_format` cannot be used together; send one of them",
     "response_format"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "g"}, 422, "validation",
     "`tool_choice` names `g`, which is not in `tools` (f)", "tool_choice"),
    ({"prompt": "x", "response_format": {"type": "regex"}}, 422, "validation",
     "`response_format.value` must be a non-empty regular expression string", "response_format.value"),
    ({"inputs": "x", "parameters": {"adapter_id": "other"}}, 422, "validation",
     "adapter `other` is not loaded", "parameters.adapter_id"),
    ({"inputs": "x", "parameters": {"truncate": 21}}, 422, "validation",
     "`truncate` must be strictly positive and less than 20. Given: 21", "parameters.truncate"),
    ({"inputs": words(21)}, 422, "validation", "`inputs` must have less than 20 tokens. Given: 21", "inputs"),
    ({"inputs": "x", "parameters": {"max_new_tokens": 40}}, 422, "validation",
     "`inputs` tokens + `max_new_tokens` must be <= 40. Given: 1 `inputs` tokens and 40 `max_new_tokens`",
     "max_new_tokens"),
    ({"inputs": words(10), "parameters": {"max_new_tokens": 25, "best_of": 2, **SAMPLING}}, 422, "validation",
     "the request needs 96 KV cache tokens (10 prompt + 25 new, x 2 sequences, in blocks of 16), more than the "
     "server holds (MAX_BATCH_TOTAL_TOKENS=60); lower `max_new_tokens` or `best_of`", "max_new_tokens"),
    ({"inputs": "x", "parameters": {"top_k": 0}}, 422, "validation",  # the schema's ranges come first
     "`parameters.top_k`: Input should be greater than 0", "parameters.top_k"),
    ({**CHAT, "stop": ["a", "b", "c"]}, 422, "validation", "`stop` supports up to 2 stop sequences. Given: 3", "stop"),
    ({**CHAT, "logit_bias": {"1": 1, "2": 1, "3": 1, "4": 1}}, 422, "validation",
     "`logit_bias` supports up to 3 entries. Given: 4", "logit_bias"),
    ({**CHAT, "logit_bias": {"1000": 1}}, 422, "validation",
     "`logit_bias` token id 1000 is out of range (vocabulary size 1000)", "logit_bias"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 422, "validation",
     "content parts of type `image_url` are not supported by this text-only model; send `text` parts", "messages"),
    ({"messages": [{"role": "user", "content": words(21)}]}, 422, "validation",
     "`messages` must have less than 20 tokens. Given: 21", "messages"),
    ({**CHAT, "max_tokens": 5, "max_completion_tokens": 40}, 422, "validation",
     "`inputs` tokens + `max_tokens` must be <= 40. Given: 1 `inputs` tokens and 40 `max_tokens`", "max_tokens"),
    ({**CHAT, "max_tokens": 30, "n": 2}, 422, "validation",
     "the request needs 64 KV cache tokens (1 prompt + 30 new, x 2 sequences, in blocks of 16), more than the "
     "server holds (MAX_BATCH_TOTAL_TOKENS=60); lower `max_tokens` or `n`", "max_tokens"),
    ({**CHAT, "n": 0}, 422, "validation", "`n`: Input should be greater than or equal to 1", "n"),
    ({"prompt": [1, VOCAB]}, 422, "validation", "`prompt` token ids must be in 0..999", "prompt"),
    ({"prompt": ""}, 422, "validation", "`prompt` cannot be empty", "prompt"),
    ({"prompt": ["x", words(21)]}, 422, "validation", "`prompt` must have less than 20 tokens. Given: 21", "prompt"),
    ({"prompt": "x", "max_tokens": 40}, 422, "validation",
     "`inputs` tokens + `max_tokens` must be <= 40. Given: 1 `inputs` tokens and 40 `max_tokens`", "max_tokens"),
    ({"prompt": "x", "max_tokens": 30, "best_of": 2}, 422, "validation",
     "the request needs 64 KV cache tokens (1 prompt + 30 new, x 2 sequences, in blocks of 16), more than the "
     "server holds (MAX_BATCH_TOTAL_TOKENS=60); lower `max_tokens` or `best_of`", "max_tokens"),
    ({"prompt": [[1] * 21, [1, VOCAB]]}, 422, "validation",  # the first bad prompt decides
     "`prompt` must have less than 20 tokens. Given: 21", "prompt"),
    ({"prompt": [words(3), words(30)], "max_tokens": 10, "best_of": 2}, 422, "validation",  # own limits first
     "`prompt` must have less than 20 tokens. Given: 30", "prompt"),
]


@pytest.mark.parametrize("body, status, error_type, message, param", REFUSALS)
def test_refusals_say_what_to_fix_in_the_api_s_shape(body, status, error_type, message, param):
    api = dispatch("auto", body)[0]
    with pytest.raises(errors.ApiError) as info:
        run(body)
    err = info.value
    prefix = "Template error: " if error_type == "template_error" else "Input validation error: "
    assert (err.status, err.error_type, err.message, err.param) == (status, error_type, prefix + message, param)
    if api is Api.GENERATE:
        assert err.body(api) == {"error": prefix + message, "error_type": error_type}
    else:
        assert err.body(api) == {"error": {"message": prefix + message, "type": error_type, "param": param,
                                           "code": status}}


class NoTemplate(WordTokenizer):
    chat_template = None


@pytest.mark.parametrize("tokenizer, override, message", [
    (NoTemplate(), None, "Template error: template not found"),
    (WordTokenizer(), "raising", "Template error: Conversation roles must alternate"),
])
def test_template_errors_are_422_template_error(tokenizer, override, message):
    from dataclasses import replace

    v = Validator(replace(SETTINGS, chat_template=override), LIMITS, tokenizer, "tiny")
    with pytest.raises(errors.ApiError) as info:
        v.chat(ChatCompletionRequest.model_validate(CHAT))
    assert (info.value.status, info.value.error_type, info.value.message) == (422, "template_error", message)
    assert info.value.body(Api.OPENAI)["error"]["type"] == "template_error"


def test_the_vocabulary_is_what_tokenizer_and_model_both_know():
    v = validator(model_vocab=500)
    with pytest.raises(errors.ApiError, match=r"token id 600 is out of range \(vocabulary size 500\)"):
        run({**CHAT, "logit_bias": {"600": 1}}, v)
    with pytest.raises(errors.ApiError, match=r"must be in 0\.\.499"):
        run({"prompt": [499, 500]}, v)


def test_what_passes_becomes_the_engine_request():
    _, req = run({"inputs": words(25), "parameters": {"truncate": 5, "stop": ["a"], "top_n_tokens": 2,
                                                      "decoder_input_details": True, "adapter_id": "tiny"}})
    assert req.prompt_ids == [14] * 5 and req.params.max_new_tokens == 35  # unset: all MAX_TOTAL_TOKENS leaves
    assert (req.params.stop, req.params.top_n_tokens, req.params.prefill_logprobs, req.params.n) == (["a"], 2, True, 1)
    _, req = run({**CHAT, "max_tokens": 5, "max_completion_tokens": 7, "n": 2, "logprobs": True, "top_logprobs": 2,
                  "logit_bias": {"3": -100}})
    assert (req.prompt_ids, req.params.max_new_tokens, req.params.n, req.params.top_n_tokens) == ([12], 7, 2, 2)
    assert req.params.logit_bias == {3: -100.0}
    _, prompts = run({"prompt": [[12], [11, 12]], "max_tokens": 3, "n": 1, "best_of": 2, "echo": True,
                      "logprobs": 1})
    assert [(p.request.prompt_ids, p.text) for p in prompts] == [([12], "ww"), ([11, 12], "w ww")]
    assert all(p.request.params.n == 2 and p.request.params.prefill_logprobs for p in prompts)
    _, prompts = run({"prompt": "ab cd"})
    assert (prompts[0].request.prompt_ids, prompts[0].text, prompts[0].request.params.n) == ([12, 12], "ab cd", 1)


def test_logit_bias_limit_comes_from_the_environment():
    assert Settings.from_env({}).max_logit_bias == 300
    assert Settings.from_env({"MAX_LOGIT_BIAS": "0"}).max_logit_bias == 0
    with pytest.raises(errors.ApiError, match="up to 0 entries. Given: 1"):
        run({**CHAT, "logit_bias": {"1": 1}}, Validator(Settings(max_logit_bias=0), LIMITS, WordTokenizer(), "tiny"))
