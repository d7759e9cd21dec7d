"""Grammars in the engine: constrained and free rows in one batch, every answer valid, failures alone.

A tiny random Llama knows nothing of JSON, so every valid answer here is the mask's doing. Most
tests drive the engine's steps by hand (no loop thread), so that which rows share a step is exact.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time

import jsonschema
import pytest
import torch

from serve.engine import grammar_pool
from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.engine.grammar import Constraint, GrammarLimits
from serve.engine.grammar_pool import GrammarCompiler
from serve.engine.request import EngineError, FinishReason, GenerationRequest, GrammarRejected, SamplingParams
from tests.unit.conftest import forced
from tests.unit.test_grammar_batch import ORDER, PERSON, REGEXES, SEGMENT, one_torch_thread  # noqa: F401 (autouse)

PROMPT = [1, 17, 42, 99]
SCHEMAS = [PERSON, ORDER, SEGMENT]
SAMPLED = [{}, {"temperature": 0.7, "seed": 1}, {"temperature": 1.2, "seed": 2, "top_p": 0.95}]


@pytest.fixture(scope="module")
def compiler(tokenizer):
    c = GrammarCompiler.for_tokenizer(tokenizer, {2})
    yield c
    c.close()


def make_engine(model, tokenizer, compiler) -> Engine:
    return Engine(model, tokenizer, EngineConfig.from_model(model, max_batch_total_tokens=200_000), compiler)


@pytest.fixture
def stepped(model, tokenizer, compiler):
    """An engine without its loop thread: the test calls `step()` (see `drive`)."""
    engine = make_engine(model, tokenizer, compiler)
    engine.healthy = True  # what `start()` sets, minus the thread
    return engine


@pytest.fixture
def running(stepped):
    stepped.start()
    yield stepped
    stepped.shutdown()


def params(constraint: Constraint | None, max_new_tokens: int = 160, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, grammar=constraint, **kw)


def drive(engine: Engine, timeout: float = 60.0) -> None:
    """Step until no request is left (grammars compile on their own threads meanwhile)."""
    deadline = time.monotonic() + timeout
    with torch.inference_mode():
        while engine.active_requests:
            assert time.monotonic() < deadline, "requests still active"
            engine._step_and_check()  # one iteration of the loop thread, with its health accounting
            if not engine.batch_size:
                time.sleep(0.005)  # only compiles pending



def outputs(handle) -> list[tuple[str, FinishReason, list[int]]]:
    """(text, finish reason, token ids) per sequence, in sequence order."""
    ids: dict[int, list[int]] = {}
    done = {}
    for event in handle:
        ids.setdefault(event.seq_index, []).append(event.token.id)
        if event.finish is not None:
            done[event.seq_index] = (event.finish.text, event.finish.reason, ids[event.seq_index])
    return [done[k] for k in sorted(done)]


def test_mixed_batch_every_constrained_answer_validates(stepped, compiler):
    cases = [(Constraint.json_schema(s), s, kw) for s in SCHEMAS for kw in SAMPLED]
    cases += [(Constraint.regex(p), p, kw) for p in REGEXES for kw in SAMPLED[:2]]
    for constraint, _, _ in cases:
        compiler.compile(constraint)  # cached: the first step admits every request at once
    free = [dict(max_new_tokens=12), dict(max_new_tokens=12, temperature=0.9, seed=7)]
    handles = [stepped.submit(GenerationRequest(PROMPT, params(c, **kw))) for c, _, kw in cases]
    free_handles = [stepped.submit(GenerationRequest(PROMPT, SamplingParams(**kw))) for kw in free]
    drive(stepped)
    assert len({h.timings.prefill_start for h in handles + free_handles}) == 1  # all in one batch
    for (_, spec, _), handle in zip(cases, handles, strict=True):
        [(text, reason, _)] = outputs(handle)
        assert reason is FinishReason.EOS, (spec, text)  # ended by the grammar, not by length
        if isinstance(spec, dict):
            jsonschema.validate(json.loads(text), spec)
        else:
            assert re.fullmatch(spec, text), (spec, text)
    # Free rows are untouched by their neighbours' masks: the same tokens as alone.
    mixed = [outputs(h)[0][2] for h in free_handles]
    alone = []
    for kw in free:
        h = stepped.submit(GenerationRequest(PROMPT, SamplingParams(**kw)))
        drive(stepped)
        alone.append(outputs(h)[0][2])
    assert mixed == alone


def test_n_sequences_each_follow_the_grammar(stepped):
    constraint = Constraint.json_schema(ORDER)
    handle = stepped.submit(GenerationRequest(PROMPT, params(constraint, n=3, temperature=1.0, seed=11)))
    drive(stepped)
    seqs = outputs(handle)
    assert len(seqs) == 3
    for text, reason, _ in seqs:
        assert reason is FinishReason.EOS
        jsonschema.validate(json.loads(text), ORDER)


def test_logprobs_stay_the_models_own(stepped, model):
    digits = Constraint.regex(r"[0-9]{3}")
    kw = dict(max_new_tokens=3, top_n_tokens=5)
    constrained = stepped.submit(GenerationRequest(PROMPT, params(digits, **kw)))
    free = stepped.submit(GenerationRequest(PROMPT, SamplingParams(**kw)))
    drive(stepped)
    first_c, first_f = next(iter(constrained)), next(iter(free))
    with torch.inference_mode():
        raw = torch.log_softmax(model(torch.tensor([PROMPT])).logits[0, -1].float(), dim=-1)
    assert first_c.token.text.isdigit() and first_c.token.id != first_f.token.id  # the mask chose
    assert first_c.token.logprob == pytest.approx(raw[first_c.token.id].item(), abs=1e-4)
    assert [t.id for t in first_c.top_tokens] == [t.id for t in first_f.top_tokens]  # unmasked top-n
    assert [t.logprob for t in first_c.top_tokens] == pytest.approx([t.logprob for t in first_f.top_tokens])


def test_cancel_mid_grammar_frees_the_row_and_leaves_the_grammar_intact(running):
    letters = Constraint.regex(r"[a-z]{400}")
    handle = running.submit(GenerationRequest(PROMPT, params(letters, max_new_tokens=450)))
    first = []
    for event in handle:
        first.append(event.token.id)
        if len(first) == 5:
            break  # leaving the iteration cancels the request
    deadline = time.monotonic() + 30
    while running.active_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert running.active_requests == 0 and running.batch_size == 0
    # The compiled grammar's start state was copied, never advanced: the same request starts alike.
    again = running.submit(GenerationRequest(PROMPT, params(Constraint.regex(r"[a-z]{3}"), max_new_tokens=10)))
    [(text, reason, ids)] = outputs(again)
    assert re.fullmatch(r"[a-z]{3}", text) and reason is FinishReason.EOS
    restarted = running.submit(GenerationRequest(PROMPT, params(letters, max_new_tokens=5)))
    assert outputs(restarted)[0][2] == first


def test_invalid_grammar_fails_only_its_request(stepped):
    bad = stepped.submit(GenerationRequest(PROMPT, params(Constraint.regex("(unclosed"))))
    good = stepped.submit(GenerationRequest(PROMPT, params(Constraint.regex(r"(yes|no)"))))
    free = stepped.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=4)))
    drive(stepped)
    with pytest.raises(GrammarRejected, match="invalid regex"):
        list(bad)
    assert outputs(good)[0][0] in ("yes", "no")
    assert len(outputs(free)[0][2]) == 4


def test_a_token_the_grammar_refuses_fails_only_its_request(stepped, tokenizer):
    # A logits processor runs after the mask and may force any token: the matcher refuses it.
    letter = tokenizer.convert_tokens_to_ids("a")
    rogue = stepped.submit(GenerationRequest(PROMPT, params(Constraint.regex(r"[0-9]+"), logits_processors=[
        forced([letter])])))
    good = stepped.submit(GenerationRequest(PROMPT, params(Constraint.regex(r"[0-9]{2}"))))
    drive(stepped)
    with pytest.raises(EngineError, match="grammar matcher refused token"):
        list(rogue)
    assert re.fullmatch(r"[0-9]{2}", outputs(good)[0][0])


class HeldCompiles:
    """Makes every compile wait until `release()`: a slow compile, without burning CPU."""

    def __init__(self, monkeypatch):
        self.gate = threading.Event()
        real = grammar_pool.compile_grammar

        def held(*args, **kwargs):
            self.gate.wait(60)
            return real(*args, **kwargs)

        monkeypatch.setattr(grammar_pool, "compile_grammar", held)

    def release(self) -> None:
        self.gate.set()


@contextlib.contextmanager
def held_engine(model, tokenizer, compiler, monkeypatch, compile_timeout: float):
    """A running engine whose compiles (`compile_timeout` each) wait for `held.release()`."""
    held = HeldCompiles(monkeypatch)
    slow = GrammarCompiler(compiler.tokenizer, GrammarLimits(compile_timeout=compile_timeout))
    engine = make_engine(model, tokenizer, slow)
    engine.start()
    try:
        yield engine, held
    finally:
        held.release()
        engine.shutdown()
        slow.close()


def test_a_slow_compile_neither_stalls_others_nor_looks_like_a_stall(model, tokenizer, compiler, monkeypatch):
    with held_engine(model, tokenizer, compiler, monkeypatch, 60) as (engine, held):
        waiting = engine.submit(GenerationRequest(PROMPT, params(Constraint.regex(r"(up|down)"))))
        free = engine.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=8)))
        assert len(outputs(free)[0][2]) == 8  # decoded while the other request's grammar compiles
        worst, until = 0.0, time.monotonic() + 3.0
        while time.monotonic() < until:  # the watchdog's clock stays fresh while a grammar compiles
            worst = max(worst, engine.seconds_since_progress())
            time.sleep(0.02)
        assert engine.active_requests == 1 and worst < 2.0, worst
        held.release()
        assert outputs(waiting)[0][0] in ("up", "down")


def test_a_compile_past_its_deadline_fails_only_its_request(model, tokenizer, compiler, monkeypatch):
    with held_engine(model, tokenizer, compiler, monkeypatch, 0.5) as (engine, _):
        late = engine.submit(GenerationRequest(PROMPT, params(Constraint.regex(r"[0-9]{4}"))))
        free = engine.submit(GenerationRequest(PROMPT, SamplingParams(max_new_tokens=6)))
        with pytest.raises(GrammarRejected, match="did not compile within 0.5 s"):
            list(late)
        assert len(outputs(free)[0][2]) == 6
        assert engine.healthy and engine.active_requests == 0


def test_cancel_while_the_grammar_compiles(model, tokenizer, compiler, monkeypatch):
    with held_engine(model, tokenizer, compiler, monkeypatch, 60) as (engine, _):
        handle = engine.submit(GenerationRequest(PROMPT, params(Constraint.regex(r"[0-9]{4}"))))
        handle.cancel()
        deadline = time.monotonic() + 10
        while engine.active_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.active_requests == 0 and len(engine._gate) == 0


def test_a_grammar_without_a_compiler_is_refused(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig.from_model(model, max_batch_total_tokens=200_000))
    with pytest.raises(ValueError, match="no grammar compiler"):
        engine.submit(GenerationRequest(PROMPT, params(Constraint.regex("a"))))


PERSON_CARD = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "city": {"type": "string", "maxLength": 40}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}


@pytest.mark.slow
def test_smollm2_answers_a_schema_with_a_valid_object():
    from serve.config import Settings
    from serve.engine.interfaces import eos_ids_of
    from serve.model_loading import load_model, resolve_model
    from serve.service import build_grammar_compiler

    model, tokenizer = load_model(resolve_model("/nonexistent", None), torch.float32)
    grammars = build_grammar_compiler(Settings(), tokenizer, eos_ids_of(model, tokenizer))
    engine = Engine(model, tokenizer, EngineConfig.from_model(model), grammars)
    engine.start()
    try:
        chat = [{"role": "user", "content": "Invent a person. Answer in JSON with their name, age and city."}]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
        constraint = Constraint.json_schema(PERSON_CARD)
        handles = [engine.submit(GenerationRequest(list(prompt["input_ids"]), params(constraint, 120, **kw)))
                   for kw in ({}, {"temperature": 0.8, "seed": 3}, {"temperature": 1.0, "seed": 4, "top_p": 0.9})]
        for handle in handles:
            [(text, reason, _)] = outputs(handle)
            assert reason is FinishReason.EOS, text
            jsonschema.validate(json.loads(text), PERSON_CARD)
    finally:
        engine.shutdown()
        grammars.close()


def test_grammar_settings_reach_the_compiler(tokenizer):
    from serve.config import Settings
    from serve.engine.grammar import GrammarTooLarge
    from serve.service import build_grammar_compiler

    settings = Settings.from_env({"GRAMMAR_MAX_BYTES": "100", "GRAMMAR_COMPILE_TIMEOUT": "2", "GRAMMAR_CACHE_SIZE": "3"})
    grammars = build_grammar_compiler(settings, tokenizer, {2})
    try:
        assert (grammars.limits.max_bytes, grammars.limits.compile_timeout, grammars.cache_size) == (100, 2.0, 3)
        with pytest.raises(GrammarTooLarge, match="at most 100 bytes"):
            grammars.compile(Constraint.json_schema(PERSON))
    finally:
        grammars.close()
