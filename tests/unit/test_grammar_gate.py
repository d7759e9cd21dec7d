"""The admission gate for requests whose grammar is compiling: order, failures, wakeups, deadlines."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from serve.engine.grammar import Constraint, GrammarError, GrammarLimits, GrammarTooSlow, InvalidGrammar
from serve.engine.grammar_gate import GrammarGate
from serve.engine.grammar_pool import GrammarCompiler
from tests.unit.grammar_helpers import SLOW, byte_tokenizer


@pytest.fixture
def compiler():
    c = GrammarCompiler(byte_tokenizer(), GrammarLimits(compile_timeout=60), workers=2)
    yield c
    c.close()


def release_all(gate, timeout=60.0):
    """Release until the gate is empty (as the loop does, step after step)."""
    ready, failed = [], []
    deadline = time.monotonic() + timeout
    while len(gate) and time.monotonic() < deadline:
        r, f = gate.release()
        ready += r
        failed += f
        time.sleep(0.01)
    return ready, failed


def test_ready_requests_leave_in_arrival_order_and_failures_alone(compiler):
    woken = threading.Event()
    gate = GrammarGate(woken.set)
    for name, constraint in [("a", Constraint.regex("[0-9]+")), ("bad", Constraint.regex("(")),
                             ("b", Constraint.json_object()), ("c", Constraint.regex("[0-9]+"))]:
        pending = compiler.submit(constraint)
        # Held once compiled: requests ready at the same release leave in arrival order (one that is
        # ready earlier may leave first, see the next test; b's compile could otherwise trail c's)
        with contextlib.suppress(GrammarError):
            pending.wait()
        gate.hold(name, pending)
    ready, failed = release_all(gate)
    assert [name for name, _ in ready] == ["a", "b", "c"]
    assert ready[0][1] is ready[2][1]  # one compiled grammar for equal constraints
    assert [(name, type(err)) for name, err in failed] == [("bad", InvalidGrammar)]
    assert woken.is_set() and gate.wake_in() is None


def test_a_slow_compile_does_not_hold_back_a_fast_one(compiler):
    gate = GrammarGate(lambda: None)
    gate.hold("slow", compiler.submit(SLOW))
    gate.hold("fast", compiler.submit(Constraint.regex("x")))
    deadline = time.monotonic() + 30
    ready: list = []
    while not ready and time.monotonic() < deadline:
        ready, _ = gate.release()
    assert [name for name, _ in ready] == ["fast"] and len(gate) == 1
    assert 0 < gate.wake_in() <= 60


def test_deadlines_fail_requests_and_cancelled_ones_can_be_dropped():
    compiler = GrammarCompiler(byte_tokenizer(), GrammarLimits(compile_timeout=0.01), workers=1)
    try:
        gate = GrammarGate(lambda: None)
        gate.hold("late", compiler.submit(SLOW))
        gate.hold("gone", compiler.submit(SLOW))
        assert gate.drop(lambda name: name == "gone") == ["gone"]
        time.sleep(0.05)
        assert gate.wake_in() == 0.0
        ready, failed = gate.release()
        assert ready == [] and [(n, type(e)) for n, e in failed] == [("late", GrammarTooSlow)]
    finally:
        compiler.close()
