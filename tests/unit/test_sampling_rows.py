"""Per-row sampling state: rows stay aligned, logit_bias is one scatter, the watermark is TGI's, cached."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from serve.engine import watermark
from serve.engine.request import SamplingParams
from serve.engine.rows import Rows, build_rows
from serve.engine.sampling import SamplingState
from serve.engine.watermark import WATERMARK_DELTA, WATERMARK_GAMMA, WATERMARK_KEY, Greenlists

CPU = torch.device("cpu")


def every_field_set(n: int, vocab: int = 16) -> Rows:
    """Rows whose every field is present, row i marked by i (parity for the bool flags)."""
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5, logit_bias={i: 1.0}) for i in range(n)]
    rows = build_rows(params, list(range(n)), [[i] for i in range(n)], vocab, CPU)
    rows.matchers = list(range(n))  # stand-ins: rows only move matchers around, never call them
    for f in dataclasses.fields(rows):
        value = getattr(rows, f.name)
        if isinstance(value, torch.Tensor) and value.dim() == 1:
            setattr(rows, f.name, torch.arange(n) % 2 == 1 if value.dtype == torch.bool else torch.arange(n).to(value.dtype))
        elif isinstance(value, torch.Tensor):
            marked = torch.zeros(n, vocab, dtype=value.dtype)
            marked[torch.arange(n), torch.arange(n)] = 1
            setattr(rows, f.name, marked)
    assert all(getattr(rows, f.name) is not None for f in dataclasses.fields(rows))
    return rows


def row_marks(rows: Rows) -> dict[str, list[int]]:
    """For every field, which original row each current row came from."""
    marks: dict[str, list[int]] = {}
    for f in dataclasses.fields(rows):
        value = getattr(rows, f.name)
        if f.name == "params":
            marks[f.name] = [next(iter(p.logit_bias)) for p in value]
        elif f.name == "histories":
            marks[f.name] = [h[0] for h in value]
        elif f.name == "generators":
            marks[f.name] = [g.initial_seed() for g in value]
        elif f.name == "matchers":
            marks[f.name] = list(value)
        elif value.dim() == 2:
            marks[f.name] = value.float().argmax(dim=1).tolist()
        else:
            marks[f.name] = value.long().tolist()
    return marks


def test_select_and_extend_move_every_field_together():
    rows = every_field_set(5)
    for name, got in row_marks(rows.select([4, 1, 3])).items():
        assert got == ([0, 1, 1] if name == "greedy" else [4, 1, 3]), name
    for name, got in row_marks(rows.select([0, 1]).extend(rows.select([2]))).items():
        assert got == ([0, 1, 0] if name == "greedy" else [0, 1, 2]), name


def test_a_missing_statistic_is_zero_filled_when_rows_join():
    plain = build_rows([SamplingParams()], [None], [[3]], 8, CPU)
    biased = build_rows([SamplingParams(logit_bias={5: 2.0})], [None], [[3]], 8, CPU)
    both = plain.extend(biased)
    assert both.bias is not None and both.bias.tolist() == [[0.0] * 8, [0.0] * 5 + [2.0] + [0.0] * 2]
    assert both.counts is None and both.seen is None


def test_logit_bias_of_many_rows_is_written_in_one_scatter(monkeypatch):
    vocab, n = 1000, 16
    bias = {t: float(t % 7) - 3.0 for t in range(0, 900, 3)}  # 300 entries
    writes = {"index_put_": 0, "setitem": 0}
    real_put, real_set = torch.Tensor.index_put_, torch.Tensor.__setitem__

    def counting_put(self, *args, **kwargs):
        writes["index_put_"] += 1
        return real_put(self, *args, **kwargs)

    def counting_set(self, *args, **kwargs):
        writes["setitem"] += 1
        return real_set(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_put_", counting_put)
    monkeypatch.setattr(torch.Tensor, "__setitem__", counting_set)
    state = SamplingState([SamplingParams(logit_bias=bias)] * n, [None] * n, [[1]] * n, vocab, CPU)
    monkeypatch.undo()
    assert writes == {"index_put_": 1, "setitem": 0}
    expected = torch.zeros(vocab)
    for t, b in bias.items():
        expected[t] = b
    assert state.rows.bias is not None and torch.equal(state.rows.bias, expected.repeat(n, 1))


def tgi_watermark(prev_token: int, scores: torch.Tensor) -> torch.Tensor:
    """TGI's WatermarkLogitsProcessor on one row, as TGI writes it (CPU generator, randperm, add delta)."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed(WATERMARK_KEY * prev_token)
    green = torch.randperm(scores.shape[-1], generator=rng)[: int(scores.shape[-1] * WATERMARK_GAMMA)]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[green] = True
    out = scores.clone()
    out[mask] = out[mask] + WATERMARK_DELTA
    return out


