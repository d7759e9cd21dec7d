"""TGI generate: `{"inputs", "parameters", "stream"}` -> engine -> TGI's answer or SSE stream."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from serve.engine.request import GenerationRequest, PrefillEvent, SamplingParams
from serve.handlers import common
from serve.handlers.runtime import Runtime
from serve.protocol import errors
from serve.protocol import generate as proto

# TGI's watermark constants (Kirchenbauer et al. 2023): half the vocabulary is "green" per step.
WATERMARK_GAMMA = 0.5
WATERMARK_DELTA = 2.0
WATERMARK_KEY = 15485863


class Watermark:
    """A per-request logits processor: bias a greenlist seeded by the previous token (TGI's scheme)."""

    def __init__(self, gamma: float = WATERMARK_GAMMA, delta: float = WATERMARK_DELTA, key: int = WATERMARK_KEY):
        self.gamma, self.delta, self.key = gamma, delta, key
        self._rng = torch.Generator(device="cpu")

    def greenlist(self, prev_token: int, vocab: int) -> torch.Tensor:
        """The green token ids after `prev_token`; deterministic so a detector can recompute them."""
        self._rng.manual_seed(self.key * prev_token)
        return torch.randperm(vocab, generator=self._rng)[: int(vocab * self.gamma)]

    def __call__(self, ids: Any, logits: torch.Tensor) -> torch.Tensor:
        green = self.greenlist(int(ids[-1]), logits.shape[-1]).to(logits.device)
        out = logits.clone()
        out[green] += self.delta
        return out


def sampling_params(p: proto.GenerateParameters, max_new: int) -> SamplingParams:
    """Request value, else SamplingParams' neutral default (which switches the step off)."""
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=1.0 if p.temperature is None else p.temperature,
        do_sample=p.do_sample,
        top_k=p.top_k or 0,
        top_p=1.0 if p.top_p is None else p.top_p,
        typical_p=1.0 if p.typical_p is None else p.typical_p,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=p.seed,
        stop=list(p.stop),
        top_n_tokens=p.top_n_tokens or 0,
        prefill_logprobs=p.decoder_input_details,
        n=p.best_of or 1,
        logits_processors=[Watermark()] if p.watermark else [],
    )


def _prompt_ids(rt: Runtime, req: proto.GenerateRequest) -> list[int]:
    """Tokenize as TGI does (with the model's special tokens), then apply `truncate`."""
    ids = list(rt.tokenizer(req.inputs)["input_ids"])
    truncate = req.parameters.truncate
    if truncate is not None:
        if truncate > rt.engine_config.max_input_tokens:
            raise errors.validation(
                f"Input validation error: `truncate` must be strictly positive and less than "
                f"{rt.engine_config.max_input_tokens}. Given: {truncate}",
                "parameters.truncate",
            )
        ids = ids[-truncate:]
    return ids


def handle(rt: Runtime, body: Any) -> common.Reply:
    """Answer one generate request (SPEC section 3)."""
    req = common.parse(proto.GenerateRequest, body)
    s = rt.settings
    req.check_limits(s.max_stop_sequences, s.max_top_n_tokens, s.max_best_of)
    p = req.parameters
    if p.adapter_id not in (None, "", rt.model_name):
        raise errors.validation(f"Input validation error: adapter `{p.adapter_id}` is not loaded", "parameters.adapter_id")
    ids = _prompt_ids(rt, req)
    common.check_input(rt, ids)
    max_new = common.max_new_tokens(rt, len(ids), p.max_new_tokens, "max_new_tokens")
    params = sampling_params(p, max_new)
    handle_ = common.submit(rt, GenerationRequest(prompt_ids=ids, params=params))
    prefix = req.inputs if p.return_full_text is not False else ""
    if req.stream:
        return common.Reply(stream=_stream(handle_, p, prefix, len(ids)), on_close=handle_.cancel)
    return _answer(handle_, p, prefix, len(ids))


def _answer(handle_: Any, p: proto.GenerateParameters, prefix: str, input_length: int) -> common.Reply:
    got = common.collect(handle_, p.best_of or 1)
    ranked = sorted(got.sequences, key=lambda s: s.finish.cumulative_logprob, reverse=True)
    best, others = ranked[0], ranked[1:]
    item: dict[str, Any] = {"generated_text": prefix + best.finish.text}
    with_top = bool(p.top_n_tokens)
    if p.details:
        details = proto.sequence_details(best, got.prefill, with_top)
        if others:
            details["best_of_sequences"] = [
                {"generated_text": prefix + o.finish.text, **proto.sequence_details(o, got.prefill, with_top)}
                for o in others
            ]
        item["details"] = details
    headers = common.timing_headers(handle_, input_length, best.finish.generated_tokens)
    return common.Reply(body=[item], headers=headers)


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
                    details = {
                        "finish_reason": ev.finish.reason.value,
                        "generated_tokens": ev.finish.generated_tokens,
                        "seed": ev.finish.seed,
                        "input_length": input_length,
                    }
            top = ev.top_tokens if p.top_n_tokens else None
            yield common.sse(proto.stream_event(ev.index, ev.token, top, text, details), space=False)
    except errors.ApiError as err:
        yield err.sse(errors.GENERATE)
