"""Structured-output request semantics: response_format, grammar, tools -> constraints, plans and 422s."""

from __future__ import annotations

import json

import pytest

from serve.engine.grammar import Constraint, GrammarKind, compile_grammar
from serve.protocol.structured import GrammarParam, ResponseFormat, StructuredFields
from serve.structured import StructuredRequestError
from serve.structured.constraints import grammar_constraint, response_format_constraint
from serve.structured.tools import ToolMode, plan_tools
from tests.unit.grammar_helpers import byte_tokenizer

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {"name": "search", "arguments": {  # TGI's spelling of `parameters`
    "$defs": {"Q": {"type": "string", "maxLength": 5}},
    "type": "object", "properties": {"q": {"$ref": "#/$defs/Q"}}, "required": ["q"], "additionalProperties": False}}}
NO_ARGS = {"type": "function", "function": {"name": "now"}}


@pytest.mark.parametrize("fmt, expected", [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, Constraint.json_object()),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}, Constraint.json_schema(SCHEMA)),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, Constraint.json_object()),
    ({"type": "json", "value": SCHEMA}, Constraint.json_schema(SCHEMA)),
    ({"type": "json", "value": json.dumps(SCHEMA)}, Constraint.json_schema(SCHEMA)),
    ({"type": "json_object", "value": SCHEMA}, Constraint.json_schema(SCHEMA)),
    ({"type": "json_schema", "value": {"name": "x", "schema": SCHEMA}}, Constraint.json_schema(SCHEMA)),
    ({"type": "json_schema", "value": SCHEMA}, Constraint.json_schema(SCHEMA)),
    ({"type": "json_schema", "value": json.dumps({"name": "x", "schema": SCHEMA})}, Constraint.json_schema(SCHEMA)),
    ({"type": "regex", "value": "[0-9]+"}, Constraint.regex("[0-9]+")),
])
def test_response_format_dialects_map_to_one_constraint(fmt, expected):
    parsed = None if fmt is None else ResponseFormat.model_validate(fmt)
    assert response_format_constraint(parsed) == expected


@pytest.mark.parametrize("fmt, field, fragment", [
    ({"type": "xml"}, "response_format.type", "must be one of"),
    ({"type": "json_schema"}, "response_format.json_schema", "is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema",
     "JSON Schema object"),
    ({"type": "json", "value": "{not json"}, "response_format.value", "not valid JSON"),
    ({"type": "json", "value": 3}, "response_format.value", "JSON Schema object"),
    ({"type": "json"}, "response_format.value", "must hold a JSON Schema"),
    ({"type": "regex", "value": ""}, "response_format.value", "regular expression"),
    ({"type": "regex", "value": {"a": 1}}, "response_format.value", "regular expression"),
])
def test_response_format_errors_name_the_field(fmt, field, fragment):
    with pytest.raises(StructuredRequestError) as info:
        response_format_constraint(ResponseFormat.model_validate(fmt))
    assert info.value.field == field and fragment in info.value.message


def test_generate_grammar():
    assert grammar_constraint(None) is None
    assert grammar_constraint(GrammarParam(type="json", value=SCHEMA)) == Constraint.json_schema(SCHEMA)
    assert grammar_constraint(GrammarParam(type="regex", value="a|b")) == Constraint.regex("a|b")
    with pytest.raises(StructuredRequestError) as info:
        grammar_constraint(GrammarParam(type="text", value="x"))
    assert info.value.field == "parameters.grammar.type"


def plan(body):
    f = StructuredFields.model_validate(body)
    return plan_tools(f.tools, f.tool_choice, f.parallel_tool_calls, f.response_format)


@pytest.mark.parametrize("body, mode, names, parallel, reason", [
    ({"tools": [WEATHER, SEARCH]}, ToolMode.AUTO, ["get_weather", "search"], True, "tool_calls"),
    ({"tools": [WEATHER], "tool_choice": "auto", "parallel_tool_calls": False}, ToolMode.AUTO, ["get_weather"], False,
     "tool_calls"),
    ({"tools": [WEATHER, SEARCH], "tool_choice": "required"}, ToolMode.REQUIRED, ["get_weather", "search"], True,
     "tool_calls"),
    ({"tools": [WEATHER, SEARCH], "tool_choice": {"type": "function", "function": {"name": "search"}}},
     ToolMode.NAMED, ["search"], False, "stop"),
    ({"tools": [WEATHER, SEARCH], "tool_choice": "search"}, ToolMode.NAMED, ["search"], False, "stop"),  # TGI
    ({"tools": [WEATHER], "response_format": {"type": "text"}}, ToolMode.AUTO, ["get_weather"], True, "tool_calls"),
])
def test_tool_plans(body, mode, names, parallel, reason):
    p = plan(body)
    assert p.mode is mode and [t.function.name for t in p.tools] == names
    assert p.parallel is parallel and p.finish_reason == reason
    assert p.constraint.kind is GrammarKind.LARK


