"""Read `invoke_endpoint_with_response_stream` as whole lines and whole SSE events.

SageMaker cuts the container's bytes into `PayloadPart`s wherever it likes: one part may hold half
a line, or the end of one SSE event and the start of the next, or split a multi-byte UTF-8
character. The AWS samples' `LineIterator` reads lines with `readline()` and silently yields a
partial line as if it were whole; here a line is only yielded once its newline arrived, bytes are
decoded only at line boundaries, and events are only yielded once their blank line arrived.

    resp = runtime.invoke_endpoint_with_response_stream(EndpointName=name, Body=body)
    for event in iter_sse_json(resp["Body"]):
        print(event["choices"][0]["delta"].get("content", ""), end="")
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any


def iter_payload_bytes(stream: Iterable[Any]) -> Iterator[bytes]:
    """The raw bytes of every `PayloadPart` of a botocore event stream (plain bytes pass through).

    botocore raises `EventStreamError` itself on `ModelStreamError` / `InternalStreamFailure`.
    """
    for event in stream:
        if isinstance(event, (bytes, bytearray)):
            yield bytes(event)
        elif "PayloadPart" in event:
            yield event["PayloadPart"].get("Bytes", b"")


def iter_lines(stream: Iterable[Any]) -> Iterator[str]:
    """Whole lines (without their `\\n` / `\\r\\n`), whatever the part boundaries.

    A last line without a trailing newline is yielded when the stream ends.
    """
    pending = bytearray()
    for data in iter_payload_bytes(stream):
        pending += data
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end])
            del pending[:end + 1]
            yield line.removesuffix(b"\r").decode("utf-8")
    if pending:
        yield bytes(pending).removesuffix(b"\r").decode("utf-8")


@dataclass
class SSEEvent:
    """One server-sent event: its `data:` lines joined with `\\n`, plus `event:` and `id:` if given."""

    data: str
    event: str | None = None
    id: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


def iter_sse_events(stream: Iterable[Any]) -> Iterator[SSEEvent]:
    """Whole SSE events (per the WHATWG rules: blank line ends an event, `:` starts a comment)."""
    data: list[str] = []
    extra: dict[str, str] = {}
    for line in iter_lines(stream):
        if not line:
            if data:
                yield SSEEvent("\n".join(data), extra.get("event"), extra.get("id"), extra)
            data, extra = [], {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            extra[name] = value
    if data:  # a stream that ends without its blank line still delivers its last event
        yield SSEEvent("\n".join(data), extra.get("event"), extra.get("id"), extra)


def iter_sse_json(stream: Iterable[Any]) -> Iterator[Any]:
    """The JSON value of every SSE event, stopping at OpenAI's `[DONE]` sentinel."""
    for event in iter_sse_events(stream):
        if event.data.strip() == "[DONE]":
            return
        yield json.loads(event.data)
