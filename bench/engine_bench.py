"""Engine benchmark on the embedded SmolLM2 model: batched engine vs sequential `model.generate`.

For each dtype and batch size B, B chat prompts are submitted at once (64 new tokens each, EOS
ignored) and the aggregate output tokens/s is measured, with the time per output token (TPOT) of
each stream. The baseline is stock transformers: `model.generate` on a plainly loaded copy of the
model, run on the same prompts one after the other, in the same process and run. The engine's model
is loaded as the server loads it (on CPU its linear layers run on oneDNN-packed weights,
serve/cpu_linear.py); `generate` on that same packed model is reported too, so the share of the
kernels and the share of batching can be told apart. The prefix cache is off by default here (this
measures batching; the HTTP benchmark measures the server as configured).
Usage: `python -m bench.engine_bench [--batches 1 4 16 32] [--dtypes float32 bfloat16]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from serve.cpu_linear import PackedLinear
from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.engine.request import GenerationRequest, SamplingParams
from serve.model_loading import load_model, resolve_model

TOPICS = ["the sea", "a dragon", "Paris", "bread", "a robot", "winter", "music", "a cat", "trains", "the moon",
          "coffee", "a forest", "chess", "rain", "a lighthouse", "volcanoes"]


def prompts(tokenizer, count: int) -> list[list[int]]:
    """Chat prompts of mixed lengths, rendered with the model's own template."""
    out = []
    for i in range(count):
        msg = f"Write a short story about {TOPICS[i % len(TOPICS)]}." + " Please make it vivid." * (i % 4)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        out.append(list(ids))
    return out


