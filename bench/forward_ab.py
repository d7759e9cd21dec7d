"""A/B of the engine's own forward (serve/engine/decoder.py) against the model's transformers forward.

One engine on the embedded model, loaded as the server loads it ("bfloat16", "float32",
"bfloat16+int4", ...); B chat prompts decode 32 tokens each (EOS ignored), alternately through the
engine's forward and through transformers' (the engine's `decoder` unset), in pairs whose order
flips each time, so a slow spell of the machine hits both alike. Prints each run's mean time per
output token and the median of the per-pair ratios (transformers / own: above 1, ours is faster).
Usage: `python -m bench.forward_ab bfloat16+int4 1 [pairs]`.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import torch

from bench.engine_bench import on_own_thread, on_transformers_forward, prompts, run_engine
from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.model_loading import load_model, resolve_model


def engine_for(variant: str) -> tuple[Engine, Any]:
    """An engine (not started) on the embedded model loaded as `variant` says ("bfloat16+int4"), and its tokenizer."""
    dtype, _, quantize = variant.partition("+")
    model, tok = on_own_thread(lambda: load_model(resolve_model("/nonexistent", None), getattr(torch, dtype),
                                                  quantize=quantize or None))
    return Engine(model, tok, EngineConfig.from_model(model, prefix_cache_tokens=0)), tok


def alternate(engine: Engine, pool: list[list[int]], forwards: dict[str, Any], pairs: int) -> dict[str, list[float]]:
    """Time per output token of `pool` (32 tokens each) through each of two forwards (values for the
    engine's `decoder`, which its thread reads per forward), in pairs whose order flips each time."""
    names = list(forwards)
    tpot: dict[str, list[float]] = {name: [] for name in names}
    engine.start()
    try:
        engine.warmup()
        for i in range(pairs):
            for name in names if i % 2 == 0 else names[::-1]:
                engine.decoder = forwards[name]
                tpot[name].append(run_engine(engine, pool, 32)["tpot_ms"])
    finally:
        engine.shutdown()
    return tpot


def report(label: str, tpot: dict[str, list[float]]) -> None:
    """Each run's time per token, and the per-pair ratios of the first forward's time to the second's."""
    (a, first), (b, second) = tpot.items()
    ratios = [x / y for x, y in zip(first, second, strict=True)]
    print(f"{label}: TPOT ms {a} {[round(x, 1) for x in first]}, {b} {[round(x, 1) for x in second]}; median "
          f"{statistics.median(first):.1f} -> {statistics.median(second):.1f} ms; {a}/{b} per pair: median "
          f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")


def main() -> None:
    variant, batch = sys.argv[1], int(sys.argv[2])
    pairs = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    engine, tok = engine_for(variant)
    own = engine.decoder
    on_transformers_forward(engine)  # the packed copies the fused layers took, back for transformers' forward
    tpot = alternate(engine, prompts(tok, batch), {"transformers": None, "own": own}, pairs)
    report(f"{variant} B={batch}", tpot)


if __name__ == "__main__":
    main()
