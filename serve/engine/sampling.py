"""Logits processing and sampling, vectorised over the batch with per-row parameters.

Every parameter is a [B] tensor (or a [B, V] one for counts and biases), so one step costs the same
few kernels whatever mix of requests shares the batch. Each row draws its random number from its own
`torch.Generator`, so a seeded request samples the same tokens alone or beside others.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from serve.engine.grammar_batch import GrammarRows, shared_executor
from serve.engine.request import SamplingParams
from serve.engine.rows import build_rows
from serve.engine.watermark import WATERMARK_DELTA, greenlists_for

if TYPE_CHECKING:
    import llguidance

log = logging.getLogger(__name__)
NEG_INF = float("-inf")


class GrammarFailure(RuntimeError):
    """A row's grammar matcher failed while computing its mask: only that row's request fails."""


@dataclass
class SampleResult:
    """Chosen token per row, its raw logprob, optional top-n, and rows whose processing raised."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None
    failed: dict[int, Exception]


class SamplingState:
    """Sampling parameters and token statistics for the rows of a batch, in row order."""

    def __init__(self, params: list[SamplingParams], seeds: list[int | None], histories: list[list[int]],
                 vocab_size: int, device: torch.device,
                 matchers: Sequence[llguidance.LLMatcher | None] | None = None, grammar_vocab: int = 0):
        """`matchers`: each row's grammar matcher or None; `grammar_vocab`: the width of their masks
        (the llguidance tokenizer's vocabulary, which may be narrower than the logits)."""
        self.vocab_size, self.device = vocab_size, device
        self.grammar_vocab = grammar_vocab
        self.rows = build_rows(params, seeds, histories, vocab_size, device, matchers)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def params(self) -> list[SamplingParams]:
        return self.rows.params

    @property
    def top_n(self) -> int:
        """The widest top-n any row asked for (one topk serves all)."""
        return max((p.top_n_tokens for p in self.rows.params), default=0)

    # -- batch bookkeeping (kept in step with the KV batch) -----------------------------------
    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows `keep`, in that order."""
        self.rows = self.rows.select(keep)

    def extend(self, other: SamplingState) -> None:
        """Append the rows of `other` after ours."""
        self.rows = self.rows.extend(other.rows)

    def subset(self, keep: Sequence[int]) -> SamplingState:
        """A new state over rows `keep`; this one is untouched."""
        part = copy.copy(self)
        part.select(keep)
        return part

    # -- the step ------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor) -> SampleResult:
        """Process [B, V] logits row-wise and choose one token per row."""
        logits = logits.float()
        raw = torch.log_softmax(logits, dim=-1)
        scores, failed = self._process(logits)
        ids = self._choose(scores)
        chosen = raw.gather(1, ids.unsqueeze(1)).squeeze(1)
        top_ids = top_lp = None
        if self.top_n:
            top_lp, top_ids = torch.topk(raw, self.top_n, dim=-1)
        return SampleResult(ids, chosen, top_ids, top_lp, failed)

    def observe(self, ids: torch.Tensor) -> None:
        """Record the tokens just chosen, for the penalties of the next step.

        `ids` always lie in [0, vocab) (an argmax, a clamped search, or 0 for a row that failed), so
        no row can make this raise for the others.
        """
        rows, ids2 = self.rows, ids.unsqueeze(1)
        if rows.counts is not None:
            rows.counts.scatter_add_(1, ids2, torch.ones_like(ids2, dtype=rows.counts.dtype))
        if rows.seen is not None:
            rows.seen.scatter_(1, ids2, True)

    def _process(self, logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, Exception]]:
        """The grammar mask first, then TGI's order: watermark, repetition penalty, OpenAI penalties and
        bias, then per-request processors (a masked token stays at -inf through all of them)."""
        r = self.rows
        scores, failed = self._mask(logits)
        if any(p.watermark for p in r.params):
            scores = self._watermark(scores)
        if r.seen is not None:
            rep = r.repetition.unsqueeze(1)
            scores = torch.where(r.seen, torch.where(scores > 0, scores / rep, scores * rep), scores)
        if r.counts is not None:
            scores = scores - r.frequency.unsqueeze(1) * r.counts
            scores = scores - r.presence.unsqueeze(1) * (r.counts > 0).float()
        if r.bias is not None:
            scores = scores + r.bias
        for i, p in enumerate(r.params):
            for proc in p.logits_processors:
                try:
                    scores[i] = proc(r.histories[i], scores[i])
                except Exception as exc:  # one request's processor must not fail its neighbours
                    log.warning("logits processor failed for row %d: %r", i, exc)
                    failed[i] = exc
        return scores, failed

    def _mask(self, logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, Exception]]:
        """Every token a constrained row's grammar forbids at -inf (one llguidance call for all rows)."""
        matchers = self.rows.matchers
        if not any(m is not None for m in matchers):
            return logits, {}
        grammar = GrammarRows(matchers, self.vocab_size, self.grammar_vocab, shared_executor())
        scores, broken = grammar.mask(logits)
        return scores, {i: GrammarFailure(f"the grammar failed: {message}") for i, message in broken.items()}

    def _watermark(self, scores: torch.Tensor) -> torch.Tensor:
        """Add delta to each watermarked row's greenlist (one gather of cached masks, one multiply-add)."""
        r = self.rows
        marked = [i for i, p in enumerate(r.params) if p.watermark]
        masks = greenlists_for(self.device, scores.shape[-1]).masks([r.histories[i][-1] for i in marked])
        idx = torch.tensor(marked, dtype=torch.long, device=scores.device)
        return scores.index_add(0, idx, masks.to(scores.dtype), alpha=WATERMARK_DELTA)

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        r = self.rows
        greedy_ids = scores.argmax(dim=-1)
        flags = [p.greedy for p in r.params]  # host-side flags: no device sync to branch on
        if all(flags):
            return greedy_ids
        scores = self._warp(scores / r.temperature.unsqueeze(1))
        probs = torch.softmax(scores, dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = torch.stack([
            torch.zeros((), device=self.device) if greedy else torch.rand((), generator=g, device=self.device)
            for g, greedy in zip(r.generators, flags, strict=True)
        ])
        # The first token whose cumulative mass exceeds the target: `right=True`, so that u == 0 never
        # picks a zero-probability (masked) token at the head; the target stays strictly below the
        # total, so that rounding never runs past the last token with mass.
        total = cdf[:, -1:]
        target = torch.minimum(u.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
        sampled = torch.searchsorted(cdf, target, right=True).squeeze(1)
        sampled = sampled.clamp_(max=self.vocab_size - 1)
        return torch.where(r.greedy, greedy_ids, sampled)

    def _warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k, then top-p, then typical-p, each a no-op on rows that did not ask for it."""
        sampling = [p for p in self.rows.params if not p.greedy]
        ks = [p.top_k for p in self.rows.params if 0 < p.top_k < self.vocab_size]
        if ks and sampling:
            kmax = max(ks)  # one topk of the largest k serves every row; rows without top-k keep all
            top = torch.topk(scores, kmax, dim=-1).values
            kth = top.gather(1, (self.rows.top_k.clamp(max=kmax) - 1).unsqueeze(1))
            kth = kth.masked_fill((self.rows.top_k >= self.vocab_size).unsqueeze(1), NEG_INF)
            scores = scores.masked_fill(scores < kth, NEG_INF)
        if any(p.top_p < 1.0 for p in sampling):
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            p = torch.softmax(sorted_scores, dim=-1)
            mass_before = p.cumsum(dim=-1) - p
            drop = (mass_before > self.rows.top_p.unsqueeze(1)) & (self.rows.top_p < 1.0).unsqueeze(1)
            scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), NEG_INF)
        if any(p.typical_p < 1.0 for p in sampling):
            scores = self._typical(scores)
        return scores

    def _typical(self, scores: torch.Tensor) -> torch.Tensor:
        # Locally typical sampling (Meister et al.), as transformers' TypicalLogitsWarper, per row.
        logp = torch.log_softmax(scores, dim=-1)
        p = logp.exp()
        entropy = -(logp * p).nansum(dim=-1, keepdim=True)
        shifted = (-logp - entropy).abs()
        sorted_shift, order = torch.sort(shifted, dim=-1)
        cumulative = scores.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < self.rows.typical_p.unsqueeze(1)).sum(dim=1).clamp(max=self.vocab_size - 1)
        drop_sorted = sorted_shift > sorted_shift.gather(1, last.unsqueeze(1))
        drop_sorted &= (self.rows.typical_p < 1.0).unsqueeze(1)
        return scores.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), NEG_INF)


def sample_rowwise(sampling: SamplingState, logits: torch.Tensor) -> SampleResult:
    """Sample each row alone, so that a row whose processing raises fails by itself."""
    parts: list[SampleResult | None] = []
    failed: dict[int, Exception] = {}
    for i in range(len(sampling)):
        try:
            parts.append(sampling.subset([i]).sample(logits[i : i + 1]))
        except Exception as exc:
            failed[i] = exc
            parts.append(None)
    zero = torch.zeros(1, dtype=torch.long, device=logits.device)
    ids = torch.cat([p.ids if p else zero for p in parts])
    lps = torch.cat([p.logprobs if p else zero.float() for p in parts])
    top_ids = top_lp = None
    width = max((p.top_ids.shape[1] for p in parts if p is not None and p.top_ids is not None), default=0)
    if width:
        top_ids = torch.zeros(len(parts), width, dtype=torch.long, device=logits.device)
        top_lp = torch.zeros(len(parts), width, device=logits.device)
        for i, p in enumerate(parts):
            if p is not None and p.top_ids is not None and p.top_logprobs is not None:
                top_ids[i, : p.top_ids.shape[1]], top_lp[i, : p.top_ids.shape[1]] = p.top_ids[0], p.top_logprobs[0]
    for i, p in enumerate(parts):
        if p is not None and p.failed:  # a logits processor of that one row raised
            failed[i] = next(iter(p.failed.values()))
    return SampleResult(ids, lps, top_ids, top_lp, failed)
