"""The memory invariant, checked after every step of adversarial mixes: the KV bytes the engine holds
(block pool, prefix cache, attention gathers) never exceed `config.kv_budget_bytes`, the pool always
keeps free what running rows may still take, and no row holds more than its own tokens; greedy
outputs still equal `model.generate` alone. The loop is driven by hand on the test's thread."""

from __future__ import annotations

import pytest
import torch

from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.engine.request import GenerationRequest, PrefillEvent, SamplingParams, TokenEvent
from tests.unit.conftest import generate_alone

BS = 16


def small_engine(model, tokenizer, **budgets) -> Engine:
    cfg = EngineConfig.from_model(model, **{"max_total_tokens": 1024, "max_input_tokens": 900,
                                            "max_batch_total_tokens": 2048, "prefix_cache_tokens": 512,
                                            "max_batch_size": 32, **budgets})
    engine = Engine(model, tokenizer, cfg)
    engine.healthy = True  # accepting requests; its loop is this test's (no thread started)
    return engine


def check_invariant(engine: Engine) -> None:
    cfg, pool, batch = engine.config, engine.pool, engine._batch
    assert engine.kv_peak_bytes <= cfg.kv_budget_bytes
    assert pool.nbytes <= cfg.pool_blocks * cfg.block_size * cfg.kv_bytes_per_token
    assert engine.prefix_cache.tokens <= cfg.prefix_cache_tokens
    rows = batch.rows if batch is not None else []
    assert pool.free_blocks >= sum(r.limit - len(r.blocks) for r in rows)  # what running rows may still take
    assert pool.blocks_in_use <= sum(-(-r.length // BS) for r in rows)  # no row holds more than its tokens


def run(engine: Engine, max_steps: int = 3000) -> int:
    steps = 0
    with torch.inference_mode():
        while engine._waiting or engine._rows:
            engine._step_and_check()  # what the engine's thread runs: a step and its health accounting
            check_invariant(engine)
            steps += 1
            assert steps < max_steps, "the loop stopped making progress"
    assert engine.pool.blocks_in_use == 0 and engine.kv_tokens == 0
    return steps


def tokens(handle) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for ev in handle:
        if isinstance(ev, TokenEvent):
            out.setdefault(ev.seq_index, []).append(ev.token.id)
    return out


def short_params(i: int) -> SamplingParams:
    """Greedy, or every fifth request n = 2 or 3 sampled sequences sharing one prompt (best_of is the same
    to the engine)."""
    if i % 5:
        return SamplingParams(max_new_tokens=8 + i % 9, ignore_eos=True)
    return SamplingParams(max_new_tokens=20, do_sample=True, seed=i, n=2 + i % 2, ignore_eos=True)


@pytest.mark.slow  # ~20 s alone on the 2 cores, minutes when the machine is shared
def test_a_near_max_prompt_beside_110_short_ones_stays_within_the_budget(model, tokenizer):
    engine = small_engine(model, tokenizer, max_batch_total_tokens=1536)
    system = tokenizer.encode("You are a terse assistant. Answer in one line, please, always. " * 2)
    shorts = [system + tokenizer.encode(f"question {i}?" + " more" * (i % 9)) if i % 3 == 0
              else tokenizer.encode("tell me " * (1 + i % 7) + str(i)) for i in range(110)]
    long_prompt = (tokenizer.encode("a long document line. " * 200))[:880]  # MAX_INPUT_TOKENS is 900
    first = [engine.submit(GenerationRequest(p, short_params(i))) for i, p in enumerate(shorts[:10])]
    long_handle = engine.submit(GenerationRequest(long_prompt, SamplingParams(max_new_tokens=140, ignore_eos=True)))
    later = [engine.submit(GenerationRequest(p, short_params(i))) for i, p in enumerate(shorts[10:], 10)]
    steps = run(engine)  # the invariant is asserted after every step
    handles = first + later
    outputs = [(p, short_params(i), tokens(h)) for i, (p, h) in enumerate(zip(shorts, handles, strict=True))]
    for _, params, seqs in outputs:
        assert len(seqs) == params.n and all(len(s) == params.max_new_tokens for s in seqs.values())
    assert tokens(long_handle)[0] == generate_alone(model, long_prompt, 140)  # 880 + 140 = 1020, the limit is 1024
    greedy = [o for o in outputs if not o[1].do_sample]
    for p, params, seqs in greedy[::12]:  # a sample of the greedy ones against generate (it is slow)
        assert seqs[0] == generate_alone(model, p, params.max_new_tokens)
    # the long request waited until rows left to make room, and nobody behind it overtook it (FIFO)
    assert long_handle.timings.prefill_start > min(h.timings.finished for h in first)
    assert all(h.timings.prefill_start >= long_handle.timings.prefill_start for h in later)
    assert engine.prefix_cache.hit_tokens > 0 and steps > 140
    assert engine.pool.peak_in_use * BS <= engine.config.max_batch_total_tokens


def test_prompt_logprobs_of_a_long_prompt_come_in_chunks_no_bigger_than_a_decode_step(model, tokenizer):
    engine = small_engine(model, tokenizer, max_batch_size=8)
    widest: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, out: widest.append(out.numel() // out.shape[-1]))
    try:
        prompt = tokenizer.encode("Every token of this prompt gets its logprob. " * 12)
        handles = [engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=3, prefill_logprobs=True)))
                   for _ in range(2)]
        run(engine)
    finally:
        hook.remove()
    assert max(widest) <= 8  # rows x positions of logits per forward: at most max_batch_size
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    expected = ref.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    for h in handles:
        prefill = next(iter(h))
        assert isinstance(prefill, PrefillEvent) and len(prefill.tokens) == len(prompt)
        assert torch.allclose(torch.tensor([t.logprob for t in prefill.tokens[1:]]), expected, atol=1e-4)


