"""What one request's sampling extras cost the whole batch, per step and once at admission.

A batch of B plain greedy rows plus one request of n rows with an extra: a 300-entry `logit_bias`, the
watermark (every previous token already cached, or none of them), or a repetition penalty over a
long prompt. Reported: the time to build the request's sampling state (paid once, in the step that
admits it) and the time of one `sample` over the whole batch, next to the plain batch's; each the best
of its rounds, the cases alternating within a round. No model is run: these are the costs the extras
add to a decode step, whatever the model.
Usage: `python -m bench.extras_bench [--rows 16] [--n 16] [--vocab 49152] [--rounds 20]`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from serve.engine import watermark
from serve.engine.request import SamplingParams
from serve.engine.sampling import SamplingState

CPU = torch.device("cpu")
RESULTS = Path(__file__).parent / "results" / "extras.json"
EXTRAS = {
    "none": {},
    "logit_bias x300": {"logit_bias": {1000 + i: 1.5 for i in range(300)}},
    "watermark (cached)": {"watermark": True},
    "watermark (uncached)": {"watermark": True},
    "repetition, 2000-token prompt": {"repetition_penalty": 1.2},
}


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


class Case:
    """One extra: how to build its request's sampling state, and one step of the batch it joined."""

    def __init__(self, name: str, rows: int, n: int, vocab: int):
        self.name, self.n, self.vocab = name, n, vocab
        self.prompt = list(range(2000)) if "repetition" in name else [1, 2, 3]
        self.params = [SamplingParams(**EXTRAS[name])] * n
        self.histories = [list(self.prompt) for _ in range(n)]
        self.batch = SamplingState([SamplingParams()] * rows, [None] * rows, [[5]] * rows, vocab, CPU)
        self.batch.extend(SamplingState(self.params, [None] * n, self.histories, vocab, CPU))
        self.logits = torch.randn(rows + n, vocab)
        self.steps = 0
        self.step()  # fills the greenlist table for the cached case

    def build(self) -> None:
        SamplingState(self.params, [None] * self.n, [list(self.prompt) for _ in range(self.n)], self.vocab, CPU)

    def step(self) -> None:
        if self.name == "watermark (uncached)":  # a previous token never seen before, in every row
            self.steps += 1
            for k, h in enumerate(self.histories):
                h.append(self.vocab - 1 - (self.steps * self.n + k) % self.vocab)
        self.batch.sample(self.logits)


def measure(cases: list[Case], rounds: int) -> list[dict]:
    """Best of `rounds`, the cases alternating within each round so a slow spell hits them all alike."""
    best = {c.name: [float("inf"), float("inf")] for c in cases}
    for _ in range(rounds):
        for c in cases:
            best[c.name][0] = min(best[c.name][0], timed_ms(c.build))
            best[c.name][1] = min(best[c.name][1], timed_ms(c.step))
    return [{"extra": name, "build_ms": round(b, 2), "step_ms": round(st, 2)} for name, (b, st) in best.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16, help="plain rows already in the batch")
    parser.add_argument("--n", type=int, default=16, help="rows of the request with the extra")
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    watermark._tables.clear()
    results = measure([Case(name, args.rows, args.n, args.vocab) for name in EXTRAS], args.rounds)
    for r in results:
        print(f"{r['extra']:32s} build {r['build_ms']:8.2f} ms   step {r['step_ms']:8.2f} ms")
    RESULTS.write_text(json.dumps({"args": vars(args), "torch_threads": torch.get_num_threads(), "results": results},
                                  indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
