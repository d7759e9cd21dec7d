"""Admission and budget sizing with no model at all: synthetic requests, a fake model config, and the
real block pool driven by hand (rows prefilled and decoded without running a forward)."""

from __future__ import annotations

import collections
import logging
import random
from types import SimpleNamespace

import pytest
import torch

from serve.engine import config as config_module
from serve.engine.batch import KVBatch
from serve.engine.blocks import BlockPool
from serve.engine.config import SAMPLING_BYTES_PER_LOGIT, EngineConfig
from serve.engine.prefix_cache import PrefixCache
from serve.engine.request import GenerationRequest, RequestState, SamplingParams
from serve.engine.scheduler import Scheduler

GiB = 1 << 30


def cfg(total: int = 4096, **kw) -> EngineConfig:
    """A config built by hand: pool of `total` tokens, 16-token blocks, at most 16 rows."""
    base = dict(max_batch_prefill_tokens=2048, max_batch_total_tokens=total, max_input_tokens=1000,
                max_total_tokens=1200, max_batch_size=16)
    return EngineConfig(**{**base, **kw})


def req(prompt: int, max_new: int, n: int = 1) -> RequestState:
    return RequestState(GenerationRequest(list(range(1, prompt + 1)), SamplingParams(max_new_tokens=max_new, n=n)), None)


class FakeModel:
    """What `EngineConfig.from_model` reads: the text config, the dtype, where the parameters live."""

    def __init__(self, layers=30, kv_heads=3, heads=9, hidden=576, context=8192, vocab=49152, dtype=torch.float32):
        self.dtype = dtype
        text = SimpleNamespace(num_hidden_layers=layers, num_key_value_heads=kv_heads, num_attention_heads=heads,
                               hidden_size=hidden, head_dim=hidden // heads, max_position_embeddings=context,
                               vocab_size=vocab)
        self.config = SimpleNamespace(get_text_config=lambda: text)

    def parameters(self):
        yield torch.zeros(1)


# -- what a request needs ------------------------------------------------------------------------------
@pytest.mark.parametrize(("prompt", "max_new", "n", "tokens"), [
    (20, 1, 1, 32),     # 20 cached tokens: two blocks
    (32, 1, 1, 32),     # exactly two blocks: the last generated token is never cached
    (32, 2, 1, 48),     # the first generated token is fed back: a third block
    (40, 10, 3, 128),   # 2 shared prompt blocks + 3 x (blocks 3..4, the partly filled one copied)
    (48, 1, 4, 48),     # a prompt of whole blocks, one new token: the 4 sequences share everything
    (1, 1, 1, 16),
])
def test_kv_tokens_needed_counts_whole_blocks_and_shared_prompts(prompt, max_new, n, tokens):
    assert cfg().kv_tokens_needed(prompt, max_new, n) == tokens


def test_a_request_that_can_never_fit_is_refused_with_the_reason():
    c = cfg(total=1024)
    assert c.unfit_reason(1000, 25, 1) is None  # 1024 tokens: 64 blocks, the whole pool
    assert "needs 1040 KV cache tokens" in c.unfit_reason(1000, 26, 1)
    assert "(MAX_BATCH_TOTAL_TOKENS=1024)" in c.unfit_reason(1000, 26, 1)
    assert "n (17) is more sequences" in c.unfit_reason(1, 1, 17)
    assert c.unfit_reason(1, 1, 16) is None


# -- admission -----------------------------------------------------------------------------------------
def test_fifo_the_first_that_does_not_fit_waits_and_so_does_everyone_behind_it():
    s = Scheduler(cfg())
    waiting = collections.deque([req(100, 100), req(900, 200), req(10, 10)])
    admitted = s.admit(waiting, free_tokens=1000, running_rows=0)
    assert [r.prompt_len for r in admitted] == [100]
    assert [r.prompt_len for r in waiting] == [900, 10]  # the small one does not overtake the big one
    assert [r.prompt_len for r in s.admit(waiting, free_tokens=4096, running_rows=0)] == [900, 10]


def test_a_request_exactly_at_the_limit_is_admitted_and_one_token_more_waits():
    c = cfg()
    need = c.kv_tokens_needed(100, 29, 1)
    assert need == 128
    assert len(Scheduler(c).admit(collections.deque([req(100, 29)]), free_tokens=need, running_rows=3)) == 1
    assert not Scheduler(c).admit(collections.deque([req(100, 30)]), free_tokens=need, running_rows=3)