def test_a_request_that_needs_the_whole_pool_runs_alone_then_the_rest(model, tokenizer):
    engine = small_engine(model, tokenizer, max_batch_total_tokens=1024, prefix_cache_tokens=0, max_input_tokens=1000)
    prompt = tokenizer.encode("fill the pool " * 400)[:1000]
    assert engine.config.kv_tokens_needed(len(prompt), 24, 1) == 1024
    with pytest.raises(ValueError, match="needs 1056 KV cache tokens"):
        engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=24, n=2)))
    first = engine.submit(GenerationRequest(tokenizer.encode("before"), SamplingParams(max_new_tokens=30, ignore_eos=True)))
    whole = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True)))
    after = engine.submit(GenerationRequest(tokenizer.encode("after"), SamplingParams(max_new_tokens=5, ignore_eos=True)))
    run(engine)
    assert whole.timings.prefill_start > first.timings.finished  # it needed every block
    assert after.timings.prefill_start > whole.timings.finished
    assert tokens(whole)[0] == generate_alone(model, prompt, 24)


def sampling_peak_bytes(build_and_sample) -> int:
    """Peak bytes torch allocates while `build_and_sample()` runs (the profiler's allocation and free
    events, summed in time order). numpy's own buffers (the grammar mask's unpacking) are not seen;
    they are freed before sampling sorts, where the peak is."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        build_and_sample()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("grammar", [False, True])
def test_one_sampling_step_with_every_option_and_a_grammar_fits_its_budget_per_logit(tokenizer, grammar):
    """SAMPLING_BYTES_PER_LOGIT (what EngineConfig sets aside per row and vocabulary entry) covers the
    worst step: the logits, every penalty, 300 biases, watermark, top-k/p, typical-p, top-n and a
    JSON-schema grammar on every row, with the real tokenizer's 49152-token vocabulary."""
    from serve.engine.config import SAMPLING_BYTES_PER_LOGIT
    from serve.engine.grammar import Constraint, compile_grammar, grammar_tokenizer
    from serve.engine.sampling import SamplingState

    rows, vocab = 16, len(tokenizer)
    params = SamplingParams(temperature=0.8, do_sample=True, top_k=50, top_p=0.9, typical_p=0.95,
                            repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5, watermark=True,
                            logit_bias={i: 1.0 for i in range(300)}, top_n_tokens=5)
    matchers, grammar_vocab = None, 0
    if grammar:
        lexicon = grammar_tokenizer(tokenizer, {tokenizer.eos_token_id})
        schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array"}},
                  "required": ["name", "tags"]}
        compiled = compile_grammar(Constraint.json_schema(schema), lexicon)
        matchers, grammar_vocab = [compiled.new_matcher() for _ in range(rows)], lexicon.vocab_size

    def build_and_sample() -> None:
        logits = torch.randn(rows, vocab)
        state = SamplingState([params] * rows, list(range(rows)), [[1, 2, 3] * 100] * rows, vocab,
                              torch.device("cpu"), matchers, grammar_vocab)
        for _ in range(2):
            state.observe(state.sample(logits).ids)

    build_and_sample()  # once first: the watermark's table (one fixed 32 MB per process, not per row) exists now
    per_logit = sampling_peak_bytes(build_and_sample) / (rows * vocab)
    print(f"\nsampling peak, grammar={grammar}: {per_logit:.1f} bytes per row and vocabulary entry")
    assert 40 < per_logit <= SAMPLING_BYTES_PER_LOGIT  # the lower bound: the measurement sees the sort's copies
