"""OpenAI chat completions: messages -> chat template -> engine -> `chat.completion` or chunks."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

from serve import chat_template
from serve.engine.request import FinishInfo, FinishReason, GenerationRequest, PrefillEvent, SamplingParams
from serve.engine.stopping import holdback_length
from serve.handlers import common
from serve.handlers.runtime import Runtime
from serve.protocol import errors
from serve.protocol import openai as proto

log = logging.getLogger(__name__)
FINGERPRINT = "sagemaker-llm-serve-0.1.0"


def openai_params(req: proto.SamplingFields, max_new: int, n: int, top_n: int) -> SamplingParams:
    """OpenAI semantics: sampling unless temperature is 0; additive presence/frequency penalties."""
    temperature = 1.0 if req.temperature is None else req.temperature
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=temperature,
        do_sample=temperature > 0,
        top_p=1.0 if req.top_p is None else req.top_p,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        logit_bias={int(k): float(v) for k, v in (req.logit_bias or {}).items()},
        seed=req.seed,
        stop=list(req.stop),
        top_n_tokens=top_n,
        n=n,
    )


def finish_reason(finish: FinishInfo) -> str:
    """OpenAI's words: a stop string or EOS is `stop`, never `eos_token`."""
    return "length" if finish.reason is FinishReason.LENGTH else "stop"


def content_of(finish: FinishInfo) -> str:
    """The answer text without the matched stop string (OpenAI's behaviour, unlike TGI's)."""
    return finish.text if finish.stop_start is None else finish.text[: finish.stop_start]


def logprob_entry(token: Any, top: list[Any] | None, k: int) -> dict[str, Any]:
    """One element of `logprobs.content`."""
    def one(t: Any) -> dict[str, Any]:
        return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode("utf-8"))}

    return {**one(token), "top_logprobs": [one(t) for t in (top or [])[:k]]}


def check_stop_count(rt: Runtime, stop: list[str]) -> None:
    if len(stop) > rt.settings.max_stop_sequences:
        raise errors.validation(
            f"Input validation error: `stop` supports up to {rt.settings.max_stop_sequences} stop sequences. "
            f"Given: {len(stop)}",
            "stop",
        )


def parse_openai(rt: Runtime, schema: Any, body: Any) -> Any:
    """Validate an OpenAI body (chat or legacy): schema, unknown fields logged, stop and bias limits."""
    req = common.parse(schema, body)
    if extra := proto.unknown_fields(schema, body):
        log.debug("ignoring unknown %s fields: %s", schema.__name__, extra)
    check_stop_count(rt, req.stop)
    common.check_logit_bias(rt, req.logit_bias)
    return req


def handle(rt: Runtime, body: Any) -> common.Reply:
    """Answer one chat completion request (SPEC section 4)."""
    req: proto.ChatCompletionRequest = parse_openai(rt, proto.ChatCompletionRequest, body)
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    ids = chat_template.encode_messages(rt.tokenizer, messages, rt.settings.chat_template)
    common.check_input(rt, ids, "messages")
    max_new = common.max_new_tokens(rt, len(ids), req.token_limit, "max_tokens")
    top_n = (req.top_logprobs or 0) if req.logprobs else 0
    handle_ = common.submit(rt, GenerationRequest(ids, openai_params(req, max_new, req.n, top_n)))
    meta = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": req.model or rt.model_name,
        "system_fingerprint": FINGERPRINT,
    }
    if req.stream:
        return common.Reply(stream=ChatStream(req, meta, len(ids)).run(handle_), on_close=handle_.cancel)
    return _answer(handle_, req, meta, len(ids))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _answer(handle_: Any, req: proto.ChatCompletionRequest, meta: dict, prompt_tokens: int) -> common.Reply:
    got = common.collect(handle_, req.n)
    choices = []
    for i, seq in enumerate(got.sequences):
        logprobs = None
        if req.logprobs:
            k = req.top_logprobs or 0
            logprobs = {
                "content": [
                    logprob_entry(t, top, k) for t, top in zip(seq.tokens, seq.top_tokens, strict=True) if not t.special
                ]
            }
        choices.append({
            "index": i,
            "message": {"role": "assistant", "content": content_of(seq.finish)},
            "logprobs": logprobs,
            "finish_reason": finish_reason(seq.finish),
        })
    body = {**meta, "object": "chat.completion", "choices": choices, "usage": usage(prompt_tokens, got.generated_tokens)}
    return common.Reply(body=body, headers=common.timing_headers(handle_, prompt_tokens, got.generated_tokens))


class ChatStream:
    """Turns engine events into OpenAI chunks, holding back text that may become a stop string."""

    def __init__(self, req: proto.ChatCompletionRequest, meta: dict, prompt_tokens: int):
        self.req, self.meta, self.prompt_tokens = req, meta, prompt_tokens
        self.text = [""] * req.n  # text received per choice
        self.sent = [0] * req.n  # characters of it already sent
        self.pending: list[list[dict]] = [[] for _ in range(req.n)]  # logprobs not yet sent
        self.completion_tokens = 0

    def chunk(self, choices: list[dict], usage_: dict | None = None) -> str:
        body: dict[str, Any] = {**self.meta, "object": "chat.completion.chunk", "choices": choices}
        if self.req.include_usage:
            body["usage"] = usage_
        return common.sse(body)

    def choice(self, i: int, delta: dict, reason: str | None = None) -> dict:
        logprobs = None
        if self.req.logprobs and (self.pending[i] or reason is None):
            logprobs, self.pending[i] = {"content": self.pending[i]}, []
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": reason}

    def on_token(self, ev: Any) -> Iterator[str]:
        i = ev.seq_index
        if not ev.token.special:
            self.text[i] += ev.token.text
            if self.req.logprobs:
                self.pending[i].append(logprob_entry(ev.token, ev.top_tokens, self.req.top_logprobs or 0))
        if ev.finish is not None:
            yield from self.on_finish(i, ev.finish)
            return
        safe = len(self.text[i]) - holdback_length(self.text[i], self.req.stop)
        if safe > self.sent[i]:
            delta = self.text[i][self.sent[i] : safe]
            self.sent[i] = safe
            yield self.chunk([self.choice(i, {"content": delta})])

    def on_finish(self, i: int, finish: FinishInfo) -> Iterator[str]:
        final = content_of(finish)
        rest = final[self.sent[i] :] if final.startswith(self.text[i][: self.sent[i]]) else ""
        if rest:
            yield self.chunk([self.choice(i, {"content": rest})])
        self.completion_tokens += finish.generated_tokens
        yield self.chunk([self.choice(i, {}, finish_reason(finish))])

    def run(self, handle_: Any) -> Iterator[str]:
        """The whole SSE body: role chunks, content chunks, finish chunks, usage, [DONE]."""
        try:
            for i in range(self.req.n):
                yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}])
            for ev in common.guarded_events(handle_):
                if not isinstance(ev, PrefillEvent):
                    yield from self.on_token(ev)
            if self.req.include_usage:
                yield self.chunk([], usage(self.prompt_tokens, self.completion_tokens))
            yield common.sse("[DONE]")
        except errors.ApiError as err:
            yield err.sse(errors.OPENAI)
