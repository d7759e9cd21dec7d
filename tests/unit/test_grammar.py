"""Grammar compilation: constraint kinds, compact JSON, errors, budgets, the cache and the worker pool."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import llguidance
import pytest

from serve.engine import grammar as grammar_mod
from serve.engine.grammar import (
    Constraint,
    GrammarLimits,
    GrammarTooLarge,
    GrammarTooSlow,
    InvalidGrammar,
    compile_grammar,
)
from serve.engine.grammar_pool import GrammarCompiler
from tests.unit.grammar_helpers import SLOW, byte_tokenizer

WIDE = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(1500)}}


@pytest.fixture(scope="module")
def lltok():
    return byte_tokenizer()


@pytest.fixture
def compiler(lltok):
    c = GrammarCompiler(lltok, workers=2, cache_size=4)
    yield c
    c.close()


def accepts(grammar, text: str) -> bool:
    """True when the grammar takes all of `text` and may end there."""
    m = grammar.new_matcher()
    return m.try_consume_tokens(list(text.encode())) == len(text.encode()) and m.is_accepting()


def test_kinds_compile_and_constrain(lltok):
    schema = compile_grammar(Constraint.json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                                     "required": ["a"], "additionalProperties": False}), lltok)
    assert accepts(schema, '{"a":12}') and not accepts(schema, '{"b":1}') and not accepts(schema, '{"a":"x"}')
    regex = compile_grammar(Constraint.regex(r"\d{3}-[a-z]+"), lltok)
    assert accepts(regex, "123-abc") and not accepts(regex, "12-abc")
    lark = compile_grammar(Constraint.lark('start: "yes" | "no"'), lltok)
    assert accepts(lark, "no") and not accepts(lark, "maybe")
    anything = compile_grammar(Constraint.json_object(), lltok)
    assert accepts(anything, '{"x":[1,{"y":null}]}') and not accepts(anything, "[1]")


def test_json_is_compact_even_if_the_schema_asks_otherwise(lltok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "x-guidance": {"whitespace_flexible": True}}
    g = compile_grammar(Constraint.json_schema(schema), lltok)
    assert accepts(g, '{"a":1}')
    for spaced in ('{"a": 1}', '{ "a":1}', '{"a":1 }', '{"a":1}\n'):
        assert not accepts(g, spaced), spaced


def test_key_order_of_the_schema_is_kept_in_the_constraint():
    c = Constraint.json_schema({"properties": {"zeta": {}, "alpha": {}}, "type": "object"})
    assert c.text.index("zeta") < c.text.index("alpha")
    assert Constraint.json_schema({"b": 1, "a": 2}) != Constraint.json_schema({"a": 2, "b": 1})


@pytest.mark.parametrize("constraint, fragment", [
    (Constraint.regex("(unclosed"), "unclosed group"),
    (Constraint.json_schema({"type": "nonsense"}), "nonsense"),
    (Constraint.json_schema({"type": "object", "required": 3}), "required"),
    (Constraint.json_schema({"$ref": "#/nowhere"}), "nowhere"),
    (Constraint.json_schema({"allOf": [{"type": "string"}, {"type": "integer"}]}), "Unsatisfiable"),
    (Constraint.json_schema([1, 2]), "object"),
    (Constraint.lark("start: undefined_rule"), "undefined_rule"),
])
def test_invalid_constraints_say_what_is_wrong(lltok, constraint, fragment):
    with pytest.raises(InvalidGrammar) as info:
        compile_grammar(constraint, lltok)
    assert fragment in info.value.message
    assert constraint.kind.value in info.value.message
    assert len(info.value.message) < 400  # the message does not echo the whole grammar


def test_size_budget(lltok):
    with pytest.raises(GrammarTooLarge, match="at most 1000 bytes"):
        compile_grammar(Constraint.json_schema(WIDE), lltok, GrammarLimits(max_bytes=1000))
    with pytest.raises(GrammarTooLarge, match="too complex"):
        compile_grammar(Constraint.json_schema(WIDE), lltok, GrammarLimits(max_grammar_size=500))


@pytest.mark.parametrize("constraint", [
    Constraint.regex("a{1000000}"),
    Constraint.json_schema({"type": "string", "pattern": "^a{1000000}$"}),
])
def test_a_grammar_that_fails_on_its_first_token_is_refused_at_compile_time(lltok, constraint):
    """llguidance builds `a{1000000}`'s start state and first mask, then fails deriving the first
    token ("too many expressions constructed"): the compile step walks a few tokens to find it."""
    with pytest.raises(GrammarTooLarge) as info:
        compile_grammar(constraint, lltok)
    assert "too many expressions constructed" in info.value.message
    assert info.value.message.startswith(f"the {constraint.kind.value} is too complex to compile")


def test_an_object_with_too_many_optional_properties_is_refused_at_compile_time(lltok):
    """1500 optional properties compile, then `{` fails (6007 Earley items in a row, llguidance's
    limit is 2000); 400 work; 1500 required ones make a sequence and work too."""
    with pytest.raises(GrammarTooLarge, match="too complex to compile: Parser Error: Current row has 6007 items"):
        compile_grammar(Constraint.json_schema(WIDE), lltok)
    few = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(400)}}
    assert accepts(compile_grammar(Constraint.json_schema(few), lltok), '{"field_399":"x"}')
    assert accepts(compile_grammar(Constraint.json_schema({**WIDE, "required": list(WIDE["properties"])}), lltok),
                   "{" + ",".join(f'"field_{i}":""' for i in range(1500)) + "}")


def test_a_grammar_whose_tokens_cost_too_much_to_constrain_is_refused(lltok):
    """`a{N}` re-derives its whole count at every token: past `max_step_seconds` a token, it would
    stall the batch at each step (a{500000}: ~0.4 s a token on SmolLM2's vocabulary)."""
    with pytest.raises(GrammarTooLarge, match=r"too complex to follow: each token costs about \d+ ms to constrain"):
        compile_grammar(Constraint.regex("a{100000}"), lltok, GrammarLimits(max_step_seconds=0.0001))
    assert compile_grammar(Constraint.regex("a{10}"), lltok, GrammarLimits(max_step_seconds=0.01))


class EosFirstTokenizer:
    """Bytes as ids 1..256 and EOS as id 0, as in tokenizers whose special tokens come first (SmolLM2)."""

    eos_token_id = 0
    bos_token_id = None
    tokens = [b"<eos>"] + [bytes([i]) for i in range(256)]
    special_token_ids = [0]

    def __call__(self, text: bytes | str) -> list[int]:
        return [b + 1 for b in (text if isinstance(text, bytes) else text.encode())]


def test_the_compile_walk_steps_over_an_end_of_sequence_token():
    """A grammar that may end at once (EOS allowed, and here the lowest id) and fails on its first
    real token: the walk must not stop at EOS."""
    lltok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(EosFirstTokenizer()))
    grammar = 'start: "" | obj\nobj: %json ' + json.dumps(WIDE)
    with pytest.raises(GrammarTooLarge, match="Current row has 6007 items"):
        compile_grammar(Constraint.lark(grammar), lltok)
    assert grammar_mod._set_bits(bytes([0, 0b1010, 0, 1]), 8) == [9, 11, 24]
    assert grammar_mod._set_bits(bytes([0, 0b1010, 0, 1]), 1) == [9]


