"""Grammar matchers for the rows of a batch: one mask per step for all constrained rows.

`GrammarRows` follows the batch row for row (select, extend, repeat, like the KV batch and the
sampling state). Each step: `mask(scores)` fills the allowed-token bitmasks of every constrained
row in one llguidance call and sets the other tokens to -inf, before temperature, top-k, top-p and
penalties see the scores; after sampling, `advance(ids)` feeds each matcher its row's token and
says which rows completed their grammar (they finish) and which failed (only their request
fails). Free rows cost nothing, and a batch without any constrained row does no mask work at all.

EOS is in a row's mask only where its grammar accepts (llguidance adds the tokenizer's EOS ids
then). Ids past the tokenizer's vocabulary (lm_head padding) are never allowed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import llguidance
import numpy as np
import torch

NEG_INF = float("-inf")


@dataclass
class GrammarStep:
    """What one `advance` did: rows whose grammar is complete, rows whose matcher failed."""

    completed: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


class GrammarRows:
    """One llguidance matcher (or None for a free row) per batch row, in row order."""

    def __init__(self, matchers: list[llguidance.LLMatcher | None], vocab_size: int, tokenizer_vocab: int,
                 executor: llguidance.LLExecutor):
        self.matchers = matchers
        self.vocab_size = vocab_size  # the logits' width (the model's lm_head)
        self.tokenizer_vocab = tokenizer_vocab  # the bitmask's width (llguidance's tokenizer)
        self.executor = executor
        self._words = (tokenizer_vocab + 31) // 32
        self._refresh()

    def __len__(self) -> int:
        return len(self.matchers)

    def _refresh(self) -> None:
        self._pairs = [(i, m) for i, m in enumerate(self.matchers) if m is not None]
        self.constrained = [i for i, _ in self._pairs]

    @property
    def active(self) -> bool:
        """True when at least one row is constrained (only then is there mask work)."""
        return bool(self.constrained)

    # -- batch bookkeeping (kept in step with the KV batch) -------------------------------------------
    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows `keep`, in that order."""
        self.matchers = [self.matchers[i] for i in keep]
        self._refresh()

    def extend(self, other: GrammarRows) -> None:
        """Append the rows of `other` after ours."""
        self.matchers = self.matchers + other.matchers
        self._refresh()

    def repeat(self, counts: Sequence[int]) -> None:
        """Row i becomes counts[i] rows (n > 1, best_of); the copies fork the matcher's state."""
        out: list[llguidance.LLMatcher | None] = []
        for m, k in zip(self.matchers, counts, strict=True):
            out += [m if j == 0 or m is None else m.deep_copy() for j in range(k)]
        self.matchers = out
        self._refresh()

    # -- the step -----------------------------------------------------------------------------------
    def mask(self, scores: torch.Tensor) -> tuple[torch.Tensor, dict[int, str]]:
        """`scores` [B, vocab] with every token a row's grammar forbids at -inf.

        Returns the masked scores (a new tensor; `scores` itself when no row is constrained) and
        {row: error} for rows whose matcher failed; those rows are left unmasked (their request is
        failed by the caller, the others go on).
        """
        if not self.constrained:
            return scores, {}
        bitmask, failed = self.fill()
        return self.apply(scores, bitmask), failed

    def fill(self) -> tuple[torch.Tensor, dict[int, str]]:
        """The [constrained rows, words] int32 bitmask of this step (CPU; one llguidance call).

        Apart from `apply` so that a caller can fill while the model computes the logits: the
        masks depend only on the tokens already consumed.
        """
        bitmask = torch.empty(len(self.constrained), self._words, dtype=torch.int32)
        return bitmask, self._fill(bitmask)

    def apply(self, scores: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """`scores` with the tokens `bitmask` forbids at -inf, on the constrained rows only."""
        rows = self.constrained
        allowed = self._fit(_unpack(bitmask, self.tokenizer_vocab, scores.device))
        # torch.where, not masked_fill: ~2x faster on CPU for [B, 49152] (no per-element branch).
        if len(rows) == scores.shape[0]:
            return torch.where(allowed, scores, NEG_INF)
        idx = torch.tensor(rows, dtype=torch.long, device=scores.device)
        out = scores.clone()
        out[idx] = torch.where(allowed, scores.index_select(0, idx), NEG_INF)
        return out

    def _fit(self, allowed: torch.Tensor) -> torch.Tensor:
        """[k, tokenizer vocab] -> [k, logits width]: ids past the tokenizer (lm_head padding) never."""
        if self.vocab_size <= self.tokenizer_vocab:
            return allowed[:, : self.vocab_size]
        pad = torch.zeros(allowed.shape[0], self.vocab_size - self.tokenizer_vocab, dtype=torch.bool,
                          device=allowed.device)
        return torch.cat([allowed, pad], dim=1)

    def _fill(self, bitmask: torch.Tensor) -> dict[int, str]:
        failed: dict[int, str] = {}
        live = []  # (matcher, bitmask row)
        for k, (i, m) in enumerate(self._pairs):
            if m.is_error():
                failed[i] = m.get_error() or "the grammar matcher failed"
            else:
                live.append((m, k))
        if live:
            self.executor.unsafe_compute_mask_ptr(live, bitmask.data_ptr(), self._words * 4, len(self._pairs))
        nonempty = (bitmask != 0).any(dim=1).tolist()
        for m, k in live:  # a matcher that errs while computing its mask allows nothing
            if m.is_error() or not nonempty[k]:
                failed[self._pairs[k][0]] = m.get_error() or "the grammar allows no token here"
        for k, (i, _) in enumerate(self._pairs):
            if i in failed:
                bitmask[k] = -1  # keep the failing row finite; its request is failed anyway
        return failed

    def advance(self, ids: Sequence[int]) -> GrammarStep:
        """Feed every constrained row its sampled token (host ints, one per row)."""
        step = GrammarStep()
        for i, m in self._pairs:
            if m.is_error():
                continue  # already reported by `mask`
            if not m.consume_token(int(ids[i])):
                step.failed[i] = m.get_error() or f"token {int(ids[i])} is not allowed by the grammar"
            elif m.is_stopped():
                step.completed.append(i)
        return step


def _unpack(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """[k, words] int32 bitmask -> [k, vocab] bool (bit j of word w is token 32*w + j)."""
    if device.type == "cpu":
        # numpy unpacks bits ~10x faster than shifting in torch on CPU; little-endian words.
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :vocab].view(np.bool_))
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    bitmask = bitmask.to(device, non_blocking=True)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]


def grammar_executor(threads: int | None = None) -> llguidance.LLExecutor:
    """llguidance's thread pool for batched mask filling (one per process is enough)."""
    return llguidance.LLExecutor(num_threads=threads)


@functools.cache
def shared_executor() -> llguidance.LLExecutor:
    """The process's one executor (the engine's masks): its threads start on first use only."""
    return grammar_executor()