def test_n_sequences_count_as_rows_and_share_their_prompt_blocks():
    c = cfg()
    s = Scheduler(c)
    waiting = collections.deque([req(64, 16, n=4)])
    assert c.kv_tokens_needed(64, 16, 4) == 64 + 4 * 16 < 4 * (64 + 16)
    assert not s.admit(waiting, free_tokens=4096, running_rows=13)  # 13 + 4 rows > 16
    assert len(s.admit(waiting, free_tokens=4096, running_rows=12)) == 1


def test_the_prefill_budget_counts_the_prompts_tokens():
    s = Scheduler(cfg(max_batch_prefill_tokens=1000))
    waiting = collections.deque([req(300, 1), req(200, 1), req(600, 1), req(10, 1)])
    assert [r.prompt_len for r in s.admit(waiting, free_tokens=10_000, running_rows=0)] == [300, 200]  # +600 > 1000
    assert [r.prompt_len for r in s.admit(waiting, free_tokens=10_000, running_rows=0)] == [600, 10]


def test_waiting_requests_never_hang_and_the_pool_never_runs_out():
    """Random arrivals driven through the real pool: every request is admitted in FIFO order, rows
    take blocks as they decode, the pool always keeps what running rows may still take."""
    c = cfg(total=2048)
    pool = BlockPool(c.pool_blocks, c.block_size, 1, 1, 1)
    s, rng = Scheduler(c), random.Random(7)
    arrivals = [req(rng.choice([5, 30, 200, 900]), rng.choice([1, 8, 60, 300]), rng.choice([1, 1, 2, 3]))
                for _ in range(120)]
    arrivals = [r for r in arrivals if c.kv_tokens_needed(r.prompt_len, r.params.max_new_tokens, r.n) <= 2048]
    serial = sum(r.params.max_new_tokens + 1 for r in arrivals) + len(arrivals)  # one request at a time
    waiting, batch, queued, order, generated, steps = collections.deque(), None, [], [], {}, 0
    while arrivals or waiting or (batch is not None and batch.size):
        steps += 1
        assert steps <= serial, "admission hung"
        k = rng.randint(0, 4)
        waiting.extend(arrivals[:k])
        queued += arrivals[:k]
        del arrivals[:k]
        outstanding = batch.outstanding if batch is not None else 0
        admitted = s.admit(waiting, (pool.free_blocks - outstanding) * c.block_size, batch.size if batch else 0)
        order += admitted
        if admitted:  # a prefill, minus the forward: rows get their prompt blocks, then their n forks
            new = KVBatch.allocate(pool, [r.request.prompt_ids for r in admitted],
                                   [c.row_blocks(r.prompt_len, r.params.max_new_tokens) for r in admitted],
                                   [None] * len(admitted), c.attention_tokens, torch.device("cpu"))
            for row, r in zip(new.rows, admitted):
                row.length = r.prompt_len
            new.fork([r.n for r in admitted])
            for row, r in zip(new.rows, [a for a in admitted for _ in range(a.n)]):
                generated[id(row)] = (1, r.params.max_new_tokens)
            batch = (batch or KVBatch(pool, [], c.attention_tokens, torch.device("cpu"))).merged(new)
        assert pool.free_blocks >= batch.outstanding
        done = [i for i, row in enumerate(batch.rows) if generated[id(row)][0] >= generated[id(row)][1]]
        batch.remove(done)
        if batch.size:
            batch.decode_inputs(torch.zeros(batch.size, dtype=torch.long))  # takes blocks as rows grow
            for row in batch.rows:
                got, limit = generated[id(row)]
                generated[id(row)] = (got + 1, limit)
        assert pool.free_blocks >= batch.outstanding >= 0
    assert [id(r) for r in order] == [id(r) for r in queued]  # all admitted, in arrival order
    assert pool.blocks_in_use == 0
    assert pool.peak_in_use <= c.pool_blocks


