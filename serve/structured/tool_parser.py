"""Generated text -> OpenAI `tool_calls`, whole (`parse_tool_calls`) or streamed (`ToolCallStream`).

The text follows the format of tools.py (`<tool_call>{"name":...,"arguments":{...}}</tool_call>`,
calls separated by newlines), or is free text that does not open with the tag (under `auto`). The
stream turns text deltas, as the detokenizer hands them out, into the deltas OpenAI streams:

    {"content": "..."}                                             free text
    {"tool_calls": [{"index": 0, "id": "call_...", "type": "function",
                     "function": {"name": "get_weather", "arguments": ""}}]}   a call starts
    {"tool_calls": [{"index": 0, "function": {"arguments": "{\\"city\\":"}}]}      its arguments

Text is held back only while it could still be the opening tag, or the end of a call's tail.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from serve.protocol.structured import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta
from serve.structured.tools import CLOSE_TAG, OPEN_TAG

BLANKS = " \t\r\n"
_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_TAIL = re.compile(r"\s*\}\s*" + re.escape(CLOSE_TAG))


def new_call_id() -> str:
    """An OpenAI-style call id: `call_` and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


class _State(enum.Enum):
    START = "start"  # nothing decided yet: text or a call?
    TEXT = "text"  # free text: everything is content
    OPEN = "open"  # inside <tool_call>, before the JSON
    HEAD = "head"  # reading {"name":"...","arguments":
    ARGS = "args"  # reading the arguments object
    TAIL = "tail"  # reading }</tool_call>
    BETWEEN = "between"  # after a call: another one, or the end


class ToolCallStream:
    """Incremental parser of one choice's text; `feed` deltas, then `finish`."""

    def __init__(self, new_id: Callable[[], str] = new_call_id):
        self._new_id = new_id
        self._state = _State.START
        self._buf = ""  # received, not consumed
        self._depth = 0
        self._in_string = self._escaped = False
        self.calls: list[dict[str, str]] = []  # {"id", "name", "arguments"}
        self.content = ""  # free text, when the answer is not calls

    @property
    def is_calls(self) -> bool:
        """True once the answer is known to be tool calls."""
        return self._state not in (_State.START, _State.TEXT)

    @property
    def complete(self) -> bool:
        """True when every call started has also ended."""
        return self._state is _State.BETWEEN

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Take one text delta; return the OpenAI deltas it completes."""
        self._buf += text
        out: list[dict[str, Any]] = []
        while self._buf and self._step(out):
            pass
        return _merge(out)

    def finish(self) -> list[dict[str, Any]]:
        """The text ended: what is still held back is content if no call was started."""
        out: list[dict[str, Any]] = []
        if self._state is _State.START and self._buf:
            self._state = _State.TEXT
            self._content(self._buf, out)
            self._buf = ""
        return out

    def tool_calls(self) -> list[ToolCall] | None:
        """The finished calls, or None when the answer is free text or a call was cut short."""
        if not self.complete:
            return None
        return [ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                for c in self.calls]

    # -- one parsing step: consume what can be consumed, False when more text is needed -------------
    def _step(self, out: list[dict[str, Any]]) -> bool:
        handler = {
            _State.START: self._start, _State.TEXT: self._text, _State.OPEN: self._open,
            _State.HEAD: self._head, _State.ARGS: self._args, _State.TAIL: self._tail,
            _State.BETWEEN: self._between,
        }[self._state]
        return handler(out)

    def _take_open_tag(self) -> bool:
        """Consume blanks and the opening tag when the buffer starts with them."""
        rest = self._buf.lstrip(BLANKS)
        if not rest.startswith(OPEN_TAG):
            return False
        self._buf = rest[len(OPEN_TAG):]
        self._state = _State.OPEN
        return True

    def _start(self, out: list[dict[str, Any]]) -> bool:
        if self._take_open_tag():
            return True
        if OPEN_TAG.startswith(self._buf.lstrip(BLANKS)):
            return False  # blanks, or a beginning of the tag: wait
        self._state = _State.TEXT
        return True

    def _text(self, out: list[dict[str, Any]]) -> bool:
        self._content(self._buf, out)
        self._buf = ""
        return False

    def _content(self, text: str, out: list[dict[str, Any]]) -> None:
        self.content += text
        out.append({"content": text})

    def _open(self, out: list[dict[str, Any]]) -> bool:
        if self._buf.startswith("\n"):
            self._buf = self._buf[1:]
        self._state = _State.HEAD
        return True

    def _head(self, out: list[dict[str, Any]]) -> bool:
        match = _HEAD.match(self._buf)
        if match is None:
            return False
        call = {"id": self._new_id(), "name": json.loads(match.group(1)), "arguments": ""}
        self.calls.append(call)
        index = len(self.calls) - 1
        delta = ToolCallDelta(index=index, id=call["id"], type="function",
                              function=FunctionCallDelta(name=call["name"], arguments=""))
        out.append({"tool_calls": [delta.wire()]})
        self._buf = self._buf[match.end():]
        self._state, self._depth, self._in_string, self._escaped = _State.ARGS, 0, False, False
        return True

    def _args(self, out: list[dict[str, Any]]) -> bool:
        end = self._scan(self._buf)
        piece = self._buf if end is None else self._buf[:end]
        if piece:
            self.calls[-1]["arguments"] += piece
            index = len(self.calls) - 1
            out.append({"tool_calls": [ToolCallDelta(index=index, function=FunctionCallDelta(arguments=piece)).wire()]})
        self._buf = "" if end is None else self._buf[end:]
        if end is not None:
            self._state = _State.TAIL
        return end is not None

    def _scan(self, text: str) -> int | None:
        """Where the arguments object ends in `text` (exclusive), None if not in it yet."""
        for i, ch in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None

    def _tail(self, out: list[dict[str, Any]]) -> bool:
        match = _TAIL.match(self._buf)
        if match is None:
            return False
        self._buf = self._buf[match.end():]
        self._state = _State.BETWEEN
        return True

    def _between(self, out: list[dict[str, Any]]) -> bool:
        # Blanks or part of a tag wait; anything else after the calls is not part of them.
        return self._take_open_tag()


def _merge(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join consecutive content deltas, and consecutive argument fragments of one call."""
    out: list[dict[str, Any]] = []
    for d in deltas:
        prev = out[-1] if out else None
        if prev is not None and "content" in d and "content" in prev:
            prev["content"] += d["content"]
            continue
        if prev is not None and _fragment_of(prev) is not None and _fragment_of(d) == _fragment_of(prev):
            prev["tool_calls"][0]["function"]["arguments"] += d["tool_calls"][0]["function"]["arguments"]
            continue
        out.append(d)
    return out


def _fragment_of(delta: dict[str, Any]) -> int | None:
    """The call index of an arguments-only delta, else None."""
    calls = delta.get("tool_calls")
    if not calls or "id" in calls[0]:
        return None
    return calls[0]["index"]


def parse_tool_calls(text: str, new_id: Callable[[], str] = new_call_id) -> list[ToolCall] | None:
    """The calls of a whole answer; None when it is free text or its last call was cut short."""
    stream = ToolCallStream(new_id)
    stream.feed(text)
    stream.finish()
    return stream.tool_calls()
