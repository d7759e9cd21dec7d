"""What chat completions and completions share: parsing, OpenAI's words, and the stream frame."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from pydantic import BaseModel

from serve.engine.request import FinishInfo, FinishReason, PrefillEvent, TokenEvent
from serve.handlers import common
from serve.handlers.holdback import Holdback
from serve.protocol import openai as proto
from serve.protocol.errors import Api, ApiError
from serve.protocol.fields import sse
from serve.service import ModelService

log = logging.getLogger(__name__)
FINGERPRINT = "sagemaker-llm-serve-0.1.0"
Schema = TypeVar("Schema", bound=BaseModel)


def parse(schema: type[Schema], body: Any) -> Schema:
    """Validate an OpenAI body against its schema; unknown top-level fields are logged and ignored."""
    req = common.parse(schema, body)
    if extra := proto.unknown_fields(schema, body):
        log.debug("ignoring unknown %s fields: %s", schema.__name__, extra)
    return req


def head(svc: ModelService, prefix: str, model: str | None) -> dict[str, Any]:
    """The keys every answer and chunk of one request starts with (one id for the whole stream)."""
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model or svc.model_name,
            "system_fingerprint": FINGERPRINT}


def finish_reason(finish: FinishInfo) -> str:
    """OpenAI's words: a stop string or EOS is `stop`, never `eos_token`."""
    return "length" if finish.reason is FinishReason.LENGTH else "stop"


def content_of(finish: FinishInfo) -> str:
    """The answer text without the matched stop string (OpenAI's behaviour, unlike TGI's)."""
    return finish.text if finish.stop_start is None else finish.text[: finish.stop_start]


def released(handle: Iterable[Any], n: int, stops: list[str]) -> Iterator[tuple[TokenEvent, str]]:
    """Each token event of `n` sequences with the text it lets the stream send: all but a tail that
    may still become a stop string, and on a sequence's last event the rest of its answer."""
    holds = [Holdback(stops) for _ in range(n)]
    for ev in common.guarded_events(handle):
        if isinstance(ev, PrefillEvent):
            continue
        hold = holds[ev.seq_index]
        if ev.finish is not None:
            yield ev, hold.finish(content_of(ev.finish))
        else:
            yield ev, hold.push("" if ev.token.special else ev.token.text)


class ChunkWriter:
    """Writes the events of one OpenAI stream: chunks that share a head, then usage and `[DONE]`."""

    def __init__(self, chunk_type: type[proto.ChatCompletionChunk] | type[proto.Completion], head: dict[str, Any],
                 include_usage: bool):
        self.chunk_type, self.head, self.include_usage = chunk_type, head, include_usage
        # Without `stream_options.include_usage` the key is left out, not written null.
        self.exclude = None if include_usage else {"usage"}

    def chunk(self, choices: list[Any], usage: proto.Usage | None = None) -> str:
        """One `data: {...}` event."""
        return sse(self.chunk_type(**self.head, choices=choices, usage=usage), exclude=self.exclude)

    def frame(self, body: Iterator[str], usage: Callable[[], proto.Usage]) -> Iterator[str]:
        """The whole stream: `body`'s chunks, the usage chunk if asked, `[DONE]`; an error after the
        start is one last error event, then `[DONE]`."""
        try:
            yield from body
            if self.include_usage:
                yield self.chunk([], usage())
            yield sse("[DONE]")
        except ApiError as err:
            yield err.sse(Api.OPENAI)
