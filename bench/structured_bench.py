"""Structured-output benchmark: decode throughput of 16 JSON-schema streams vs 16 free ones, same engine.

The embedded SmolLM2 engine (as the server builds it, grammar compiler included) decodes B chat
prompts at once, `--new-tokens` each, in two cases that alternate within each round (so a slow
spell of the shared machine hits both alike): free rows, and rows constrained by a JSON schema
whose answer is longer than `--new-tokens` (an array of at least 40 notes), so that every
constrained row runs its full length, as the free rows do (EOS ignored), and tokens/s compare
like for like. Reported: aggregate output tokens/s and the time per output token (TPOT) of the
best run of each case, the median of the per-round ratios (robust to a slow spell), and the
grammar's own cost per step timed inside the engine: the mask (`SamplingState._mask`: fill, unpack,
-inf) and the matchers' advance (`SequenceState._grammar_complete`, summed over the rows of a step).
Usage: `python -m bench.structured_bench [--rows 16] [--new-tokens 64] [--rounds 3] [--threads N] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.engine_bench import on_own_thread, prompts
from bench.http_bench import NOTES_SCHEMA as NOTES
from serve.config import Settings
from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.engine.grammar import Constraint
from serve.engine.interfaces import eos_ids_of
from serve.engine.request import GenerationRequest, SamplingParams
from serve.engine.sampling import SamplingState
from serve.engine.sequence import SequenceState
from serve.model_loading import load_model, resolve_model
from serve.service import build_grammar_compiler


class Stopwatch:
    """Accumulates the time spent in one method of a class (patched in place for the whole run)."""

    def __init__(self, cls: type, name: str):
        self.seconds, self.calls = 0.0, 0
        original: Callable[..., Any] = getattr(cls, name)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        setattr(cls, name, timed)

    def take(self) -> tuple[float, int]:
        """(seconds, calls) since the last take."""
        out = (self.seconds, self.calls)
        self.seconds, self.calls = 0.0, 0
        return out


def run(engine: Engine, batch: list[list[int]], new_tokens: int, constraint: Constraint | None) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, grammar=constraint)
    start = time.perf_counter()
    handles = [engine.submit(GenerationRequest(p, params)) for p in batch]
    counts = [sum(1 for _ in h) for h in handles]
    elapsed = time.perf_counter() - start
    tpot = [(h.timings.finished - h.timings.first_token) / (c - 1) for h, c in zip(handles, counts) if c > 1]
    return {"tokens": sum(counts), "tokens_per_s": sum(counts) / elapsed, "tpot_ms": 1000 * statistics.mean(tpot)}


def bench(rows: int, new_tokens: int, rounds: int) -> dict:
    source = resolve_model("/nonexistent", None)
    model, tokenizer = on_own_thread(load_model, source, torch.float32)
    grammars = build_grammar_compiler(Settings(), tokenizer, eos_ids_of(model, tokenizer))
    assert grammars is not None
    constraint = Constraint.json_schema(NOTES)
    compile_s = grammars.compile(constraint).seconds
    engine = Engine(model, tokenizer, EngineConfig.from_model(model, prefix_cache_tokens=0), grammars)
    engine.start()
    batch = prompts(tokenizer, rows)
    best: dict[str, dict] = {}
    ratios: list[float] = []
    mask, advance = Stopwatch(SamplingState, "_mask"), Stopwatch(SequenceState, "_grammar_complete")
    mask_ms: list[float] = []
    advance_ms: list[float] = []
    try:
        engine.warmup()
        run(engine, batch[:2], 4, constraint)  # the mask path's first call (executor threads) off the clock
        for r in range(rounds):
            rates = {}
            for name, c in (("free", None), ("json_schema", constraint)):
                mask.take(), advance.take()
                res = run(engine, batch, new_tokens, c)
                rates[name] = res["tokens_per_s"]
                if name not in best or res["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = res
                print(f"round {r + 1} {name}: {res['tokens_per_s']:.1f} tok/s, TPOT {res['tpot_ms']:.1f} ms", flush=True)
            (mask_s, steps), (advance_s, _) = mask.take(), advance.take()
            mask_ms.append(1000 * mask_s / steps)
            advance_ms.append(1000 * advance_s / steps)
            ratios.append(rates["json_schema"] / rates["free"])
    finally:
        engine.shutdown()
        grammars.close()
    free, constrained = best["free"], best["json_schema"]
    return {
        "rows": rows, "new_tokens": new_tokens, "rounds": rounds, "compile_ms": 1000 * compile_s,
        "free": free, "json_schema": constrained,
        "ratio_of_best": constrained["tokens_per_s"] / free["tokens_per_s"],
        "ratio_median_of_rounds": statistics.median(ratios), "ratios": ratios,
        "mask_ms_per_step": statistics.median(mask_ms), "advance_ms_per_step": statistics.median(advance_ms),
        "load_average": os.getloadavg(), "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both cases; the best run of each is kept")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); 1 on a machine whose cores other jobs keep busy, "
                         "where an oversubscribed OpenMP pool makes every step several times slower")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = bench(args.rows, args.new_tokens, args.rounds)
    print("\n| rows | free tok/s | JSON-schema tok/s | ratio of best / median of rounds | TPOT free / schema ms | "
          "mask / advance ms per step |")
    print("|---|---|---|---|---|---|")
    print(f"| {res['rows']} | {res['free']['tokens_per_s']:.1f} | {res['json_schema']['tokens_per_s']:.1f} | "
          f"{100 * res['ratio_of_best']:.0f}% / {100 * res['ratio_median_of_rounds']:.0f}% | "
          f"{res['free']['tpot_ms']:.1f} / {res['json_schema']['tpot_ms']:.1f} | "
          f"{res['mask_ms_per_step']:.2f} / {res['advance_ms_per_step']:.2f} |")
    print(f"load average {res['load_average']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