@pytest.mark.parametrize("body", [{}, {"tools": []}, {"tools": [WEATHER], "tool_choice": "none"},
                                  {"tool_choice": "auto"}, {"tool_choice": "none"},
                                  {"tools": [WEATHER], "tool_choice": "none", "response_format": {"type": "json_object"}}])
def test_no_tool_in_play(body):
    assert plan(body) is None


@pytest.mark.parametrize("body, field, fragment", [
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "cannot be used together"),
    ({"tools": [WEATHER], "tool_choice": "search"}, "tool_choice", "not in `tools`"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not in `tools`"),
    ({"tools": [WEATHER], "tool_choice": {"type": "retrieval", "function": {"name": "get_weather"}}},
     "tool_choice.type", "must be `function`"),
    ({"tool_choice": "required"}, "tool_choice", "needs `tools`"),
    ({"tools": [{"type": "code_interpreter", "function": {"name": "x"}}]}, "tools[0].type", "must be `function`"),
    ({"tools": [WEATHER, {"type": "function", "function": {"name": "bad name!"}}]}, "tools[1].function.name", "letters"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name", "two tools"),
])
def test_tool_errors_name_the_field(body, field, fragment):
    with pytest.raises(StructuredRequestError) as info:
        plan(body)
    assert info.value.field == field and fragment in info.value.message


@pytest.fixture(scope="module")
def lltok():
    return byte_tokenizer()


def accepts(lltok, constraint: Constraint, text: str) -> bool:
    m = compile_grammar(constraint, lltok).new_matcher()
    return m.try_consume_tokens(list(text.encode())) == len(text.encode()) and m.is_accepting()


def call(name: str, args: str) -> str:
    return f'<tool_call>{{"name":"{name}","arguments":{args}}}</tool_call>'


def test_auto_grammar_takes_text_or_calls(lltok):
    c = plan({"tools": [WEATHER, SEARCH]}).constraint
    for ok in ("Hello there", "", "I will not <tool_call> anything", call("get_weather", '{"city":"Paris"}'),
               call("search", '{"q":"abc"}') + "\n" + call("get_weather", '{"city":"X"}'),
               '<tool_call>\n{"name":"search","arguments":{"q":"a"}}\n</tool_call>'):
        assert accepts(lltok, c, ok), ok
    for bad in (" " + call("search", '{"q":"abc"}'), "\n<tool_call>", call("search", '{"q":"abcdef"}'),
                call("search", '{"q": "a"}'), call("get_weather", '{"town":"Paris"}'), call("nope", "{}")):
        assert not accepts(lltok, c, bad), bad


def test_required_named_and_single_call_grammars(lltok):
    required = plan({"tools": [WEATHER, SEARCH], "tool_choice": "required"}).constraint
    assert not accepts(lltok, required, "Hello") and accepts(lltok, required, call("search", '{"q":"a"}'))
    single = plan({"tools": [WEATHER, SEARCH], "tool_choice": "required", "parallel_tool_calls": False}).constraint
    two = call("search", '{"q":"a"}') + "\n" + call("search", '{"q":"b"}')
    assert accepts(lltok, required, two) and not accepts(lltok, single, two)
    named = plan({"tools": [WEATHER, SEARCH], "tool_choice": "search"}).constraint
    assert accepts(lltok, named, call("search", '{"q":"a"}'))
    assert not accepts(lltok, named, call("get_weather", '{"city":"a"}'))
    no_args = plan({"tools": [NO_ARGS], "tool_choice": "now"}).constraint
    assert accepts(lltok, no_args, call("now", "{}")) and not accepts(lltok, no_args, call("now", '{"x":1}'))


def test_parallel_calls_are_bounded(lltok):
    c = plan({"tools": [NO_ARGS], "tool_choice": "required"}).constraint
    assert accepts(lltok, c, "\n".join([call("now", "{}")] * 8))
    assert not accepts(lltok, c, "\n".join([call("now", "{}")] * 9))
