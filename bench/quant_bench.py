"""Quantized weights on the CPU (QUANTIZE=int8 / int4): speed and quality next to the float model.

Each variant is the embedded SmolLM2 loaded as the server loads it, in a dtype, with or without
`QUANTIZE` ("bfloat16", "float32", "bfloat16+int8", "float32+int4", ...); a variant ending in
"@transformers" runs the model's transformers forward instead of the engine's own
(serve/engine/decoder.py), on the same loaded weights. Speed: the engine at
B=1 and B=16 (64 new tokens each, EOS ignored; tokens/s and time per output token), in rounds that
alternate the variants so a slow spell of the machine hits them alike; the best round is kept.
Quality, against the first variant (the reference, unquantized):
- the greedy answers to a fixed set of chat prompts, printed whole, so they can be read;
- the mean log-probability gap: the reference's greedy answers are scored token by token by each
  variant (teacher forcing), and the gap is the reference's mean logprob minus the variant's;
- top-1 agreement: how often the variant's most likely next token is the reference's, along them.
Usage: `python -m bench.quant_bench [--variants bfloat16 bfloat16+int8 bfloat16+int4 float32]`.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from bench.engine_bench import engine_levels, on_own_thread, on_transformers_forward, prompts
from serve.engine.config import EngineConfig
from serve.engine.engine import Engine
from serve.engine.request import GenerationRequest, SamplingParams, TokenEvent
from serve.model_loading import load_model, resolve_model

QUESTIONS = ["What is the capital of France?", "Give me three tips for staying healthy.",
             "Explain photosynthesis in one paragraph.", "Write a haiku about the sea.",
             "What is 12 times 7?", "Translate 'good morning' into Spanish."]
ANSWER_TOKENS = 48


def load(variant: str):
    """(model, tokenizer) for "dtype" or "dtype+quantize"."""
    dtype, _, quantize = variant.partition("@")[0].partition("+")
    return on_own_thread(lambda: load_model(resolve_model("/nonexistent", None), getattr(torch, dtype),
                                            quantize=quantize or None))


def answers(model, tokenizer, own_forward: bool = True) -> list[list[int]]:
    """Greedy answers (token ids) to QUESTIONS, from the engine."""
    engine = Engine(model, tokenizer, EngineConfig.from_model(model, prefix_cache_tokens=0))
    if not own_forward:
        on_transformers_forward(engine)
    engine.start()
    try:
        out = []
        for q in QUESTIONS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
            handle = engine.submit(GenerationRequest(list(ids), SamplingParams(max_new_tokens=ANSWER_TOKENS)))
            out.append([e.token.id for e in handle if isinstance(e, TokenEvent)])
        return out
    finally:
        engine.shutdown()


def scores(model, tokenizer, reference: list[list[int]]) -> tuple[list[float], float]:
    """Each reference answer's mean logprob under `model`, and the top-1 agreement along them."""
    means, agree, total = [], 0, 0
    with torch.inference_mode():
        for q, answer in zip(QUESTIONS, reference, strict=True):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
            ids = torch.tensor([list(prompt) + answer])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            target = torch.tensor(answer)
            means.append(logits.log_softmax(-1).gather(1, target[:, None]).mean().item())
            agree += int((logits.argmax(-1) == target).sum())
            total += len(answer)
    return means, agree / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["bfloat16", "bfloat16+int8", "bfloat16+int4", "float32"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="bench/results/quant.json")
    args = ap.parse_args()
    loaded: dict[str, tuple] = {}
    for v in args.variants:  # "x@transformers" shares x's weights
        base = v.partition("@")[0]
        if base not in loaded:
            loaded[base] = load(base)
    models = {v: loaded[v.partition("@")[0]] for v in args.variants}
    own = {v: not v.endswith("@transformers") for v in args.variants}
    pool = prompts(next(iter(models.values()))[1], max(args.batches))
    speed: dict[str, dict[int, dict]] = {v: {} for v in args.variants}
    for r in range(args.repeat):
        for v, (model, tok) in models.items():
            for b, row in engine_levels(model, tok, pool, args.batches, args.new_tokens, 0, own[v]).items():
                if b not in speed[v] or row["tokens_per_s"] > speed[v][b]["tokens_per_s"]:
                    speed[v][b] = row
                print(f"round {r + 1} {v} B={b}: {row['tokens_per_s']:.1f} tok/s, TPOT {row['tpot_ms']:.0f} ms",
                      flush=True)
    reference_model, tok = models[args.variants[0]]
    reference = on_own_thread(answers, reference_model, tok, own[args.variants[0]])
    ref_means, _ = on_own_thread(scores, reference_model, tok, reference)
    quality = {}
    for v, (model, tok) in models.items():
        texts = on_own_thread(answers, model, tok, own[v])
        means, agree = on_own_thread(scores, model, tok, reference)
        gap = statistics.mean(r - m for r, m in zip(ref_means, means, strict=True))
        quality[v] = {"answers": [tok.decode(a, skip_special_tokens=True) for a in texts],
                      "mean_logprob": statistics.mean(means), "logprob_gap": gap, "top1_agreement": agree}
    result = {"cpu": platform.processor() or platform.machine(), "speed": speed, "quality": quality,
              "reference": args.variants[0], "questions": QUESTIONS}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| variant | B=1 tok/s | B=1 TPOT ms | B=16 tok/s | B=16 TPOT ms | logprob gap | top-1 agreement |")
    print("|---|---|---|---|---|---|---|")
    for v in args.variants:
        s, q = speed[v], quality[v]
        cells = [f"{s[b]['tokens_per_s']:.1f} | {s[b]['tpot_ms']:.0f}" for b in args.batches]
        print(f"| {v} | {' | '.join(cells)} | {q['logprob_gap']:.3f} | {100 * q['top1_agreement']:.1f}% |")
    for v in args.variants:
        print(f"\n{v}:")
        for question, text in zip(QUESTIONS, quality[v]["answers"], strict=True):
            print(f"  Q: {question}\n  A: {text!r}")


if __name__ == "__main__":
    main()
