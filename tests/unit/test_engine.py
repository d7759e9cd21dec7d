"""Engine tests with no HTTP: batching correctness, isolation, cancellation, streaming text."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from serve.engine.request import EngineError, FinishReason, GenerationRequest, PrefillEvent, SamplingParams
from tests.unit.conftest import forced, generate_alone


def wait_for(condition, timeout: float = 30.0) -> None:
    """Poll a condition the engine thread will make true (bounded, so a bug fails instead of hanging)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def collect(handle):
    """All token events of a handle."""
    return [ev for ev in handle if not isinstance(ev, PrefillEvent)]


def ids_of(events, seq: int = 0) -> list[int]:
    return [ev.token.id for ev in events if ev.seq_index == seq]


def test_batched_greedy_equals_generate_alone(engine, model, tokenizer):
    """16 mixed-length prompts, arriving in waves while others decode, match model.generate alone."""
    prompts = [tokenizer.encode("word " * (1 + 3 * i) + f"number {i}") for i in range(16)]
    lengths = [12 + (i * 7) % 25 for i in range(16)]
    handles = []
    for wave in range(4):  # later waves join a running batch, some with longer prompts
        for i in range(wave * 4, wave * 4 + 4):
            params = SamplingParams(max_new_tokens=lengths[i], ignore_eos=True)
            handles.append(engine.submit(GenerationRequest(prompts[i], params)))
        time.sleep(0.05)
    outputs = [ids_of(collect(h)) for h in handles]
    for i, out in enumerate(outputs):
        assert out == generate_alone(model, prompts[i], lengths[i]), f"prompt {i} diverged"
    assert engine.batch_size == 0 and engine.kv_tokens == 0 and engine.pool.blocks_in_use == 0


def test_identical_concurrent_requests_agree(engine, tokenizer):
    prompt = tokenizer.encode("The same question, asked eight times")
    handles = [engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True)))
               for _ in range(8)]
    outs = [ids_of(collect(h)) for h in handles]
    assert all(o == outs[0] for o in outs) and len(outs[0]) == 24