@pytest.mark.parametrize("constraint", [
    Constraint.regex("(a|b){500000}"),
    Constraint.regex("[a-z]{1,100000}"),
    Constraint.json_schema({"type": "array", "items": {"type": "integer"}, "minItems": 1000000}),
    Constraint.json_schema({"type": "string", "minLength": 1000000}),
    Constraint.json_schema({"type": "string", "maxLength": 1000000}),
])
def test_huge_counts_that_llguidance_derives_lazily_still_compile(lltok, constraint):
    """Their steps are cheap (counters, not unrolled expressions): no reason to refuse them."""
    g = compile_grammar(constraint, lltok)
    assert grammar_mod.probe(g.new_matcher(), 50) is None


def test_tgi_2681_schema_compiles_fast(lltok):
    """The schema that made TGI spin forever: a dozen optional array-of-string properties."""
    schema = {"type": "object", "properties": {c: {"type": "array", "items": {"type": "string"}} for c in "abcdefghijkl"}}
    g = compile_grammar(Constraint.json_schema(schema), lltok)
    assert g.seconds < 2.0
    assert accepts(g, '{"c":["x"],"l":[]}') and accepts(g, "{}")


def test_cache_compiles_each_constraint_once(compiler):
    c = Constraint.regex("[0-9]{4}")
    first, second = compiler.compile(c), compiler.compile(c)
    assert first is second
    assert (compiler.misses, compiler.hits) == (1, 1)


