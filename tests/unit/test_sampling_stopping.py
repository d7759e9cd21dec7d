"""Sampling, stopping and detokenization as small callables, tested from tables."""

from __future__ import annotations

import time

import pytest
import torch

from serve.engine.detokenize import IncrementalDetokenizer
from serve.engine.request import FinishReason, SamplingParams
from serve.engine.sampling import SamplingState
from serve.engine.stopping import StopCriteria
from serve.handlers.holdback import Holdback

V = 8
LOGITS = torch.tensor([[0.0, 3.0, 2.9, 1.0, -1.0, 0.5, 0.2, 0.1]])


def state(*params: SamplingParams, histories=None, seeds=None) -> SamplingState:
    histories = histories or [[0] for _ in params]
    seeds = seeds or [p.seed for p in params]
    return SamplingState(list(params), seeds, histories, V, torch.device("cpu"))


@pytest.mark.parametrize("params, expected", [
    (SamplingParams(), 1),  # greedy
    (SamplingParams(temperature=0.0, do_sample=True), 1),  # temperature 0 means greedy
    (SamplingParams(logit_bias={6: 10.0}), 6),
    (SamplingParams(do_sample=True, top_k=1, seed=3), 1),  # top-k 1 is greedy whatever the seed
    (SamplingParams(do_sample=True, top_p=0.01, seed=3), 1),  # a tiny nucleus keeps only the best
])
def test_choice_table(params, expected):
    assert state(params).sample(LOGITS.clone()).ids.tolist() == [expected]


def test_penalties_change_the_choice():
    hist = [[1, 1, 2]]
    rep = state(SamplingParams(repetition_penalty=4.0), histories=hist)
    assert rep.sample(LOGITS.clone()).ids.tolist() == [3]  # 1 and 2 seen: 3/4 and 2.9/4 fall below 1.0
    freq = state(SamplingParams(frequency_penalty=1.0))
    freq.observe(torch.tensor([1]))
    assert freq.sample(LOGITS.clone()).ids.tolist() == [2]  # 3.0 - 1 < 2.9
    pres = state(SamplingParams(presence_penalty=0.2))  # 3.0 - 0.2 < 2.9
    pres.observe(torch.tensor([1]))
    assert pres.sample(LOGITS.clone()).ids.tolist() == [2]


def test_rows_keep_their_own_parameters():
    rows = state(SamplingParams(), SamplingParams(logit_bias={4: 100.0}), SamplingParams(repetition_penalty=4.0),
                 histories=[[0], [0], [1, 2]])
    assert rows.sample(LOGITS.repeat(3, 1)).ids.tolist() == [1, 4, 3]
    rows.select([2, 0])
    assert rows.sample(LOGITS.repeat(2, 1)).ids.tolist() == [3, 1]


def test_seeded_rows_are_reproducible_and_distribution_is_respected():
    p = SamplingParams(do_sample=True, temperature=1.0, seed=42)
    a = [state(p).sample(LOGITS.clone()).ids.item() for _ in range(3)]
    assert len(set(a)) == 1
    s = state(SamplingParams(do_sample=True, seed=0, top_k=2))
    draws = [s.sample(LOGITS.clone()).ids.item() for _ in range(400)]
    assert set(draws) == {1, 2}  # top-k 2 keeps exactly the two best
    assert 150 < draws.count(1) < 260  # 3.0 vs 2.9: close to even


def test_typical_p_drops_atypical_tokens():
    s = state(SamplingParams(do_sample=True, typical_p=0.2, seed=1))
    draws = {s.sample(LOGITS.clone()).ids.item() for _ in range(100)}
    assert draws <= {1, 2, 3} and 4 not in draws


@pytest.mark.parametrize("stops, text, new, expected", [
    (["END"], "hello EN", 2, None),
    (["END"], "hello END", 1, ("END", 6)),  # completed across tokens
    (["END", "lo"], "hello END", 9, ("lo", 3)),  # earliest match wins
    (["\n\nUser:"], "answer\n\nUser: more", 12, ("\n\nUser:", 6)),
])
def test_stop_strings(stops, text, new, expected):
    stop = StopCriteria([99], stops, max_new_tokens=100)(5, text, new, 3)
    if expected is None:
        assert stop is None
    else:
        assert stop.reason is FinishReason.STOP and (stop.sequence, stop.start) == expected
        assert text[: stop.end].endswith(stop.sequence)


def test_eos_length_and_ignore_eos():
    assert StopCriteria([2, 7], [], 10)(7, "x", 1, 1).reason is FinishReason.EOS
    assert StopCriteria([2], [], 10, ignore_eos=True)(2, "x", 1, 1) is None
    assert StopCriteria([2], [], 3)(5, "x", 1, 3).reason is FinishReason.LENGTH


@pytest.mark.parametrize("text, stops, held", [
    ("Hello wor", ["world!"], 3), ("Hello", ["###"], 0), ("a #", ["###"], 1), ("a ##", ["###", "##x"], 2),
])
def test_holdback(text, stops, held):
    assert len(text) - len(Holdback(stops).push(text)) == held


def test_holdback_is_linear_in_the_output():
    """100k one-character tokens against the longest stop strings allowed: a quadratic holdback
    (every prefix of every stop string per token) takes minutes here, the automaton well under a second."""
    stops = ["a" * 255 + "b", "ab" * 128]
    hold, sent, started = Holdback(stops), 0, time.monotonic()
    for _ in range(100_000):
        sent += len(hold.push("a"))
    assert sent == 100_000 - 255 and time.monotonic() - started < 5


def test_detokenizer_keeps_leading_spaces_and_whole_characters(tokenizer):
    prompt = tokenizer.encode("Say:")
    text = " Hello 🐉 wörld"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.step(i) for i in ids]
    assert "".join(pieces) == text and pieces[0] == " Hello"
    assert "" in pieces  # the dragon's bytes span tokens and are held back until complete
