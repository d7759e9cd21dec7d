"""The engine's idle line: once per idle spell, rate-limited, all zeros when nothing leaked, a warning when
something did (the load test, bench/load.py, reads the last one to assert every row was freed)."""

from __future__ import annotations

import logging
import re
import time

import pytest

from serve.engine.idle import IdleReport
from serve.engine.request import GenerationRequest, SamplingParams
from tests.unit.test_engine import collect, wait_for

LINE = re.compile(r"engine idle: (\d+) requests held \((\d+) queued\), (\d+) rows, KV blocks held by rows (\d+) of (\d+), "
                  r"at most (\d+) so far \(the prefix cache keeps (\d+) tokens in (\d+) prompts, outside the pool\)")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_idle_spell_and_none_within_the_interval():
    clock = Clock()
    report = IdleReport(interval=10.0, clock=clock)
    assert report.due_in() is None  # a fresh engine has nothing to say
    report.busy()
    assert report.due_in() <= 0  # the first spell after work: at once
    report.reported()
    assert report.due_in() is None  # said for this spell
    clock.now += 3
    report.busy()  # a short burst, idle again 3 s after the last line
    assert report.due_in() == pytest.approx(7.0)  # deferred, not dropped
    clock.now += 7
    assert report.due_in() <= 0
    report.reported()
    clock.now += 60
    assert report.due_in() is None  # a long idle spell: one line, not one per interval


class Lines(logging.Handler):
    """The engine logger's records (its thread logs them; the "serve" logger may not propagate to caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def idle(self) -> list[tuple[int, tuple[int, ...]]]:
        found = []
        for r in list(self.records):
            m = LINE.fullmatch(r.getMessage())
            if m:
                found.append((r.levelno, tuple(int(g) for g in m.groups())))
        return found


@pytest.fixture
def lines():
    logger = logging.getLogger("serve.engine.engine")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_the_engine_says_it_holds_nothing_once_idle(engine, tokenizer, lines):
    engine.idle_report.interval = 0.05
    prompt = tokenizer.encode("Once upon a time, in a small town by the sea, there lived a baker")
    assert len(collect(engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=5, ignore_eos=True))))) == 5
    wait_for(lambda: len(lines.idle()) == 1)
    level, (held, queued, rows, blocks, pool, peak, cached, prompts) = lines.idle()[-1]
    assert (level, held, queued, rows, blocks) == (logging.INFO, 0, 0, 0, 0)
    assert pool == engine.pool.num_blocks and cached == len(prompt) and prompts == 1
    assert peak == -(-(len(prompt) + 4) // engine.config.block_size)  # the most the row held: 4 tokens cached

    # A request cancelled mid-generation, beside one that finishes: the next line is all zeros again.
    long = engine.submit(GenerationRequest(tokenizer.encode("a long one"), SamplingParams(max_new_tokens=500, ignore_eos=True)))
    short = engine.submit(GenerationRequest(tokenizer.encode("a short one"), SamplingParams(max_new_tokens=3)))
    events = iter(long)
    next(events), next(events)
    long.cancel()
    collect(short)
    wait_for(lambda: len(lines.idle()) == 2)
    assert lines.idle()[-1][0] == logging.INFO and lines.idle()[-1][1][:4] == (0, 0, 0, 0)
    time.sleep(0.2)
    assert len(lines.idle()) == 2  # idle for longer than the interval: still one line per spell


def test_blocks_a_finished_row_failed_to_hand_back_are_a_warning(engine, tokenizer, lines, monkeypatch):
    engine.idle_report.interval = 0.05
    monkeypatch.setattr(engine.pool, "release", lambda blocks: None)  # a leak: rows keep their blocks
    prompt = tokenizer.encode("Leaky rows hold on to their blocks")
    collect(engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))))
    wait_for(lambda: len(lines.idle()) == 1)
    level, (held, _, rows, blocks, *_) = lines.idle()[-1]
    assert level == logging.WARNING and held == 0 and rows == 0
    assert 0 < blocks <= -(-(len(prompt) + 20) // engine.config.block_size)  # the row's blocks
    assert f"KV blocks held by rows {blocks} of" in engine.idle_summary()


def test_the_idle_engine_hands_freed_heap_pages_back(engine, tokenizer, lines, monkeypatch):
    """With the idle line, malloc_trim(0): after a burst, malloc's free-but-kept heap goes back to the system,
    just before the line is logged (the load test reads the worker's RSS when it sees the line)."""
    import serve.engine.engine as engine_module
    from serve.engine import idle

    trims: list[int] = []
    monkeypatch.setattr(engine_module, "trim_heap", lambda: trims.append(len(lines.idle())) or idle.trim_heap())
    engine.idle_report.interval = 0.05
    assert len(collect(engine.submit(GenerationRequest(tokenizer.encode("a burst"), SamplingParams(max_new_tokens=3,
                                                                                                  ignore_eos=True))))) == 3
    wait_for(lambda: trims)
    assert trims[0] == 0  # right before the idle line
    wait_for(lambda: lines.idle())
    assert idle.trim_heap()  # this is glibc: the call is real, not skipped
