"""OpenAI legacy completions: `prompt` (one or many) -> engine -> `text_completion` or chunks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from serve.engine.request import TokenInfo
from serve.handlers import common, openai
from serve.protocol import errors
from serve.protocol import openai as proto
from serve.service import ModelService


@dataclass
class Submitted:
    """One prompt in the engine: its handle, its length in tokens and its text (for `echo`)."""

    handle: Any
    prompt_tokens: int
    text: str


def handle(svc: ModelService, body: Any) -> common.Reply:
    """Answer one legacy completion request (docs/api.md, "Completions")."""
    req = openai.parse(proto.CompletionRequest, body)
    prompts = common.validator(svc).completions(req)
    submitted: list[Submitted] = []
    try:  # all or nothing: one refusal (429, 503) cancels the prompts already in
        for p in prompts:
            submitted.append(Submitted(common.submit(svc, p.request), len(p.request.prompt_ids), p.text))
    except errors.ApiError:
        for s in submitted:
            s.handle.cancel()
        raise
    head = openai.head(svc, "cmpl", req.model)
    if req.stream:
        return common.Reply(stream=_stream(submitted, req, head), on_close=lambda: _cancel(submitted))
    try:
        return _answer(submitted, req, head)
    except BaseException:  # one prompt failed (or its client left): the others stop too, nobody reads them
        _cancel(submitted)
        raise


def _cancel(submitted: list[Submitted]) -> None:
    for s in submitted:
        s.handle.cancel()


def legacy_logprobs(tokens: list[TokenInfo], tops: list[list[TokenInfo]], k: int) -> proto.LegacyLogprobs:
    """The pre-chat logprobs shape: parallel lists plus character offsets."""
    out, offset = proto.LegacyLogprobs(), 0
    for tok, top in zip(tokens, tops, strict=True):
        if tok.special:
            continue
        out.tokens.append(tok.text)
        out.token_logprobs.append(tok.logprob)
        out.top_logprobs.append({t.text: t.logprob for t in (top or [])[:k]} if k else None)
        out.text_offset.append(offset)
        offset += len(tok.text)
    return out


def _answer(submitted: list[Submitted], req: proto.CompletionRequest, head: dict[str, Any]) -> common.Reply:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p_idx, s in enumerate(submitted):
        got = common.collect(s.handle, req.best_of or req.n)
        prompt_tokens += s.prompt_tokens
        completion_tokens += got.generated_tokens
        for j, seq in enumerate(common.ranked(got.sequences)[: req.n]):
            logprobs = None
            if req.logprobs is not None:
                tokens, tops = seq.tokens, seq.top_tokens
                if req.echo:
                    tokens, tops = got.prefill + tokens, [[] for _ in got.prefill] + tops
                logprobs = legacy_logprobs(tokens, tops, req.logprobs)
            text = (s.text if req.echo else "") + openai.content_of(seq.finish)
            choices.append(proto.CompletionChoice(index=p_idx * req.n + j, text=text, logprobs=logprobs,
                                                  finish_reason=openai.finish_reason(seq.finish)))
    usage = proto.Usage.of(prompt_tokens, completion_tokens)
    return common.Reply(body=proto.Completion(**head, choices=choices, usage=usage))


def _stream(submitted: list[Submitted], req: proto.CompletionRequest, head: dict[str, Any]) -> Iterator[str]:
    """Chunks per prompt in order (all prompts run in the batch at once); `[DONE]` at the end."""
    writer = openai.ChunkWriter(proto.Completion, head, req.include_usage)
    completion_tokens = 0

    def chunks() -> Iterator[str]:
        nonlocal completion_tokens
        for p_idx, s in enumerate(submitted):
            if req.echo:
                for j in range(req.n):
                    yield writer.chunk([proto.CompletionChoice(index=p_idx * req.n + j, text=s.text)])
            for ev, text in openai.released(s.handle, req.n, req.stop):
                reason = None
                if ev.finish is not None:
                    completion_tokens += ev.finish.generated_tokens
                    reason = openai.finish_reason(ev.finish)
                if text or reason:
                    choice = proto.CompletionChoice(index=p_idx * req.n + ev.seq_index, text=text, finish_reason=reason)
                    yield writer.chunk([choice])

    prompt_tokens = sum(s.prompt_tokens for s in submitted)
    try:
        yield from writer.frame(chunks(), lambda: proto.Usage.of(prompt_tokens, completion_tokens))
    finally:  # a hang-up or an error: free the rows of prompts not yet drained (no-op when done)
        _cancel(submitted)
