"""Helpers for the grammar tests: a byte tokenizer for llguidance, and a small constrained decoder.

The decoder runs a tiny random Llama the plain way (the whole sequence every step, no KV cache) so
that what it tests is the grammar module alone: masks from `GrammarRows` applied to the logits
before temperature, one token sampled per row with its own seeded generator, matchers advanced,
rows dropped as they finish (the batch shrinks with `select`, as the engine's does).
"""

from __future__ import annotations

from dataclasses import dataclass

import llguidance
import torch

from serve.engine.grammar import Constraint
from serve.engine.grammar_batch import GrammarRows

# Valid, and slow to compile (~0.6 s on a quiet EPYC core: the lexer unrolls the count). Not an
# object with thousands of optional properties: those compile, then fail on their first token
# (more than llguidance's 2000 Earley items in a row), so the compiler now refuses them.
SLOW = Constraint.regex("a{200000}")


class ByteTokenizer:
    """256 byte tokens and an EOS (id 256): builds an llguidance tokenizer in milliseconds."""

    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids = [256]

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode())


def byte_tokenizer() -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(ByteTokenizer()))


@dataclass
class Decoded:
    ids: list[int]  # generated ids, EOS excluded
    reason: str  # "grammar" (the matcher completed), "eos" (EOS where the grammar accepts), "length"


def decode(model, rows: GrammarRows, *, temperature: float = 0.0, seeds: list[int] | None = None,
           max_new: int = 160, prompt: tuple[int, ...] = (1, 17, 42, 99), eos: int = 2,
           bias: dict[int, float] | None = None) -> list[Decoded]:
    """Decode every row of `rows` from the same prompt until its grammar completes (or max_new).

    `bias` is added after the mask, as the engine adds `logit_bias`: masked tokens stay at -inf.
    """
    n = len(rows)
    seqs = [list(prompt) for _ in range(n)]
    out = [Decoded([], "length") for _ in range(n)]
    gens = [torch.Generator().manual_seed(s) for s in (seeds or range(n))]
    alive = list(range(n))
    with torch.inference_mode():
        for _ in range(max_new):
            logits = model(torch.tensor([seqs[i] for i in alive]), logits_to_keep=1).logits[:, -1, :].float()
            scores, failed = rows.mask(logits)
            assert not failed, failed
            for token, b in (bias or {}).items():
                scores[:, token] += b
            chosen = _sample(scores, temperature, [gens[i] for i in alive])
            step = rows.advance(chosen)
            assert not step.failed, step.failed
            keep = []
            for k, i in enumerate(alive):
                seqs[i].append(chosen[k])
                if chosen[k] == eos:
                    out[i].reason = "eos"
                    continue
                out[i].ids.append(chosen[k])
                if k in step.completed:
                    out[i].reason = "grammar"
                else:
                    keep.append(k)
            rows.select(keep)
            alive = [alive[k] for k in keep]
            if not alive:
                break
    return out


def _sample(scores: torch.Tensor, temperature: float, gens: list[torch.Generator]) -> list[int]:
    if temperature == 0:
        return scores.argmax(dim=-1).tolist()
    probs = torch.softmax(scores / temperature, dim=-1)
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, gens, strict=True)]