def test_seeded_sample_is_the_same_alone_and_in_a_busy_batch(engine, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    params = dict(max_new_tokens=30, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=1234,
                  ignore_eos=True)
    alone = ids_of(collect(engine.submit(GenerationRequest(prompt, SamplingParams(**params)))))
    noise = [engine.submit(GenerationRequest(tokenizer.encode("noise " * (i + 1)),
                                             SamplingParams(max_new_tokens=40, do_sample=True, ignore_eos=True)))
             for i in range(6)]
    busy = engine.submit(GenerationRequest(prompt, SamplingParams(**params)))
    busy_ids = ids_of(collect(busy))
    for h in noise:
        collect(h)
    assert busy_ids == alone
    other_seed = ids_of(collect(engine.submit(GenerationRequest(prompt, SamplingParams(**{**params, "seed": 99})))))
    assert other_seed != alone


def test_stop_string_split_over_two_tokens(engine, tokenizer):
    target = tokenizer.encode(" alpha beta gamma delta")
    assert len(target) >= 4
    stop = tokenizer.decode(target[1:3]).strip()  # spans a token boundary: "beta gamma"
    params = SamplingParams(max_new_tokens=10, stop=[stop], logits_processors=[forced(target)])
    events = collect(engine.submit(GenerationRequest(tokenizer.encode("Say:"), params)))
    finish = events[-1].finish
    assert finish.reason is FinishReason.STOP and finish.stop_sequence == stop
    assert finish.text.endswith(stop) and finish.text == " alpha " + stop
    assert finish.text[: finish.stop_start] == " alpha "
    assert len(events) == 3


@pytest.mark.parametrize("text", ["Dragons 🐉 breathe fire 🔥!", "你好，世界。日本語も", "naïve café — “quotes”"])
def test_unicode_streams_byte_exact(engine, tokenizer, text):
    target = tokenizer.encode(text)
    params = SamplingParams(max_new_tokens=len(target), logits_processors=[forced(target)], ignore_eos=True)
    events = collect(engine.submit(GenerationRequest(tokenizer.encode("Echo:"), params)))
    pieces = [ev.token.text for ev in events]
    assert "".join(pieces).encode() == text.encode()
    assert all("\ufffd" not in p for p in pieces)
    assert events[-1].finish.text == text


def test_cancel_frees_rows_within_one_step(engine, tokenizer):
    keep = engine.submit(GenerationRequest(tokenizer.encode("keep going"), SamplingParams(max_new_tokens=400, ignore_eos=True)))
    victim = engine.submit(GenerationRequest(tokenizer.encode("cancel me please, I am long" * 3),
                                             SamplingParams(max_new_tokens=400, ignore_eos=True, n=2)))
    it_keep, it_victim = iter(keep), iter(victim)
    for _ in range(3):
        next(it_keep), next(it_victim)
    wait_for(lambda: engine.batch_size == 3)
    step_at_cancel = engine.steps
    victim.cancel()
    # The engine thread updates the rows and the pool one after the other: wait for both.
    wait_for(lambda: engine.batch_size == 1 and engine.pool.blocks_in_use == -(-engine.kv_tokens // 16))
    assert engine.steps - step_at_cancel <= 2  # the step running at cancel time, then the next one
    assert engine.active_requests == 1
    keep.cancel()
    wait_for(lambda: engine.batch_size == 0 and engine.pool.blocks_in_use == 0)
    assert engine.active_requests == 0


def test_failure_in_sampling_fails_only_that_request(engine, tokenizer):
    def explode(history, row):
        if len(history) > 8:
            raise RuntimeError("boom in a logits processor")
        return row

    good = [engine.submit(GenerationRequest(tokenizer.encode(f"fine {i}"), SamplingParams(max_new_tokens=20, ignore_eos=True)))
            for i in range(3)]
    bad = engine.submit(GenerationRequest(tokenizer.encode("bad"), SamplingParams(max_new_tokens=20, logits_processors=[explode])))
    with pytest.raises(EngineError, match="boom"):
        collect(bad)
    for h in good:
        events = collect(h)
        assert len(events) == 20 and events[-1].finish.reason is FinishReason.LENGTH
    assert engine.healthy


def test_vectorised_failure_falls_back_to_rowwise(engine, tokenizer, monkeypatch):
    """If the batched sampler itself raises, rows are sampled one by one and only the culprit fails."""
    from serve.engine import sampling

    original = sampling.SamplingState.sample

    def flaky(self, logits):
        if len(self) > 1 and any(p.max_new_tokens == 13 for p in self.params):
            raise RuntimeError("vectorised path broke")
        if len(self) == 1 and self.params[0].max_new_tokens == 13:
            raise RuntimeError("this row is the culprit")
        return original(self, logits)

    monkeypatch.setattr(sampling.SamplingState, "sample", flaky)
    ok = [engine.submit(GenerationRequest(tokenizer.encode(f"ok {i}"), SamplingParams(max_new_tokens=12, ignore_eos=True)))
          for i in range(3)]
    bad = engine.submit(GenerationRequest(tokenizer.encode("bad"), SamplingParams(max_new_tokens=13)))
    with pytest.raises(EngineError, match="culprit"):
        collect(bad)
    assert all(len(collect(h)) == 12 for h in ok)


def test_n_sequences_share_one_prefill_and_differ(engine, tokenizer):
    params = SamplingParams(max_new_tokens=16, do_sample=True, seed=7, n=3, ignore_eos=True, top_n_tokens=2)
    events = collect(engine.submit(GenerationRequest(tokenizer.encode("Pick a word"), params)))
    seqs = [ids_of(events, k) for k in range(3)]
    assert all(len(s) == 16 for s in seqs) and len({tuple(s) for s in seqs}) == 3
    finishes = [ev.finish for ev in events if ev.finish]
    assert sorted(f.seed for f in finishes) == [7, 8, 9]
    assert all(len(ev.top_tokens) == 2 and ev.top_tokens[0].logprob >= ev.top_tokens[1].logprob for ev in events)
    assert all(ev.token.logprob <= ev.top_tokens[0].logprob + 1e-5 for ev in events)


def test_prefill_logprobs_match_a_plain_forward(engine, model, tokenizer):
    prompt = tokenizer.encode("Logprobs of every prompt token")
    handle = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=2, prefill_logprobs=True)))
    prefill = next(iter(handle))
    assert isinstance(prefill, PrefillEvent)
    assert [t.id for t in prefill.tokens] == prompt and prefill.tokens[0].logprob is None
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    expected = ref.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1).tolist()
    assert [t.logprob for t in prefill.tokens[1:]] == pytest.approx(expected, abs=1e-4)


