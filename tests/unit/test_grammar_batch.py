"""Batched grammar masks on a tiny random Llama: every answer parses, validates and ends by its grammar.

The model is random, so it has no idea of JSON: whatever it produces is the mask's doing. Schemas
keep strings and arrays bounded so that a random model finishes them in a few dozen tokens (an
unbounded string is still valid at every step, but a random model may never choose to close it).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from serve.engine.grammar import Constraint
from serve.engine.grammar_batch import GrammarRows, grammar_executor
from serve.engine.grammar_pool import GrammarCompiler
from serve.protocol.structured import StructuredFields
from serve.structured.tool_parser import parse_tool_calls
from serve.structured.tools import plan_tools
from tests.unit.grammar_helpers import decode

EOS = 2
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "address"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "status": {"enum": ["new", "paid", "shipped"]},
        "note": {"type": ["string", "null"], "maxLength": 10},
    },
    "required": ["id", "items", "status"],
    "additionalProperties": False,
}
SEGMENT = {  # as pydantic writes models: $defs and $ref, anyOf with null
    "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                         "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                        "required": ["x", "y"], "additionalProperties": False}},
    "type": "object",
    "properties": {"start": {"$ref": "#/$defs/Point"}, "end": {"$ref": "#/$defs/Point"},
                   "label": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]}},
    "required": ["start", "end"],
    "additionalProperties": False,
}
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)", r"[A-Z][a-z]{2,8} [A-Z][a-z]{2,8}",
           r"(0|[1-9][0-9]{0,2})\.[0-9]{2}", r"[a-z]{3,8}@[a-z]{3,6}\.(com|org)"]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 12},
                                         "limit": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["query", "limit"], "additionalProperties": False}}},
]
SAMPLING = [(0.0, [0]), (0.7, [1, 2]), (1.0, [3, 4]), (1.2, [5, 6])]


@pytest.fixture(scope="module")
def compiler(tokenizer):
    c = GrammarCompiler.for_tokenizer(tokenizer, {EOS})
    yield c
    c.close()


@pytest.fixture(scope="module")
def executor():
    return grammar_executor(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model is faster on one thread, much faster on a machine shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blanks_outside_strings(text: str) -> bool:
    """True if JSON `text` has whitespace between tokens (compact JSON has none)."""
    in_string = escaped = False
    for ch in text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in " \t\r\n":
            return True
    return False


def rows_for(compiler, executor, tokenizer, constraints, vocab=None):
    matchers = [None if c is None else compiler.compile(c).new_matcher() for c in constraints]
    return GrammarRows(matchers, vocab or len(tokenizer), len(tokenizer), executor)


def run(model, compiler, executor, tokenizer, constraint, copies=2, **kw):
    """Decode under `constraint` greedy and sampled (several seeds and temperatures): the texts."""
    texts = []
    for temperature, seeds in SAMPLING:
        rows = rows_for(compiler, executor, tokenizer, [constraint] * len(seeds) * (1 if temperature == 0 else copies))
        all_seeds = [s * 100 + k for s in seeds for k in range(len(rows) // len(seeds))]
        for out in decode(model, rows, temperature=temperature, seeds=all_seeds, **kw):
            assert out.reason in ("grammar", "eos"), (out.reason, tokenizer.decode(out.ids))
            texts.append(tokenizer.decode(out.ids))
    return texts


@pytest.mark.parametrize("schema", [PERSON, ORDER, SEGMENT], ids=["person", "order", "refs"])
def test_json_schema_answers_validate(model, compiler, executor, tokenizer, schema):
    for text in run(model, compiler, executor, tokenizer, Constraint.json_schema(schema)):
        jsonschema.validate(json.loads(text), schema)
        assert not blanks_outside_strings(text), text


def test_json_object_answers_are_compact_objects(model, compiler, executor, tokenizer):
    # A random model rarely closes an unconstrained string; a logit bias on closing tokens (applied
    # after the mask, as `logit_bias` is) makes it finish, and cannot break validity.
    closers = {i: 12.0 for i in range(len(tokenizer)) if tokenizer.decode([i]) in ('"', "}", '"}', '",', "]")}
    for text in run(model, compiler, executor, tokenizer, Constraint.json_object(), copies=1, bias=closers):
        assert isinstance(json.loads(text), dict)
        assert not blanks_outside_strings(text), text


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_answers_fullmatch(model, compiler, executor, tokenizer, pattern):
    for text in run(model, compiler, executor, tokenizer, Constraint.regex(pattern), copies=1):
        assert re.fullmatch(pattern, text), (pattern, text)


@pytest.mark.parametrize("choice, parallel", [("required", True), ("required", False), ("search", True)])
def test_tool_calls_parse_into_openai_calls(model, compiler, executor, tokenizer, choice, parallel):
    fields = StructuredFields.model_validate({"tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": parallel})
    plan = plan_tools(fields.tools, fields.tool_choice, fields.parallel_tool_calls)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for text in run(model, compiler, executor, tokenizer, plan.constraint, copies=1, max_new=240):
        calls = parse_tool_calls(text)
        assert calls, text
        assert len(calls) == 1 or plan.parallel
        for call in calls:
            assert call.id.startswith("call_") and call.type == "function"
            assert choice == "required" or call.function.name == choice
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("opening, is_call", [("<tool_call>", True), ("Hello", False), (" <to", False)])
def test_auto_lets_the_opening_tokens_choose_text_or_a_call(model, compiler, executor, tokenizer, opening, is_call):
    """One generation: once the opening is taken (as if sampled), the rest follows that branch."""
    plan = plan_tools(StructuredFields.model_validate({"tools": TOOLS}).tools, None)
    rows = rows_for(compiler, executor, tokenizer, [plan.constraint])
    prefix = tokenizer(opening, add_special_tokens=False)["input_ids"]
    for token in prefix:
        assert rows.advance([token]).failed == {}
    (out,) = decode(model, rows, prompt=(1, 17, 42, 99, *prefix), max_new=240 if is_call else 12)
    text = tokenizer.decode(prefix + out.ids)
    calls = parse_tool_calls(text)
    if is_call:
        assert out.reason in ("grammar", "eos") and calls, text
    else:
        assert calls is None and text.startswith(opening)


def test_fork_mid_answer_keeps_the_prefix_and_diverges(compiler, executor, tokenizer):
    a, b, c, x, y = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in "abcxy")
    rows = rows_for(compiler, executor, tokenizer, [Constraint.regex("a(bx|cy)"), None])
    assert rows.advance([a, 5]).failed == {}
    rows.repeat([2, 1])  # row 0 forks in state "a"; the free row stays one row
    assert len(rows) == 3 and rows.matchers[2] is None and rows.constrained == [0, 1]
    assert rows.advance([b, c, 7]).failed == {}
    scores, _ = rows.mask(torch.zeros(3, len(tokenizer)))
    assert torch.isfinite(scores[0, x]) and torch.isneginf(scores[0, y])  # "ab" -> x
    assert torch.isfinite(scores[1, y]) and torch.isneginf(scores[1, x])  # "ac" -> y
    assert torch.isfinite(scores[2]).all()


def test_free_rows_cost_nothing(tokenizer):
    class NoExecutor:
        def unsafe_compute_mask_ptr(self, *args):
            raise AssertionError("no mask work without a constrained row")

    rows = GrammarRows([None, None], 64, 64, NoExecutor())
    logits = torch.randn(2, 64)
    scores, failed = rows.mask(logits)
    assert scores is logits and failed == {} and not rows.active
    assert rows.advance([1, 2]).completed == []


def test_padding_ids_are_never_allowed_and_free_rows_are_untouched(compiler, executor, tokenizer):
    vocab = len(tokenizer) + 64  # lm_head padded past the tokenizer, as many checkpoints are
    rows = rows_for(compiler, executor, tokenizer, [Constraint.regex("[a-z]+"), None], vocab=vocab)
    logits = torch.randn(2, vocab)
    scores, failed = rows.mask(logits)
    assert failed == {}
    assert torch.isneginf(scores[0, len(tokenizer):]).all()
    assert torch.equal(scores[1], logits[1])
    assert torch.isneginf(scores[0, EOS])  # nothing generated yet: the grammar cannot end here


def test_eos_only_where_the_grammar_accepts(compiler, executor, tokenizer):
    rows = rows_for(compiler, executor, tokenizer, [Constraint.regex("[a-z]{2,3}")])
    a = tokenizer("a", add_special_tokens=False)["input_ids"][0]
    eos_allowed = []
    for _ in range(3):
        scores, _ = rows.mask(torch.zeros(1, len(tokenizer)))
        eos_allowed.append(bool(torch.isfinite(scores[0, EOS])))
        step = rows.advance([a])
    assert eos_allowed == [False, False, True]
    assert step.completed == [0]  # "aaa": no longer extendable, the row finishes


def test_a_failing_matcher_fails_its_row_only(compiler, executor, tokenizer):
    rows = rows_for(compiler, executor, tokenizer, [Constraint.regex("[0-9]+"), Constraint.regex("[0-9]+")])
    x, one = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("x", "1"))
    step = rows.advance([x, one])  # row 0 takes a token its grammar forbids
    assert list(step.failed) == [0] and step.failed[0]
    scores, failed = rows.mask(torch.zeros(2, len(tokenizer)))
    assert list(failed) == [0]
    assert torch.isfinite(scores[0]).all()  # left finite: the caller fails that request
    assert torch.isneginf(scores[1, x]) and torch.isfinite(scores[1, one])


def test_select_and_extend_follow_the_rows(compiler, executor, tokenizer):
    digits, letters = Constraint.regex("[0-9]+"), Constraint.regex("[a-z]+")
    rows = rows_for(compiler, executor, tokenizer, [digits, None, letters])
    rows.select([2, 1])
    rows.extend(rows_for(compiler, executor, tokenizer, [digits]))
    assert rows.constrained == [0, 2]
    x, one = (tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in ("x", "1"))
    scores, _ = rows.mask(torch.zeros(3, len(tokenizer)))
    assert torch.isfinite(scores[0, x]) and torch.isneginf(scores[0, one])  # letters
    assert torch.isfinite(scores[1]).all()  # free
    assert torch.isneginf(scores[2, x]) and torch.isfinite(scores[2, one])  # digits
