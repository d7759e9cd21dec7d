"""Tool-call parsing: whole answers, and streams split anywhere give the same calls as OpenAI deltas."""

from __future__ import annotations

import itertools
import json

import pytest

from serve.structured.tool_parser import ToolCallStream, parse_tool_calls

CALLS = [
    '<tool_call>{"name":"get_weather","arguments":{"city":"Pa\\"ris {x}","unit":"c"}}</tool_call>',
    '<tool_call>\n{"name":"search","arguments":{"query":"a]b","limit":2}}\n</tool_call>\n'
    '<tool_call>{"name":"get_weather","arguments":{}}</tool_call>',
    ' \n<tool_call>{"name":"search","arguments":{"query":"\\\\","nested":{"a":[1,{"b":"}"}]}}}</tool_call>',
    '<tool_call>{"name":"get_weather","arguments":{"city":"Zürich 東京 🌧"}}</tool_call>',
]
TEXTS = ["Hello <tool_call> world", "<tools are fun", "", "   ", "Sure: {\"a\": 1}", "<tool_c"]
CUT = '<tool_call>{"name":"search","arguments":{"query":"ab'


def expected_calls(text: str) -> list[tuple[str, str]]:
    """An independent reading of the format: (name, raw arguments) per call."""
    out = []
    for block in text.split("</tool_call>")[:-1]:
        body = block.split("<tool_call>", 1)[1].strip("\n")
        head = body[: body.index('"arguments":') + len('"arguments":')]
        name = json.loads(head[:-len(',"arguments":')] + "}")["name"]
        out.append((name, body[len(head):-1]))
    return out


def ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def replay(pieces: list[str]) -> tuple[str, list[dict], list[dict]]:
    """Feed pieces; return (content, calls rebuilt from the deltas, every tool delta)."""
    stream = ToolCallStream(ids())
    deltas = [d for p in pieces for d in stream.feed(p)] + stream.finish()
    content = "".join(d["content"] for d in deltas if "content" in d)
    tool_deltas = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    calls: list[dict] = []
    for d in tool_deltas:
        if "id" in d:
            assert d == {"index": len(calls), "id": d["id"], "type": "function",
                         "function": {"name": d["function"]["name"], "arguments": ""}}
            calls.append({"id": d["id"], "name": d["function"]["name"], "arguments": ""})
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            assert d["index"] == len(calls) - 1 and d["function"]["arguments"]
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    return content, calls, tool_deltas


def splits(text: str):
    """Every way to cut `text` in two, and every character alone."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


@pytest.mark.parametrize("text", CALLS)
def test_whole_answers_parse_into_openai_calls(text):
    calls = parse_tool_calls(text, ids())
    assert [(c.function.name, c.function.arguments) for c in calls] == expected_calls(text)
    assert [c.id for c in calls] == [f"call_{i}" for i in range(len(calls))]
    for c in calls:
        assert c.type == "function" and isinstance(json.loads(c.function.arguments), dict)
    assert calls[0].model_dump() == {"id": "call_0", "type": "function",
                                     "function": {"name": calls[0].function.name, "arguments": calls[0].function.arguments}}


@pytest.mark.parametrize("text", CALLS)
def test_streams_split_anywhere_give_the_same_calls(text):
    for pieces in splits(text):
        content, calls, _ = replay(pieces)
        assert content == ""
        assert [(c["name"], c["arguments"]) for c in calls] == expected_calls(text), pieces
        assert [c["id"] for c in calls] == [f"call_{i}" for i in range(len(calls))]


def test_streams_split_at_token_boundaries(tokenizer):
    for text in CALLS + TEXTS:
        token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces, prev = [], ""
        for k in range(1, len(token_ids) + 1):
            now = tokenizer.decode(token_ids[:k])
            if not now.endswith("\ufffd"):  # as the detokenizer: never half a character
                pieces.append(now[len(prev):])
                prev = now
        assert "".join(pieces) == text
        content, calls, _ = replay(pieces)
        assert [(c["name"], c["arguments"]) for c in calls] == expected_calls(text)
        assert content == ("" if text in CALLS else text)


@pytest.mark.parametrize("text", TEXTS)
def test_free_text_is_content_whole_and_streamed(text):
    assert parse_tool_calls(text) is None
    for pieces in splits(text):
        content, calls, _ = replay(pieces)
        assert content == text and calls == []


def test_text_is_held_back_only_while_it_may_open_a_call():
    stream = ToolCallStream(ids())
    assert stream.feed("  <tool") == []  # may still become a call
    assert stream.feed("s") == [{"content": "  <tools"}]  # cannot: all of it is content now
    assert stream.feed(" rock") == [{"content": " rock"}]


def test_first_delta_names_the_call_then_arguments_follow():
    stream = ToolCallStream(ids())
    assert stream.feed('<tool_call>{"name":"get_weather","argu') == []
    assert stream.feed('ments":{"ci') == [
        {"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                         "function": {"name": "get_weather", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]},
    ]
    assert stream.feed('ty":"Paris"}}</tool_call>') == [{"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Paris"}'}}]}]
    assert stream.complete and stream.finish() == []


def test_a_call_cut_short_is_not_a_call():
    assert parse_tool_calls(CUT) is None
    content, calls, _ = replay([CUT])
    assert content == "" and calls[0]["name"] == "search"  # what was streamed stays streamed