def test_eos_and_max_new_tokens_and_engine_invariants(engine, tokenizer):
    eos = tokenizer.eos_token_id
    events = collect(engine.submit(GenerationRequest(tokenizer.encode("hi"), SamplingParams(max_new_tokens=9, logits_processors=[forced([eos])]))))
    assert len(events) == 1 and events[0].finish.reason is FinishReason.EOS and events[0].token.special
    assert events[0].finish.text == ""
    # The HTTP boundary words the API's messages; the engine only refuses what it cannot run at all.
    for prompt, params, says in [
        (list(range(5000)), SamplingParams(), "exceeds max_total_tokens"),
        ([], SamplingParams(), "empty prompt"),
        ([5, 10**7], SamplingParams(), "prompt token id out of range"),
        ([5, 6], SamplingParams(max_new_tokens=0), "must be at least 1"),
        ([5, 6], SamplingParams(logit_bias={10**7: 1.0}), "logit_bias token id out of range"),
    ]:
        with pytest.raises(ValueError, match=says):
            engine.submit(GenerationRequest(prompt, params))
    assert engine.active_requests == 0


def test_handles_work_from_plain_threads(engine, tokenizer):
    results: dict[int, list[int]] = {}

    def worker(i: int) -> None:
        results[i] = ids_of(collect(engine.submit(GenerationRequest(tokenizer.encode("thread"), SamplingParams(max_new_tokens=10, ignore_eos=True)))))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and all(r == results[0] for r in results.values())


def test_longer_newcomer_joins_running_rows_exactly(engine, model, tokenizer, monkeypatch):
    """A prompt longer than every running row joins mid-decode, prefilled in the running rows' decode
    forward (no forward of its own): both stay exact."""
    forwards: list[list[int]] = []  # tokens each row adds, per forward
    real = engine.forward_model

    def forward(inputs, keep):
        forwards.append(inputs["paged_kv"].new)
        return real(inputs, keep)

    monkeypatch.setattr(engine, "forward_model", forward)
    short = tokenizer.encode("short")
    long = tokenizer.encode("a much longer prompt that arrives later " * 4)
    first = engine.submit(GenerationRequest(short, SamplingParams(max_new_tokens=30, ignore_eos=True)))
    it = iter(first)
    head = [next(it).token.id for _ in range(3)]  # decoding has started with a short cache
    assert engine.kv_tokens < len(long)
    second = engine.submit(GenerationRequest(long, SamplingParams(max_new_tokens=20, ignore_eos=True)))
    rest = [ev.token.id for ev in it]
    assert head + rest == generate_alone(model, short, 30)
    assert ids_of(collect(second)) == generate_alone(model, long, 20)
    assert forwards[0] == [len(short)] and [1, len(long)] in forwards
    assert all(new in ([1], [1, 1], [1, len(long)]) for new in forwards[1:]), forwards


def test_a_failed_fused_forward_is_redone_as_a_prefill_then_a_decode(engine, model, tokenizer, monkeypatch):
    """The forward that decodes a running row and prefills a newcomer fails once: the step is redone as
    two forwards (the running row's cache rewound by the token it wrote), and nobody notices."""
    failed: list[list[int]] = []
    real = engine.forward_model

    def forward(inputs, keep):
        layout = inputs["paged_kv"]
        if not failed and 1 in layout.new and max(layout.new) > 1:
            failed.append(layout.new)
            raise RuntimeError("a transient failure of the fused forward")
        return real(inputs, keep)

    monkeypatch.setattr(engine, "forward_model", forward)
    short, long = tokenizer.encode("short"), tokenizer.encode("a longer prompt that joins a running row " * 3)
    first = engine.submit(GenerationRequest(short, SamplingParams(max_new_tokens=20, ignore_eos=True)))
    it = iter(first)
    head = [next(it).token.id for _ in range(3)]
    second = engine.submit(GenerationRequest(long, SamplingParams(max_new_tokens=12, ignore_eos=True)))
    assert head + [ev.token.id for ev in it] == generate_alone(model, short, 20)
    assert ids_of(collect(second)) == generate_alone(model, long, 12)
    assert failed == [[1, len(long)]] and engine.healthy
    wait_for(lambda: engine.batch_size == 0 and engine.pool.blocks_in_use == 0)


