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

import torch

from bench.engine_bench import on_own_thread, on_transformers_forward, prompts, run_engine
from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.model_loading import load_model, resolve_model


def main() -> None:
    variant, batch = sys.argv[1], int(sys.argv[2])
    pairs = int(sys.argv[3]) if len(sys.argv) > 3 else 6
    dtype, _, quantize = variant.partition("+")
    model, tok = on_own_thread(lambda: load_model(resolve_model("/nonexistent", None), getattr(torch, dtype),
                                                  quantize=quantize or None))
    engine = Engine(model, tok, EngineConfig.from_model(model, prefix_cache_tokens=0))
    own_decoder = engine.decoder
    on_transformers_forward(engine)  # the packed copies the fused layers took, back for transformers' forward
    engine.decoder = own_decoder
    engine.start()
    engine.warmup()
    pool = prompts(tok, batch)
    tpot: dict[str, list[float]] = {"own": [], "transformers": []}
    try:
        for i in range(pairs):
            for name in ("own", "transformers") if i % 2 == 0 else ("transformers", "own"):
                engine.decoder = own_decoder if name == "own" else None  # read by the engine thread per forward
                tpot[name].append(run_engine(engine, pool, 32)["tpot_ms"])
    finally:
        engine.shutdown()
    ratios = [t / o for o, t in zip(tpot["own"], tpot["transformers"], strict=True)]
    print(f"{variant} B={batch}: TPOT ms own {[round(x, 1) for x in tpot['own']]}, "
          f"transformers {[round(x, 1) for x in tpot['transformers']]}")
    print(f"{variant} B={batch}: median TPOT own {statistics.median(tpot['own']):.1f} ms, transformers "
          f"{statistics.median(tpot['transformers']):.1f} ms; transformers/own per pair: median "
          f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")


if __name__ == "__main__":
    main()
