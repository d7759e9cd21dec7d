"""OpenAI legacy completions: `prompt` (one or many) -> engine -> `text_completion` or chunks."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from serve.engine.request import GenerationRequest, PrefillEvent
from serve.engine.stopping import holdback_length
from serve.handlers import common
from serve.handlers.chat import FINGERPRINT, content_of, finish_reason, openai_params, parse_openai, usage
from serve.handlers.runtime import Runtime
from serve.protocol import errors
from serve.protocol import openai as proto


def legacy_logprobs(tokens: list[Any], tops: list[list[Any]], k: int, offset: int) -> dict[str, Any]:
    """The pre-chat logprobs shape: parallel lists plus character offsets."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, top in zip(tokens, tops, strict=True):
        if tok.special:
            continue
        out["tokens"].append(tok.text)
        out["token_logprobs"].append(tok.logprob)
        out["top_logprobs"].append({t.text: t.logprob for t in (top or [])[:k]} if k else None)
        out["text_offset"].append(offset)
        offset += len(tok.text)
    return out


def _encode(rt: Runtime, prompt: str | list[int]) -> tuple[list[int], str]:
    """(token ids, prompt text); token-id prompts are checked against the vocabulary."""
    if isinstance(prompt, str):
        return list(rt.tokenizer(prompt)["input_ids"]), prompt
    vocab = len(rt.tokenizer)
    if any(t < 0 or t >= vocab for t in prompt):
        raise errors.validation(f"Input validation error: `prompt` token ids must be in 0..{vocab - 1}", "prompt")
    return list(prompt), rt.tokenizer.decode(prompt)


def _submit_all(rt: Runtime, req: proto.CompletionRequest) -> list[tuple[Any, int, str]]:
    """Validate every prompt first, then submit them all; one refusal cancels those already in."""
    prepared = []
    for prompt in req.prompts():
        ids, text = _encode(rt, prompt)
        common.check_input(rt, ids, "prompt")
        max_new = common.max_new_tokens(rt, len(ids), req.max_tokens, "max_tokens")
        params = openai_params(req, max_new, req.best_of or req.n, req.logprobs or 0)
        params.prefill_logprobs = bool(req.echo and req.logprobs is not None)
        prepared.append((ids, text, params))
    handles: list[tuple[Any, int, str]] = []
    try:
        for ids, text, params in prepared:
            handles.append((common.submit(rt, GenerationRequest(ids, params)), len(ids), text))
    except errors.ApiError:
        for h, _, _ in handles:
            h.cancel()
        raise
    return handles


def handle(rt: Runtime, body: Any) -> common.Reply:
    """Answer one legacy completion request."""
    req: proto.CompletionRequest = parse_openai(rt, proto.CompletionRequest, body)
    handles = _submit_all(rt, req)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model or rt.model_name,
            "system_fingerprint": FINGERPRINT}
    if req.stream:
        return common.Reply(stream=_stream(handles, req, meta), on_close=lambda: [h.cancel() for h, _, _ in handles])
    return _answer(handles, req, meta)


def _choice_text(req: proto.CompletionRequest, prompt: str, seq: Any) -> str:
    return (prompt if req.echo else "") + content_of(seq.finish)


def _answer(handles: list[tuple[Any, int, str]], req: proto.CompletionRequest, meta: dict) -> common.Reply:
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p_idx, (h, n_prompt, prompt) in enumerate(handles):
        got = common.collect(h, req.best_of or req.n)
        prompt_tokens += n_prompt
        completion_tokens += got.generated_tokens
        seqs = sorted(got.sequences, key=lambda s: s.finish.cumulative_logprob, reverse=True)[: req.n]
        for j, seq in enumerate(seqs):
            logprobs = None
            if req.logprobs is not None:
                tokens, tops = seq.tokens, seq.top_tokens
                if req.echo:
                    tokens, tops = got.prefill + tokens, [[] for _ in got.prefill] + tops
                logprobs = legacy_logprobs(tokens, tops, req.logprobs, 0)
            choices.append({"index": p_idx * req.n + j, "text": _choice_text(req, prompt, seq),
                            "logprobs": logprobs, "finish_reason": finish_reason(seq.finish)})
    body = {**meta, "object": "text_completion", "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}
    return common.Reply(body=body)


def _stream(handles: list[tuple[Any, int, str]], req: proto.CompletionRequest, meta: dict) -> Iterator[str]:
    """Chunks per prompt in order (all prompts run in the batch at once); `[DONE]` at the end."""
    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        body: dict[str, Any] = {**meta, "object": "text_completion", "choices": choices}
        if req.include_usage:
            body["usage"] = usage_
        return common.sse(body)

    prompt_tokens = completion_tokens = 0
    try:
        for p_idx, (h, n_prompt, prompt) in enumerate(handles):
            prompt_tokens += n_prompt
            texts, sent = [""] * req.n, [0] * req.n
            if req.echo:
                for j in range(req.n):
                    yield chunk([{"index": p_idx * req.n + j, "text": prompt, "logprobs": None, "finish_reason": None}])
            for ev in common.guarded_events(h):
                if isinstance(ev, PrefillEvent):
                    continue
                j = ev.seq_index
                if not ev.token.special:
                    texts[j] += ev.token.text
                if ev.finish is not None:
                    completion_tokens += ev.finish.generated_tokens
                    final = content_of(ev.finish)
                    upto, reason = len(final), finish_reason(ev.finish)
                else:
                    final, upto, reason = texts[j], len(texts[j]) - holdback_length(texts[j], req.stop), None
                delta = final[sent[j] : upto]
                sent[j] = max(sent[j], upto)
                if delta or reason:
                    yield chunk([{"index": p_idx * req.n + j, "text": delta, "logprobs": None, "finish_reason": reason}])
        if req.include_usage:
            yield chunk([], usage(prompt_tokens, completion_tokens))
        yield common.sse("[DONE]")
    except errors.ApiError as err:
        yield err.sse(errors.OPENAI)
    finally:  # a hang-up or an error: free the rows of prompts not yet drained (no-op when done)
        for h, _, _ in handles:
            h.cancel()
