"""Where a decode step's time goes, measured inside the running engine (no profiler).

    python -m bench.step_split bfloat16+int4 1      # variant (dtype[+QUANTIZE]) and rows
    python -m bench.step_split bfloat16 16 --kernels

The engine decodes `rows` streams of 48 tokens, three times, with a `perf_counter` around each kind of
call of its forward (serve/engine/decoder.py): the linear layers' matmuls (oneDNN-packed, int8 or
int4), the RMSNorms, the rotary embedding, the KV writes and the paged attention; "rest" is the
forward's time outside them (embedding, residual adds, the MLP's activation, views). A torch.profiler
trace adds its own cost to every call and inflates exactly the small ones this is about; a timer
adds ~1 µs per call.

`--kernels` first times the model's linear layers alone, every layer's matmuls back to back on the
same shapes and weights as one decode step, and reports the rate at which they read the weights:
set against the machine's memory bandwidth, it says whether the matmuls or the rest bound a step.
Then one small operator in three settings: an RMSNorm of the step's rows back to back, right after a
matmul, and after 1 ms idle, which is how much slower the small calls run between the big ones.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from bench.engine_bench import on_own_thread, prompts, run_engine
from serve import cpu_linear, quantize
from serve.engine import decoder
from serve.engine.blocks import BlockPool
from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.model_loading import load_model, resolve_model

MATMULS = ((cpu_linear.PackedLinear, "forward"), (quantize.Int8Linear, "matmul"), (quantize.Int4Linear, "matmul"))
PARTS = ((decoder, "_rms_norm", "rms_norm"), (decoder, "_rotate", "rotary"), (BlockPool, "write", "kv write"),
         (decoder, "paged_attention", "attention"))


def timed(owner: Any, name: str, label: str, spent: dict[str, float], calls: dict[str, int]) -> None:
    """Replace `owner.name` by a copy that adds its time to `spent[label]` and counts its calls."""
    real: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
            calls[label] += 1

    setattr(owner, name, wrapper)


def linears(forward: decoder.Decoder) -> list[torch.nn.Module]:
    """The layers one decode step multiplies by: the fused ones the engine's forward calls, and lm_head."""
    layers = [m for layer in forward.layers for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    layers.append(forward.head)
    return [part for layer in layers for part in getattr(layer, "parts", [layer])]  # a SideBySide's own layers


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights a matmul of `module` reads (its packed copy where it has one)."""
    packed = getattr(module, "packed", None)
    if isinstance(packed, torch.Tensor):
        return packed.numel() * packed.element_size()
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def kernel_rate(forward: decoder.Decoder, rows: int, dtype: torch.dtype) -> str:
    """The linear layers of one decode step alone, back to back: median ms and GB/s of weights read."""
    layers = linears(forward)
    inputs = {n: torch.randn(rows, n, dtype=dtype) for n in {layer.in_features for layer in layers}}
    total = sum(weight_bytes(layer) for layer in layers)
    times = []
    with torch.inference_mode():
        for _ in range(7):
            start = time.perf_counter()
            for layer in layers:
                layer(inputs[layer.in_features])
            times.append(time.perf_counter() - start)
    best = statistics.median(times[2:])
    return (f"{len(layers)} matmuls at {rows} rows alone: {best * 1000:.1f} ms for {total / 1e6:.0f} MB "
            f"of weights, {total / best / 1e9:.1f} GB/s")


def norm_context(forward: decoder.Decoder, rows: int, dtype: torch.dtype) -> str:
    """Mean µs of one RMSNorm of `rows` rows: back to back, right after a matmul, after 1 ms idle."""
    layer = forward.layers[0]
    x = torch.randn(rows, layer.down.in_features, dtype=dtype)
    h = torch.randn(rows, layer.down.out_features, dtype=dtype)

    def mean_us(before: Callable[[], Any], count: int) -> float:
        spent = 0.0
        for _ in range(count):
            before()
            start = time.perf_counter()
            decoder._rms_norm(layer.norm_in, h)
            spent += time.perf_counter() - start
        return spent / count * 1e6

    with torch.inference_mode():
        mean_us(lambda: None, 200)
        alone = mean_us(lambda: None, 1000)
        after_matmul = mean_us(lambda: layer.down(x), 300)
        after_idle = mean_us(lambda: time.sleep(0.001), 300)
    return (f"one RMSNorm of {rows} rows: {alone:.0f} µs back to back, {after_matmul:.0f} µs after a matmul, "
            f"{after_idle:.0f} µs after 1 ms idle")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variant", help="dtype, optionally +QUANTIZE: float32, bfloat16, bfloat16+int4, ...")
    ap.add_argument("rows", type=int)
    ap.add_argument("--kernels", action="store_true", help="also time the linear layers alone")
    args = ap.parse_args()
    dtype_name, _, method = args.variant.partition("+")
    dtype = getattr(torch, dtype_name)
    model, tokenizer = on_own_thread(lambda: load_model(resolve_model("/nonexistent", None), dtype,
                                                        quantize=method or None))
    engine = Engine(model, tokenizer, EngineConfig.from_model(model, prefix_cache_tokens=0))
    assert engine.decoder is not None, "bench.step_split measures the engine's own forward (serve/engine/decoder.py)"
    if args.kernels:  # before the timers go in, on the layers the engine's forward calls
        print(on_own_thread(kernel_rate, engine.decoder, args.rows, dtype), flush=True)
        print(on_own_thread(norm_context, engine.decoder, args.rows, dtype), flush=True)
    spent: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for owner, name in MATMULS:
        timed(owner, name, "matmuls", spent, calls)
    for owner, name, label in PARTS:
        timed(owner, name, label, spent, calls)
    timed(engine, "forward_model", "forward", spent, calls)
    engine.start()
    engine.warmup()
    pool = prompts(tokenizer, args.rows)
    try:
        for _ in range(3):
            spent.clear()
            calls.clear()
            steps = run_engine(engine, pool, 48)
            forwards = calls["forward"]  # one per generated token (the first also prefills)
            parts = {label: spent[label] / forwards * 1000 for label in ["matmuls"] + [p[2] for p in PARTS]}
            forward = spent["forward"] / forwards * 1000
            print(f"TPOT {steps['tpot_ms']:.1f} ms; per forward {forward:.1f} ms: "
                  + ", ".join(f"{label} {ms:.1f}" for label, ms in parts.items())
                  + f", rest {forward - sum(parts.values()):.1f}", flush=True)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
