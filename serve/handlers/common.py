"""What every handler does around the validation boundary.

Parsing a body into its schema, submitting to the engine (its refusals become 429 and 503),
draining a handle into per-sequence results, ranking `best_of` candidates, TGI's timing headers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from serve.engine.request import (
    EngineError,
    EngineOverloaded,
    EngineShutdown,
    EngineUnavailable,
    FinishInfo,
    GenerationRequest,
    PrefillEvent,
    TokenInfo,
)
from serve.handlers import departure
from serve.protocol import errors
from serve.protocol.fields import WireModel
from serve.service import ModelService
from serve.validation import Validator

if TYPE_CHECKING:  # both import torch, which the HTTP layer never does at import time
    from serve.engine.config import EngineConfig
    from serve.engine.engine import Engine

Schema = TypeVar("Schema", bound=BaseModel)


@dataclass
class Reply:
    """A handler's answer: a response model (or TGI's list of them), or a stream of SSE events."""

    body: WireModel | Sequence[WireModel] = ()
    stream: Iterator[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Called when the response is closed: frees the engine rows even if the stream never started
    # (closing a generator that has not run yet skips its `finally`).
    on_close: Callable[[], None] | None = None


def parse(schema: type[Schema], body: Any) -> Schema:
    """Validate a decoded JSON body against a pydantic schema; 422 naming the field."""
    if not isinstance(body, dict):
        raise errors.validation("Input validation error: the body must be a JSON object")
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        raise errors.from_pydantic(exc) from None


def serving(svc: ModelService) -> tuple[Engine, EngineConfig]:
    """The engine of a ready worker and its limits; 503 `unhealthy` while it loads, drains or has failed."""
    engine, limits = svc.engine, svc.engine_config
    if engine is None or limits is None or not svc.ready:
        raise errors.unhealthy()
    return engine, limits


def validator(svc: ModelService) -> Validator:
    """The validation boundary for this worker's settings, engine limits and tokenizer."""
    engine, limits = serving(svc)
    return Validator(svc.settings, limits, svc.tokenizer, svc.model_name, engine.vocab_size, svc.grammars)


def submit(svc: ModelService, request: GenerationRequest) -> Any:
    """engine.submit with its refusals turned into 429 `overloaded` and 503 `unhealthy`.

    The handle is tied to the current client (departure.py): cancelled if it hangs up; nothing is
    submitted for a client already gone.
    """
    engine, limits = serving(svc)
    if departure.gone():
        raise departure.client_gone()
    try:
        handle = engine.submit(request)
    except EngineOverloaded:
        raise errors.overloaded(limits.max_concurrent_requests) from None
    except EngineUnavailable as exc:
        raise errors.unhealthy(str(exc) or "the engine is not accepting requests (shutting down)") from None
    departure.track(handle)
    return handle


@dataclass
class SequenceResult:
    """One finished sequence: its tokens as they arrived (with their alternatives), and its end."""

    tokens: list[TokenInfo]
    top_tokens: list[list[TokenInfo]]
    finish: FinishInfo


@dataclass
class Collected:
    """Everything a non-streamed request produced."""

    prefill: list[TokenInfo]
    sequences: list[SequenceResult]

    @property
    def generated_tokens(self) -> int:
        return sum(s.finish.generated_tokens for s in self.sequences)


def collect(handle: Iterable[Any], n: int) -> Collected:
    """Drain a handle into its `n` finished sequences; an engine failure becomes a 424."""
    prefill: list[TokenInfo] = []
    tokens: list[list[TokenInfo]] = [[] for _ in range(n)]
    tops: list[list[list[TokenInfo]]] = [[] for _ in range(n)]
    finishes: list[FinishInfo | None] = [None] * n
    for ev in guarded_events(handle):
        if isinstance(ev, PrefillEvent):
            prefill = ev.tokens
            continue
        tokens[ev.seq_index].append(ev.token)
        tops[ev.seq_index].append(ev.top_tokens or [])
        finishes[ev.seq_index] = ev.finish or finishes[ev.seq_index]
    if any(f is None for f in finishes):
        if departure.gone():  # cancelled because its client hung up: nobody reads this answer
            raise departure.client_gone()
        # the engine closed the handle early: a bug, said plainly
        raise errors.generation("the engine ended the request before every sequence finished")
    return Collected(prefill, [SequenceResult(t, top, f) for t, top, f in zip(tokens, tops, finishes) if f])


def ranked(sequences: list[SequenceResult]) -> list[SequenceResult]:
    """`best_of` candidates, most likely first (by cumulative logprob, as TGI and OpenAI rank them)."""
    return sorted(sequences, key=lambda s: s.finish.cumulative_logprob, reverse=True)


def guarded_events(handle: Iterable[Any]) -> Iterator[Any]:
    """Iterate a handle, turning an engine failure into its ApiError (engine_failure)."""
    try:
        yield from handle
    except EngineError as exc:
        raise engine_failure(exc) from None


def engine_failure(exc: EngineError) -> errors.ApiError:
    """A failed request's answer: 503 when shutdown cut it short, else 424 (the model failed on it)."""
    if isinstance(exc, EngineShutdown):
        return errors.unhealthy(str(exc))
    return errors.generation(str(exc))


def timing_headers(svc: ModelService, handle: Any, prompt_tokens: int, generated_tokens: int) -> dict[str, str]:
    """TGI's headers: x-compute-time in seconds, the other times in milliseconds."""
    t = handle.timings
    end = t.finished or time.monotonic()
    start_infer = t.prefill_start or t.queued
    total = end - t.queued
    inference = end - start_infer
    per_token = inference / generated_tokens if generated_tokens else 0.0
    engine = svc.engine
    assert engine is not None, "a request was answered, so its engine was loaded (and is never unset)"
    return {
        "x-compute-type": f"{engine.device.type}+engine",
        "x-compute-time": f"{total:.6f}",
        "x-total-time": str(round(total * 1000)),
        "x-queue-time": str(round((start_infer - t.queued) * 1000)),
        "x-inference-time": str(round(inference * 1000)),
        "x-time-per-token": str(round(per_token * 1000)),
        "x-prompt-tokens": str(prompt_tokens),
        "x-generated-tokens": str(generated_tokens),
    }
