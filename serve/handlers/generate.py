"""TGI generate: `{"inputs", "parameters", "stream"}` -> engine -> TGI's answer or SSE stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from serve.engine.request import PrefillEvent, TokenInfo
from serve.handlers import common
from serve.protocol import generate as proto
from serve.protocol.errors import Api, ApiError
from serve.protocol.fields import sse
from serve.service import ModelService


def handle(svc: ModelService, body: Any) -> common.Reply:
    """Answer one generate request (docs/api.md, "Generate")."""
    req = common.parse(proto.GenerateRequest, body)
    request = common.validator(svc).generate(req)
    handle_ = common.submit(svc, request)
    p = req.parameters
    prefix = req.inputs if p.return_full_text is not False else ""
    if req.stream:
        return common.Reply(stream=_stream(handle_, p, prefix, len(request.prompt_ids)), on_close=handle_.cancel)
    return _answer(svc, handle_, p, prefix, len(request.prompt_ids))


def token(t: TokenInfo) -> proto.Token:
    """An engine token as TGI writes it."""
    return proto.Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special)


def sequence_details(seq: common.SequenceResult, prefill: list[TokenInfo], with_top: bool) -> dict[str, Any]:
    """The fields `details` and each of `best_of_sequences` share."""
    return {
        "finish_reason": seq.finish.reason.value,
        "generated_tokens": seq.finish.generated_tokens,
        "seed": seq.finish.seed,
        "prefill": [proto.PrefillToken(id=t.id, text=t.text, logprob=t.logprob) for t in prefill],
        "tokens": [token(t) for t in seq.tokens],
        "top_tokens": [[token(t) for t in top] for top in seq.top_tokens] if with_top else None,
    }


def _answer(svc: ModelService, handle_: Any, p: proto.GenerateParameters, prefix: str,
            input_length: int) -> common.Reply:
    got = common.collect(handle_, p.best_of or 1)
    best, *others = common.ranked(got.sequences)
    details = None
    if p.details:
        with_top = bool(p.top_n_tokens)
        candidates = [proto.BestOfSequence(generated_text=prefix + o.finish.text,
                                           **sequence_details(o, got.prefill, with_top)) for o in others]
        details = proto.Details(**sequence_details(best, got.prefill, with_top), best_of_sequences=candidates or None)
    headers = common.timing_headers(svc, handle_, input_length, best.finish.generated_tokens)
    return common.Reply(body=[proto.GeneratedText(generated_text=prefix + best.finish.text, details=details)],
                        headers=headers)


def _stream(handle_: Any, p: proto.GenerateParameters, prefix: str, input_length: int) -> Iterator[str]:
    """One `data:{...}` event per token; the last carries generated_text (and details if asked)."""
    try:
        for ev in common.guarded_events(handle_):
            if isinstance(ev, PrefillEvent):
                continue
            text, details = None, None
            if ev.finish is not None:
                text = prefix + ev.finish.text
                if p.details:
                    details = proto.StreamDetails(finish_reason=ev.finish.reason.value,
                                                  generated_tokens=ev.finish.generated_tokens,
                                                  seed=ev.finish.seed, input_length=input_length)
            top = [token(t) for t in ev.top_tokens] if p.top_n_tokens and ev.top_tokens else None
            event = proto.StreamEvent(index=ev.index, token=token(ev.token), top_tokens=top, generated_text=text,
                                      details=details)
            yield sse(event, space=False)
    except ApiError as err:
        yield err.sse(Api.GENERATE)
