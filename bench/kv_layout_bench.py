"""Decode attention of one layer, SmolLM2's shapes: a left-padded slab vs the engine's block pool.

The slab is the layout the engine had before its block pool: every row padded to the longest row's
columns, attention read straight from the slab (SDPA over [B, H, T, D] with a padding mask). The
pool is the engine's own code (blocks.py, paged.py): rows grouped by length, each group's blocks
gathered, one SDPA per group. Variants alternate within each round (the machine may be shared and
noisy) and each figure is the best round, in thread CPU milliseconds per layer per step.
Usage: `python -m bench.kv_layout_bench [--threads 1] [--rounds 5]`.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from serve.engine.blocks import BlockPool
from serve.engine.config import MIN_ATTENTION_TOKENS
from serve.engine.paged import build_layout, paged_attention

HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16  # SmolLM2-135M


def slab_step(lengths: list[int]) -> Callable[[], torch.Tensor]:
    """One decode step's attention over a left-padded slab (rows padded to the longest)."""
    rows, width = len(lengths), max(lengths) + 1
    keys, values = torch.randn(rows, KV_HEADS, width, DIM), torch.randn(rows, KV_HEADS, width, DIM)
    mask = torch.zeros(rows, 1, 1, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, ..., width - n - 1 :] = True
    query = torch.randn(rows, KV_HEADS, HEADS // KV_HEADS, DIM)
    return lambda: F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)


def pool_step(lengths: list[int]) -> Callable[[], torch.Tensor]:
    """One decode step's attention through the engine's pool and attention function."""
    blocks = [-(-(n + 1) // BLOCK) for n in lengths]
    pool = BlockPool(sum(blocks), BLOCK, 1, KV_HEADS, DIM)
    order = random.Random(0).sample(range(sum(blocks)), sum(blocks))  # blocks scattered in the pool
    tables = [order[sum(blocks[:i]) : sum(blocks[: i + 1])] for i in range(len(lengths))]
    pool.layer(0, torch.zeros(1)).normal_()
    layout = build_layout(pool, tables, lengths, [1] * len(lengths), MIN_ATTENTION_TOKENS, torch.device("cpu"))
    query = torch.randn(1, HEADS, len(lengths), DIM)  # the packed queries of one decode step
    module = SimpleNamespace(layer_idx=0)
    return lambda: paged_attention(module, query, None, None, None, scaling=DIM ** -0.5, paged_kv=layout)[0]


def cases() -> dict[str, list[int]]:
    rng = random.Random(1)
    out = {}
    for b in (16, 64):
        short = [rng.randint(40, 250) for _ in range(b)]
        out[f"B={b} short (40-250)"] = short
        out[f"B={b} long (1000-1100)"] = [rng.randint(1000, 1100) for _ in range(b)]
        out[f"B={b} mixed (one 4000 + short)"] = [4000] + short[1:]
    return out


def cpu_ms(fn: Callable[[], torch.Tensor], repeat: int = 10) -> float:
    fn()
    start = time.thread_time()
    for _ in range(repeat):
        fn()
    return (time.thread_time() - start) / repeat * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| case | slab ms/layer | block pool ms/layer | pool / slab |\n|---|---|---|---|")
    with torch.inference_mode():
        for name, lengths in cases().items():
            steps = {"slab": slab_step(lengths), "pool": pool_step(lengths)}
            best = {k: float("inf") for k in steps}
            for r in range(args.rounds):
                for k in (list(steps) if r % 2 == 0 else list(reversed(steps))):
                    best[k] = min(best[k], cpu_ms(steps[k]))
            print(f"| {name} | {best['slab']:.2f} | {best['pool']:.2f} | {best['pool'] / best['slab']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