# -- budgets sized from the model ----------------------------------------------------------------------
def test_budgets_sized_from_free_memory_fit_in_it(monkeypatch):
    monkeypatch.setattr(config_module, "free_memory_bytes", lambda device: 6 * GiB)
    model = FakeModel()
    c = EngineConfig.from_model(model)
    per_token = 2 * 30 * 3 * 64 * 4
    assert c.kv_bytes_per_token == per_token and c.max_batch_size == 256
    assert c.max_batch_total_tokens % c.block_size == 0
    assert c.prefix_cache_tokens == 8192 and c.attention_tokens == 32768
    # the KV budget and the sampling workspace together stay within the share of free memory
    assert c.kv_budget_bytes + c.sampling_bytes(49152) <= 6 * GiB
    assert c.kv_budget_bytes + c.sampling_bytes(49152) > 6 * GiB - 2 * c.block_size * per_token
    assert c.sampling_bytes(49152) == 256 * 49152 * SAMPLING_BYTES_PER_LOGIT


def test_prefix_cache_is_carved_out_of_the_budget_and_set_values_are_kept(monkeypatch):
    monkeypatch.setattr(config_module, "free_memory_bytes", lambda device: GiB)
    small = EngineConfig.from_model(FakeModel(), max_batch_size=8)
    assert small.prefix_cache_tokens < 8192  # 1/8 of what a small machine gives the cache
    assert abs(8 * small.prefix_cache_tokens - (small.max_batch_total_tokens + small.prefix_cache_tokens)) < 8 * 16
    off = EngineConfig.from_model(FakeModel(), prefix_cache_tokens=0, max_batch_size=8)
    assert off.prefix_cache_tokens == 0 and off.max_batch_total_tokens > small.max_batch_total_tokens
    fixed = EngineConfig.from_model(FakeModel(), max_batch_total_tokens=100_005, max_batch_size=4)
    assert fixed.max_batch_total_tokens == 100_000 and fixed.prefix_cache_tokens == 8192
    assert fixed.kv_budget_bytes == (100_000 + 8192) * fixed.kv_bytes_per_token + 32768 * 2 * 3 * 64 * 4


def test_a_pool_smaller_than_one_full_request_is_refused_when_set_and_raised_when_sized(monkeypatch, caplog):
    with pytest.raises(ValueError, match="MAX_BATCH_TOTAL_TOKENS .* must be >= MAX_TOTAL_TOKENS"):
        EngineConfig.from_model(FakeModel(context=4096), max_batch_total_tokens=4000)
    EngineConfig.from_model(FakeModel(context=4096), max_batch_total_tokens=4096)
    # A busy machine: the share of free memory does not even cover the sampling rows. The server
    # still starts, with a pool for one full request, and says so.
    monkeypatch.setattr(config_module, "free_memory_bytes", lambda device: GiB // 2)
    monkeypatch.setattr(logging.getLogger("serve"), "propagate", True)  # an app test may have turned it off
    with caplog.at_level(logging.WARNING, logger="serve.engine.config"):
        c = EngineConfig.from_model(FakeModel(context=4096))
    assert c.max_batch_total_tokens == c.kv_tokens_needed(4095, 1, 1) == 4096
    assert "less than one request of MAX_TOTAL_TOKENS; using 4096" in caplog.text


def test_the_prefix_cache_never_holds_more_than_its_bound():
    """Room is made before a prompt's keys and values are copied in, so not even a transient overshoots."""
    cache, rng = PrefixCache(200), random.Random(3)

    def copy_of(n: int):
        def make() -> list[torch.Tensor]:
            assert cache.tokens + n <= 200, "copied before making room"
            return [torch.zeros(2, 1, n, 4)]  # 32 bytes per token
        return make

    for _ in range(300):
        ids = [rng.randint(0, 3)] * 20 + [rng.randint(0, 50) for _ in range(rng.randint(1, 120))]
        cache.insert(ids, copy_of(len(ids)))
        assert cache.tokens <= 200 and cache.nbytes == cache.tokens * 32
    assert 0 < cache.peak_nbytes <= 200 * 32


def test_cancelled_requests_are_popped_not_prefilled():
    """A request cancelled after the step applied its cancellations (its client left meanwhile) is
    skipped at admission, never prefilled; the engine ends it at its next step."""
    gone, stays = req(10, 10), req(10, 10)
    waiting = collections.deque([gone, stays])
    admitted = Scheduler(cfg()).admit(waiting, 4096, 0, cancelled={gone.request.request_id})
    assert admitted == [stays] and not waiting