def run_engine(engine: Engine, batch: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    handles = [engine.submit(GenerationRequest(p, params)) for p in batch]
    counts = [sum(1 for _ in h) for h in handles]
    elapsed = time.perf_counter() - start
    tpot = [(h.timings.finished - h.timings.first_token) / (c - 1) for h, c in zip(handles, counts) if c > 1]
    ttft = [h.timings.first_token - h.timings.queued for h in handles]
    return {"tokens_per_s": sum(counts) / elapsed, "tpot_ms": 1000 * statistics.mean(tpot),
            "ttft_ms": 1000 * statistics.mean(ttft), "seconds": elapsed}


def run_sequential(model, batch: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of plain `model.generate`, one prompt after the other."""
    start = time.perf_counter()
    total = 0
    for p in batch:
        ids = torch.tensor([p], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
        total += out.shape[1] - len(p)
    return total / (time.perf_counter() - start)


def on_own_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` on a fresh OS thread and wait for it.

    libgomp keeps one thread pool per OS thread that ever ran a parallel region, and once it manages
    more threads than there are cores it stops spinning between regions: a second pool, even idle,
    made small matmuls on the other thread 1.3-2x slower here. So the baselines and the loading run
    on threads that exit (taking their pool along), and only one pool is alive while anything is
    timed: the baseline's, or the engine thread's. The server does the same (it loads on a thread
    that exits, and only the engine thread runs torch afterwards).
    """
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    thread.join()
    if not out:
        raise RuntimeError("the call on its own thread failed (see the traceback above)")
    return out[0]


def sequential_rate(model, pool: list[list[int]], new_tokens: int) -> float:
    """One timed run of `run_sequential`, after a short warm-up of the generate path."""
    with torch.inference_mode():
        run_sequential(model, pool[:1], 4)  # warm the generate path
        return run_sequential(model, pool, new_tokens)


def repack(model: torch.nn.Module) -> None:
    """Give the oneDNN-packed layers that handed their packed copy to the engine's fused layers
    (serve/engine/fuse.py) one of their own again, so that a forward calling them one by one runs as
    it did before the engine took the model (an A/B then compares forwards, not packed against
    plain matmuls). Costs those copies' memory."""
    for module in model.modules():
        if isinstance(module, PackedLinear) and module.packed is None:
            module.repack()


def on_transformers_forward(engine: Engine) -> None:
    """Make `engine` run the model's transformers forward instead of its own (serve/engine/decoder.py),
    on the same weights, packed as they were loaded."""
    engine.decoder = None
    repack(engine.model)


def engine_levels(model, tokenizer, pool: list[list[int]], batches: list[int], new_tokens: int,
                  prefix_cache_tokens: int, own_forward: bool = True) -> dict[int, dict]:
    """`run_engine` at each batch size; `own_forward=False` runs the model's transformers forward
    instead of the engine's own (serve/engine/decoder.py)."""
    engine = Engine(model, tokenizer, EngineConfig.from_model(model, prefix_cache_tokens=prefix_cache_tokens))
    if not own_forward:
        on_transformers_forward(engine)
    engine.start()
    try:
        engine.warmup()
        return {b: run_engine(engine, pool[:b], new_tokens) for b in batches}
    finally:
        engine.shutdown()  # its thread exits, and its OpenMP pool with it


def bench_dtype(dtype: torch.dtype, batches: list[int], new_tokens: int, sequential_prompts: int,
                prefix_cache_tokens: int, repeat: int) -> dict:
    """Every measurement `repeat` times, in rounds (so a slow spell of the machine hits every row
    alike); the best run of each is kept."""
    source = resolve_model("/nonexistent", None)
    stock, tokenizer = on_own_thread(lambda: load_model(source, dtype, pack_linear=False))
    model, _ = on_own_thread(load_model, source, dtype)
    pool = prompts(tokenizer, max(batches))
    seq = seq_packed = 0.0
    rows: dict[int, dict] = {}
    for r in range(repeat):
        seq = max(seq, on_own_thread(sequential_rate, stock, pool[:sequential_prompts], new_tokens))
        seq_packed = max(seq_packed, on_own_thread(sequential_rate, model, pool[:sequential_prompts], new_tokens))
        for b, row in engine_levels(model, tokenizer, pool, batches, new_tokens, prefix_cache_tokens).items():
            if b not in rows or row["tokens_per_s"] > rows[b]["tokens_per_s"]:
                rows[b] = row
            print(f"{dtype} round {r + 1} B={b}: {row['tokens_per_s']:.1f} tok/s", flush=True)
        print(f"{dtype} round {r + 1} sequential generate: stock {seq:.1f}, packed {seq_packed:.1f} tok/s (best so far)",
              flush=True)
    for row in rows.values():
        row["speedup_vs_sequential"] = row["tokens_per_s"] / seq
    return {"sequential_tokens_per_s": seq, "sequential_packed_tokens_per_s": seq_packed,
            "prefix_cache_tokens": prefix_cache_tokens, "repeat": repeat, "engine": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sequential-prompts", type=int, default=4,
                    help="prompts run through model.generate for the baseline (its rate does not depend on B)")
    ap.add_argument("--prefix-cache-tokens", type=int, default=0, help="the engine's prefix cache (0: off)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of every measurement, baselines included, in rounds; the best is kept (this "
                         "VM's neighbours make single runs vary by up to 30%%)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    results = {d: bench_dtype(getattr(torch, d), args.batches, args.new_tokens, args.sequential_prompts,
                              args.prefix_cache_tokens, args.repeat)
               for d in args.dtypes}
    print("\n| dtype | B | engine tok/s | stock `generate` tok/s | speedup | `generate`, packed linear | TPOT ms | TTFT ms |")
    print("|---|---|---|---|---|---|---|---|")
    for d, res in results.items():
        for b, row in res["engine"].items():
            print(f"| {d} | {b} | {row['tokens_per_s']:.1f} | {res['sequential_tokens_per_s']:.1f} | "
                  f"{row['speedup_vs_sequential']:.1f}x | {res['sequential_packed_tokens_per_s']:.1f} | "
                  f"{row['tpot_ms']:.0f} | {row['ttft_ms']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
