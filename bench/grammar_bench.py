"""Grammar benchmark on the embedded SmolLM2 tokenizer: compile times and the per-step mask cost.

Compile: llguidance's tokenizer view (once per process), a realistic JSON schema cold and cached,
a two-tool call grammar, and the schema that hung TGI (issue 2681).
Mask: B rows each constrained by the realistic schema, every row at a different point of a valid
answer; one step = `GrammarRows.mask` over [B, 49152] logits (`fill`: the bitmasks, one llguidance call;
`apply`: unpack and -inf) and `advance` (each matcher consumes its row's next token). Reported per step, for B = 1, 16, 32, with llguidance's
executor on 1 and 2 threads, plus a batch of free rows (the cost every unconstrained step pays).
For scale: a batch-16 fp32 decode step of SmolLM2 takes ~70-80 ms on this machine (README).
Usage: `python -m bench.grammar_bench [--batches 1 16 32] [--steps 200] [--rounds 3] [--out FILE]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from serve.engine.grammar import Constraint, grammar_tokenizer
from serve.engine.grammar_batch import GrammarRows, grammar_executor
from serve.engine.grammar_pool import GrammarCompiler
from serve.model_loading import EMBEDDED_GGUF, embedded_model_dir
from serve.protocol.structured import StructuredFields
from serve.structured.tools import plan_tools

INVOICE = {
    "type": "object",
    "properties": {
        "invoice_id": {"type": "string", "pattern": "^INV-[0-9]{6}$"},
        "customer": {"type": "object", "properties": {
            "name": {"type": "string"}, "email": {"type": "string"},
            "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                         "country": {"enum": ["FR", "DE", "US", "GB"]}},
                        "required": ["city", "country"], "additionalProperties": False}},
            "required": ["name"], "additionalProperties": False},
        "lines": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
            "unit_price": {"type": "number"}}, "required": ["sku", "quantity", "unit_price"],
            "additionalProperties": False}},
        "paid": {"type": "boolean"},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["invoice_id", "customer", "lines", "paid"],
    "additionalProperties": False,
}
ANSWERS = [
    {"invoice_id": "INV-000042", "customer": {"name": "Ada Lovelace", "email": "ada@example.com", "address": {
        "street": "12 St James's Square", "city": "London", "country": "GB"}},
     "lines": [{"sku": "BK-001", "quantity": 2, "unit_price": 19.5}, {"sku": "PEN-7", "quantity": 10,
                                                                       "unit_price": 1.25}],
     "paid": True, "notes": "Deliver before noon, please."},
    {"invoice_id": "INV-123456", "customer": {"name": "Jean Dupont", "address": {"city": "Lyon", "country": "FR"}},
     "lines": [{"sku": "CHAIR-OAK", "quantity": 4, "unit_price": 89.0}], "paid": False, "notes": None},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}},
        "required": ["query"]}}}]
TGI_2681 = {"type": "object", "properties": {c: {"type": "array", "items": {"type": "string"}} for c in "abcdefghijkl"}}


def timed(fn) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compile_times(tokenizer) -> dict[str, float]:
    lltok, tok_s = timed(lambda: grammar_tokenizer(tokenizer, {tokenizer.eos_token_id}))
    compiler = GrammarCompiler(lltok, workers=1)
    tools = StructuredFields.model_validate({"tools": TOOLS})
    out = {"tokenizer_view_ms": 1e3 * tok_s}
    for name, constraint in [("invoice_schema", Constraint.json_schema(INVOICE)),
                             ("two_tools_auto", plan_tools(tools.tools, None).constraint),
                             ("tgi_2681_schema", Constraint.json_schema(TGI_2681)),
                             ("json_object", Constraint.json_object())]:
        grammar, cold = timed(lambda c=constraint: compiler.compile(c))
        _, cached = timed(lambda c=constraint: compiler.compile(c))
        out[f"{name}_cold_ms"] = 1e3 * cold
        out[f"{name}_compile_ms"] = 1e3 * grammar.seconds  # on the worker, without the handoff
        out[f"{name}_cached_ms"] = 1e3 * cached
    compiler.close()
    return out


def answer_tokens(tokenizer) -> list[list[int]]:
    return [tokenizer(json.dumps(a, separators=(",", ":")), add_special_tokens=False)["input_ids"] for a in ANSWERS]


def mask_steps(grammar, answers, batch: int, steps: int, threads: int, vocab: int,
               free: bool = False) -> list[tuple[float, ...]]:
    """Seconds per step (mask + advance) for `batch` rows walking through valid answers."""
    executor = grammar_executor(threads)
    plans = [(answers[i % len(answers)], (7 * i) % len(answers[i % len(answers)])) for i in range(batch)]
    matchers = []
    for ids, offset in plans:
        m = grammar.new_matcher()
        assert m.consume_tokens(ids[:offset]), m.get_error()
        matchers.append(m)
    rows = GrammarRows([None] * batch if free else matchers, vocab, vocab, executor)
    positions = [offset for _, offset in plans]
    logits = torch.randn(batch, vocab)
    times = []
    for _ in range(steps):
        next_ids = []
        for k, (ids, _) in enumerate(plans):
            if positions[k] >= len(ids):  # this row finished its answer: start it over
                rows.matchers[k] = None if free else grammar.new_matcher()
                rows.select(range(batch))  # rebuilds the row bookkeeping around the new matcher
                positions[k] = 0
            next_ids.append(ids[positions[k]])
            positions[k] += 1
        t0 = time.perf_counter()
        if rows.active:
            bitmask, failed = rows.fill()
            t1 = time.perf_counter()
            rows.apply(logits, bitmask)
        else:
            failed, t1 = {}, t0
            rows.mask(logits)
        t2 = time.perf_counter()
        step = rows.advance(next_ids)
        t3 = time.perf_counter()
        times.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
        assert not failed and not step.failed, (failed, step.failed)
    return times


def summary(times: list[tuple[float, ...]]) -> dict[str, float]:
    """Per step: total mean/p50/p90, and the mean of each part (fill, apply, advance)."""
    ms = sorted(1e3 * t[0] for t in times)
    parts = {f"{name}_mean_ms": 1e3 * statistics.mean(t[i] for t in times)
             for i, name in enumerate(("fill", "apply", "advance"), start=1)}
    return {"mean_ms": statistics.mean(ms), "p50_ms": ms[len(ms) // 2], "p90_ms": ms[int(len(ms) * 0.9)], **parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the bench measures llguidance and the mask, not torch's thread pool
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(), gguf_file=EMBEDDED_GGUF)
    vocab = len(tokenizer)
    rounds = [compile_times(tokenizer) for _ in range(args.rounds)]
    results: dict[str, Any] = {"compile_best": {k: min(r[k] for r in rounds) for k in rounds[0]}, "mask": []}
    compiler = GrammarCompiler.for_tokenizer(tokenizer, {tokenizer.eos_token_id})
    grammar = compiler.compile(Constraint.json_schema(INVOICE))
    answers = answer_tokens(tokenizer)
    for batch in args.batches:
        for threads in args.threads:
            best = min((summary(mask_steps(grammar, answers, batch, args.steps, threads, vocab))
                        for _ in range(args.rounds)), key=lambda s: s["mean_ms"])
            results["mask"].append({"batch": batch, "threads": threads, **best})
        free = summary(mask_steps(grammar, answers, batch, args.steps, 1, vocab, free=True))
        results["mask"].append({"batch": batch, "threads": 0, "free_rows": True, **free})
    compiler.close()
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
