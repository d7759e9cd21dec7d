"""Engine benchmark on the embedded SmolLM2 model: batched engine vs sequential `model.generate`.

For each dtype and batch size B, B chat prompts are submitted at once (64 new tokens each, EOS
ignored) and the aggregate output tokens/s is measured, with the time per output token (TPOT) of
each stream. The baseline is `model.generate` run on the same prompts one after the other, in the
same process and run. Usage: `python -m bench.engine_bench [--batches 1 4 16 32] [--dtypes float32 bfloat16]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from serve.engine.engine import Engine, EngineConfig
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


def bench_dtype(dtype: torch.dtype, batches: list[int], new_tokens: int, sequential_prompts: int) -> dict:
    source = resolve_model("/nonexistent", None)
    model, tokenizer = load_model(source, dtype)
    engine = Engine(model, tokenizer, EngineConfig.from_model(model))
    engine.start()
    engine.warmup()
    pool = prompts(tokenizer, max(batches))
    with torch.inference_mode():
        run_sequential(model, pool[:1], 4)  # warm the generate path too
        seq = run_sequential(model, pool[:sequential_prompts], new_tokens)
    rows = {}
    for b in batches:
        rows[b] = run_engine(engine, pool[:b], new_tokens)
        rows[b]["speedup_vs_sequential"] = rows[b]["tokens_per_s"] / seq
        print(f"{dtype} B={b}: {rows[b]}", flush=True)
    engine.shutdown()
    return {"sequential_tokens_per_s": seq, "engine": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sequential-prompts", type=int, default=4,
                    help="prompts run through model.generate for the baseline (its rate does not depend on B)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    results = {d: bench_dtype(getattr(torch, d), args.batches, args.new_tokens, args.sequential_prompts)
               for d in args.dtypes}
    print("\n| dtype | B | engine tok/s | sequential tok/s | speedup | TPOT ms | TTFT ms |")
    print("|---|---|---|---|---|---|---|")
    for d, res in results.items():
        for b, row in res["engine"].items():
            print(f"| {d} | {b} | {row['tokens_per_s']:.1f} | {res['sequential_tokens_per_s']:.1f} | "
                  f"{row['speedup_vs_sequential']:.1f}x | {row['tpot_ms']:.0f} | {row['ttft_ms']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