def test_gevent_hub_is_never_starved_while_the_engine_works():
    """In a monkey-patched process, a ticking greenlet sees every engine step go by."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "tests.unit.gevent_ticks_probe"], cwd=root, capture_output=True,
                         text=True, timeout=300, check=True)
    data = json.loads(out.stdout)
    assert data["tokens"] == [120] * 8
    steps = set(data["seen"])
    missing = [s for s in range(data["first"], data["last"]) if s not in steps]
    assert data["last"] - data["first"] >= 100
    assert not missing, f"no gevent tick between engine steps {missing[:10]}"


def test_a_broken_loop_fails_every_request_and_reports_unhealthy(model, tokenizer):
    from serve.engine.config import EngineConfig
    from serve.engine.engine import Engine
    from serve.engine.request import EngineUnavailable

    eng = Engine(model, tokenizer, EngineConfig.from_model(model, max_batch_total_tokens=200_000))

    def broken_admit(*args, **kwargs):
        raise MemoryError("scheduler state corrupted")

    eng.scheduler.admit = broken_admit
    eng.start()
    handles = [eng.submit(GenerationRequest([5, 6, 7], SamplingParams(max_new_tokens=4))) for _ in range(3)]
    for h in handles:
        with pytest.raises(EngineError, match="scheduler state corrupted"):
            collect(h)
    assert not eng.healthy and "MemoryError" in eng.error
    with pytest.raises(EngineUnavailable):
        eng.submit(GenerationRequest([5], SamplingParams()))


def test_prefix_cache_reuses_shared_prompt_starts_exactly(engine, model, tokenizer):
    """Prompts that start like an earlier one skip that part of the prefill and still match generate."""
    system = tokenizer.encode("You are a careful assistant who answers in one short paragraph. " * 2)
    first = system + tokenizer.encode("Tell me about the sea.")
    assert ids_of(collect(engine.submit(GenerationRequest(first, SamplingParams(max_new_tokens=8, ignore_eos=True))))) \
        == generate_alone(model, first, 8)
    hits_before = engine.prefix_cache.hit_tokens
    prompts = [
        system + tokenizer.encode("Tell me about the moon."),  # shares the system part and "Tell me about the"
        system + tokenizer.encode("Why is the sky blue? Answer briefly, please."),
        first,  # the same prompt again: all but its last token come from the cache
        tokenizer.encode("An unrelated prompt that shares nothing with the others at all, really."),
        system[:20] + tokenizer.encode("diverges early"),
    ]
    running = engine.submit(GenerationRequest(tokenizer.encode("busy row"), SamplingParams(max_new_tokens=40, ignore_eos=True)))
    next(iter(running))  # the newcomers join a batch that is decoding
    handles = [engine.submit(GenerationRequest(p, SamplingParams(max_new_tokens=20, ignore_eos=True))) for p in prompts]
    for p, h in zip(prompts, handles):
        assert ids_of(collect(h)) == generate_alone(model, p, 20)
    collect(running)
    hits = engine.prefix_cache.hit_tokens - hits_before
    # at least the system part for the first two, the whole prompt but one token for the repeat, 20 for the last
    assert hits >= 2 * len(system) + (len(first) - 1) + 20, hits
    assert engine.batch_size == 0 and engine.pool.blocks_in_use == 0


def test_prompt_logprobs_are_computed_even_when_the_prompt_is_cached(engine, model, tokenizer):
    prompt = tokenizer.encode("A prompt that is long enough to be cached by the engine, surely it is. " * 2)
    collect(engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))))
    handle = engine.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True,
                                                                    prefill_logprobs=True)))
    prefill = [ev for ev in handle if isinstance(ev, PrefillEvent)]
    assert len(prefill) == 1 and len(prefill[0].tokens) == len(prompt)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), -1)
    expected = lp.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
    got = torch.tensor([t.logprob for t in prefill[0].tokens[1:]])
    assert torch.allclose(got, expected, atol=1e-4)


def test_a_long_row_hands_its_blocks_back_while_a_prefix_row_decodes(engine, model, tokenizer):
    """A row built from a cached prefix stays exact while a long neighbour leaves and frees its blocks."""
    system = tokenizer.encode("Shared opening words for every request in this test. " * 2)
    collect(engine.submit(GenerationRequest(system + [42], SamplingParams(max_new_tokens=1))))
    long = tokenizer.encode("filler " * 200)
    short = system + tokenizer.encode("and then a short question?")
    assert engine.prefix_cache.lookup(short) is not None  # the short row starts from the cache (engine idle here)
    long_h = engine.submit(GenerationRequest(long, SamplingParams(max_new_tokens=2, ignore_eos=True)))
    short_h = engine.submit(GenerationRequest(short, SamplingParams(max_new_tokens=300, ignore_eos=True)))
    collect(long_h)
    # the long row's blocks come back while the short row still decodes: only the short row's remain
    wait_for(lambda: 0 < engine.pool.blocks_in_use <= -(-(len(short) + 60) // 16))
    assert ids_of(collect(short_h)) == generate_alone(model, short, 300)