def test_cache_is_lru_bounded(compiler):
    texts = [f"[a-z]{{{i}}}" for i in range(1, 7)]
    grammars = {t: compiler.compile(Constraint.regex(t)) for t in texts}
    assert compiler.compile(Constraint.regex(texts[-1])) is grammars[texts[-1]]  # recent: cached
    assert compiler.compile(Constraint.regex(texts[0])) is not grammars[texts[0]]  # evicted: compiled again
    assert len(compiler._cache) <= compiler.cache_size


def test_failures_are_cached_and_raised_fresh(compiler):
    bad = Constraint.regex("(")
    errors = []
    for _ in range(2):
        with pytest.raises(InvalidGrammar) as info:
            compiler.compile(bad)
        errors.append(info.value)
    assert errors[0] is not errors[1] and errors[0].message == errors[1].message
    assert compiler.misses == 1


def test_compilation_runs_on_a_worker_thread_and_poll_never_blocks(compiler, monkeypatch):
    threads = []
    real = grammar_mod.compile_grammar

    def slow(constraint, tokenizer, limits):
        threads.append(threading.get_ident())
        time.sleep(0.3)
        return real(constraint, tokenizer, limits)

    monkeypatch.setattr("serve.engine.grammar_pool.compile_grammar", slow)
    pending = compiler.submit(Constraint.regex("a+"))
    started = time.monotonic()
    assert pending.poll() is None  # the engine's call: answers at once while compiling
    assert time.monotonic() - started < 0.05
    again = compiler.submit(Constraint.regex("a+"))  # in flight: joins the same compilation
    assert pending.wait() is again.wait()
    assert threads and threads[0] != threading.get_ident() and len(threads) == 1


def test_time_budget_answers_too_slow_but_the_cache_still_fills(lltok):
    compiler = GrammarCompiler(lltok, GrammarLimits(compile_timeout=0.01), workers=1)
    try:
        pending = compiler.submit(SLOW)
        with pytest.raises(GrammarTooSlow, match="did not compile within 0.01 s"):
            pending.wait()
        with pytest.raises(GrammarTooSlow):
            pending.poll()  # past its deadline, the engine gets the same answer
        deadline = time.monotonic() + 60
        while not pending._compilation.done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert compiler.submit(SLOW).poll() is not None  # compiled meanwhile
    finally:
        compiler.close()


def test_a_greenlet_waiting_for_a_grammar_does_not_freeze_the_hub():
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "tests.unit.grammar_wait_probe"], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["compiled"], result
    assert result["seconds"] > 0.2, result  # the compile took a while...
    assert result["ticks"] >= 10, result  # ...and the hub kept running other greenlets meanwhile


def test_on_done_wakes_a_sleeping_engine_and_a_closed_compiler_refuses(lltok):
    compiler = GrammarCompiler(lltok, workers=1)
    woken = threading.Event()
    pending = compiler.submit(SLOW)
    pending.on_done(woken.set)
    assert woken.wait(60) and pending.poll() is not None
    late = threading.Event()
    pending.on_done(late.set)  # already done: called at once
    assert late.is_set()
    compiler.close()
    with pytest.raises(RuntimeError, match="closed"):
        compiler.submit(Constraint.regex("x"))


def test_a_compile_nobody_waits_for_any_more_is_skipped(lltok, monkeypatch):
    calls = []
    real = grammar_mod.compile_grammar

    def counted(constraint, tokenizer, limits):
        calls.append(constraint)
        if constraint.kind.value == "json_schema":
            time.sleep(0.5)  # keeps the only worker busy
        return real(constraint, tokenizer, limits)

    monkeypatch.setattr("serve.engine.grammar_pool.compile_grammar", counted)
    compiler = GrammarCompiler(lltok, GrammarLimits(compile_timeout=0.1), workers=1)
    try:
        busy = compiler.submit(Constraint.json_object())
        queued = compiler.submit(Constraint.regex("q+"))
        with pytest.raises(GrammarTooSlow):
            queued.wait()
        with pytest.raises(GrammarTooSlow):
            busy.wait()
        deadline = time.monotonic() + 30
        while not queued._compilation.done and time.monotonic() < deadline:
            time.sleep(0.02)
        assert calls == [Constraint.json_object()]  # the queued regex was dropped, not compiled
        assert compiler.submit(Constraint.regex("q+")).wait() is not None  # asked again: compiled now
    finally:
        compiler.close()