@pytest.fixture
def fresh_greenlists(monkeypatch):
    monkeypatch.setattr(watermark, "_tables", {})


def test_watermark_scores_equal_tgis_row_by_row(fresh_greenlists):
    vocab = 5000
    torch.manual_seed(0)
    logits = torch.randn(4, vocab)
    histories = [[11, 42], [7], [11, 42], [3, 99]]  # rows 0 and 2 share their previous token
    params = [SamplingParams(watermark=True), SamplingParams(), SamplingParams(watermark=True),
              SamplingParams(watermark=True, repetition_penalty=1.3)]
    state = SamplingState(params, [None] * 4, histories, vocab, CPU)
    scores, failed = state._process(logits.clone())
    assert not failed
    assert torch.equal(scores[0], tgi_watermark(42, logits[0]))
    assert torch.equal(scores[1], logits[1])
    assert torch.equal(scores[2], tgi_watermark(42, logits[2]))
    # TGI's order: the watermark first, then the repetition penalty.
    marked = tgi_watermark(99, logits[3])
    rep = torch.where(marked > 0, marked / 1.3, marked * 1.3)
    seen = torch.zeros(vocab, dtype=torch.bool)
    seen[[3, 99]] = True
    assert torch.allclose(scores[3], torch.where(seen, rep, marked))
    assert watermark.greenlists_for(CPU, vocab).draws == 2  # one draw per distinct previous token


def test_greenlists_are_cached_least_recently_used_first_out_and_bounded():
    table = Greenlists(vocab=300, device=CPU, capacity=3)
    reference = {t: tgi_watermark(t, torch.zeros(300)) > 0 for t in range(10)}
    for step in ([1, 2, 1], [3], [1], [4], [2]):  # 2 is evicted by 4 (1 was used more recently), then drawn again
        masks = table.masks(step)
        assert all(torch.equal(masks[i], reference[t]) for i, t in enumerate(step))
    assert table.draws == 5 and len(table._slots) == 3
    # More distinct tokens in one step than the table holds: exact all the same, the table stays bounded.
    masks = table.masks([5, 6, 7, 8, 5])
    assert all(torch.equal(masks[i], reference[t]) for i, t in enumerate([5, 6, 7, 8, 5]))
    assert len(table._slots) == 3 and table._table is not None and table._table.shape == (3, 300)


def test_observe_counts_each_rows_own_tokens():
    state = SamplingState([SamplingParams(frequency_penalty=1.0), SamplingParams(repetition_penalty=2.0)],
                          [None, None], [[0], [1]], 8, CPU)
    state.observe(torch.tensor([7, 0]))
    state.observe(torch.tensor([7, 3]))
    assert state.rows.counts is not None and state.rows.counts[0, 7] == 2 and state.rows.counts[1, 0] == 1
    assert state.rows.seen is not None and state.rows.seen[1].nonzero().squeeze(1).tolist() == [0, 1, 3]


@pytest.mark.parametrize("u", [0.0, 1.0 - 2.0**-24], ids=["u=0", "u=1-ulp"])
def test_a_draw_at_either_end_never_picks_a_token_without_mass(monkeypatch, u):
    # Tokens 0-1 and 6-7 at -inf (as a grammar mask leaves them): the draw must land in 2..5.
    logits = torch.full((1, 8), float("-inf"))
    logits[0, 2:6] = torch.tensor([0.3, 1.0, 0.2, 0.5])
    state = SamplingState([SamplingParams(temperature=1.0, do_sample=True)], [0], [[1]], 8, CPU)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(u))
    assert int(state.sample(logits).ids[0]) == (2 if u == 0.0 else 5)
