"""What every handler does between a validated schema and the engine.

Token budgets (SPEC: unset `max_new_tokens` means "up to MAX_TOTAL_TOKENS"), submission with the
engine's exceptions mapped to SPEC's statuses, draining a handle into per-sequence results, the
TGI timing headers and SSE framing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from serve.engine.request import (
    EngineError,
    EngineOverloaded,
    EngineUnavailable,
    FinishInfo,
    GenerationRequest,
    PrefillEvent,
    TokenEvent,
    TokenInfo,
)
from serve.handlers.runtime import Runtime
from serve.protocol import errors


@dataclass
class SequenceResult:
    """One sequence's tokens as they arrived, and how it finished."""

    tokens: list[TokenInfo] = field(default_factory=list)
    top_tokens: list[list[TokenInfo]] = field(default_factory=list)
    finish: FinishInfo | None = None

    def add(self, ev: TokenEvent) -> None:
        self.tokens.append(ev.token)
        self.top_tokens.append(ev.top_tokens or [])
        if ev.finish is not None:
            self.finish = ev.finish


@dataclass
class Collected:
    """Everything a non-streamed request produced."""

    prefill: list[TokenInfo]
    sequences: list[SequenceResult]

    @property
    def generated_tokens(self) -> int:
        return sum(s.finish.generated_tokens for s in self.sequences if s.finish)


def check_input(rt: Runtime, prompt_ids: list[int], field_name: str = "inputs") -> None:
    """422 when the prompt is empty or longer than MAX_INPUT_TOKENS (TGI's message)."""
    limit = rt.engine_config.max_input_tokens
    if not prompt_ids:
        raise errors.validation(f"Input validation error: `{field_name}` cannot be empty", field_name)
    if len(prompt_ids) > limit:
        raise errors.validation(
            f"Input validation error: `{field_name}` must have less than {limit} tokens. Given: {len(prompt_ids)}",
            field_name,
        )


def max_new_tokens(rt: Runtime, input_length: int, requested: int | None, field_name: str) -> int:
    """The requested budget, or all that MAX_TOTAL_TOKENS leaves; 422 when the sum is too big."""
    total = rt.engine_config.max_total_tokens
    room = total - input_length
    if requested is None:
        if room < 1:
            raise errors.validation(
                f"Input validation error: `inputs` must have less than {total} tokens. Given: {input_length}", "inputs"
            )
        return room
    if requested > room:
        raise errors.validation(
            f"Input validation error: `inputs` tokens + `{field_name}` must be <= {total}. "
            f"Given: {input_length} `inputs` tokens and {requested} `{field_name}`",
            field_name,
        )
    return requested


def check_logit_bias(rt: Runtime, bias: dict[int, float] | None) -> None:
    """422 naming a token id the vocabulary does not have."""
    vocab = len(rt.tokenizer)
    for token in bias or {}:
        if token >= vocab:
            raise errors.validation(
                f"Input validation error: `logit_bias` token id {token} is out of range (vocabulary size {vocab})",
                "logit_bias",
            )


def submit(rt: Runtime, request: GenerationRequest) -> Any:
    """engine.submit with its exceptions turned into SPEC's statuses (429, 503, 422)."""
    if not rt.ready:
        raise errors.unhealthy()
    try:
        return rt.engine.submit(request)
    except EngineOverloaded:
        raise errors.overloaded(rt.engine_config.max_concurrent_requests) from None
    except EngineUnavailable as exc:
        raise errors.unhealthy(str(exc) or "the engine is not accepting requests (shutting down)") from None
    except ValueError as exc:
        raise errors.validation(f"Input validation error: {exc}") from None


def collect(handle: Any, n: int) -> Collected:
    """Drain a handle into per-sequence results; an engine failure becomes a 424."""
    prefill: list[TokenInfo] = []
    seqs = [SequenceResult() for _ in range(n)]
    try:
        for ev in handle:
            if isinstance(ev, PrefillEvent):
                prefill = ev.tokens
            else:
                seqs[ev.seq_index].add(ev)
    except EngineError as exc:
        raise errors.generation(str(exc)) from None
    return Collected(prefill, seqs)


def timing_headers(handle: Any, prompt_tokens: int, generated_tokens: int) -> dict[str, str]:
    """TGI's headers: x-compute-time in seconds, the other times in milliseconds."""
    t = handle.timings
    end = t.finished or time.monotonic()
    start_infer = t.prefill_start or t.queued
    total = end - t.queued
    inference = end - start_infer
    per_token = inference / generated_tokens if generated_tokens else 0.0
    return {
        "x-compute-type": "cpu+engine",
        "x-compute-time": f"{total:.6f}",
        "x-total-time": str(round(total * 1000)),
        "x-queue-time": str(round((start_infer - t.queued) * 1000)),
        "x-inference-time": str(round(inference * 1000)),
        "x-time-per-token": str(round(per_token * 1000)),
        "x-prompt-tokens": str(prompt_tokens),
        "x-generated-tokens": str(generated_tokens),
    }


def sse(payload: Any, space: bool = True) -> str:
    """One SSE event. Generate uses `data:{...}` (TGI), OpenAI `data: {...}`; both end with a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n" if space else f"data:{data}\n\n"


def guarded_events(handle: Any) -> Iterator[Any]:
    """Iterate a handle, turning an engine failure into a 424 ApiError (for streams)."""
    try:
        yield from handle
    except EngineError as exc:
        raise errors.generation(str(exc)) from None


@dataclass
class Reply:
    """A handler's answer: a JSON body, or a stream of SSE strings, plus headers."""

    body: Any = None
    stream: Iterator[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    # Called when the response is closed: frees the engine rows even if the stream never started
    # (closing a generator that has not run yet skips its `finally`).
    on_close: Callable[[], None] | None = None


def parse(schema: Any, body: Any) -> Any:
    """Validate a decoded JSON body against a pydantic schema; 422 naming the field."""
    from pydantic import ValidationError

    if not isinstance(body, dict):
        raise errors.validation("Input validation error: the body must be a JSON object")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise errors.from_pydantic(exc) from None

