"""Logits processing and sampling, vectorised over the batch with per-row parameters.

Every parameter is a [B] tensor (or a [B, V] one for counts and biases), so one step costs the same
few kernels whatever mix of requests shares the batch. Each row draws its random number from its own
`torch.Generator`, so a seeded request samples the same tokens alone or beside others.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from serve.engine.request import SamplingParams

log = logging.getLogger(__name__)
NEG_INF = float("-inf")


@dataclass
class SampleResult:
    """Chosen token per row, its raw logprob, optional top-n, and rows whose processing raised."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None
    failed: dict[int, BaseException]


class SamplingState:
    """Sampling parameters and token statistics for the rows of a batch, in row order."""

    def __init__(self, params: list[SamplingParams], seeds: list[int | None], histories: list[list[int]],
                 vocab_size: int, device: torch.device):
        self.vocab_size, self.device = vocab_size, device
        self.params, self.histories = params, histories  # histories: prompt + output ids, shared lists
        self.generators = [self._generator(s) for s in seeds]
        f32 = {"dtype": torch.float32, "device": device}
        self.greedy = torch.tensor([p.greedy for p in params], dtype=torch.bool, device=device)
        self.temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], **f32)
        self.top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab_size for p in params], device=device)
        self.top_p = torch.tensor([p.top_p for p in params], **f32)
        self.typical_p = torch.tensor([p.typical_p for p in params], **f32)
        self.repetition = torch.tensor([p.repetition_penalty for p in params], **f32)
        self.frequency = torch.tensor([p.frequency_penalty for p in params], **f32)
        self.presence = torch.tensor([p.presence_penalty for p in params], **f32)
        self.top_n = max((p.top_n_tokens for p in params), default=0)
        self.counts = self.seen = self.bias = None
        if any(p.frequency_penalty or p.presence_penalty for p in params):
            self.counts = torch.zeros(len(params), vocab_size, **f32)  # output tokens only (OpenAI)
        if any(p.repetition_penalty != 1.0 for p in params):
            self.seen = torch.zeros(len(params), vocab_size, dtype=torch.bool, device=device)
            for i, h in enumerate(histories):  # prompt and output (HF/TGI)
                self.seen[i, torch.tensor(h, dtype=torch.long, device=device)] = True
        if any(p.logit_bias for p in params):
            self.bias = torch.zeros(len(params), vocab_size, **f32)
            for i, p in enumerate(params):
                for tok, b in p.logit_bias.items():
                    self.bias[i, tok] = b

    def _generator(self, seed: int | None) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else random.getrandbits(63))
        return gen

    def __len__(self) -> int:
        return len(self.params)

    # -- batch bookkeeping (kept in step with the KV batch) -----------------------------------
    _ROW_TENSORS = ("greedy", "temperature", "top_k", "top_p", "typical_p", "repetition", "frequency", "presence")
    _STAT_TENSORS = ("counts", "seen", "bias")

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows `keep`, in that order."""
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.device)
        for name in self._ROW_TENSORS + self._STAT_TENSORS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx))
        self.params = [self.params[i] for i in keep]
        self.histories = [self.histories[i] for i in keep]
        self.generators = [self.generators[i] for i in keep]
        self.top_n = max((p.top_n_tokens for p in self.params), default=0)

    def extend(self, other: SamplingState) -> None:
        """Append the rows of `other` after ours."""
        for name in self._ROW_TENSORS:
            setattr(self, name, torch.cat([getattr(self, name), getattr(other, name)]))
        for name in self._STAT_TENSORS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is None and theirs is None:
                continue
            if mine is None:
                mine = torch.zeros(len(self), self.vocab_size, dtype=theirs.dtype, device=self.device)
            if theirs is None:
                theirs = torch.zeros(len(other), self.vocab_size, dtype=mine.dtype, device=self.device)
            setattr(self, name, torch.cat([mine, theirs]))
        self.params += other.params
        self.histories += other.histories
        self.generators += other.generators
        self.top_n = max(self.top_n, other.top_n)

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
        """Record the tokens just chosen, for the penalties of the next step."""
        rows = ids.unsqueeze(1)
        if self.counts is not None:
            self.counts.scatter_add_(1, rows, torch.ones_like(rows, dtype=self.counts.dtype))
        if self.seen is not None:
            self.seen.scatter_(1, rows, True)

    def _process(self, logits: torch.Tensor) -> tuple[torch.Tensor, dict[int, BaseException]]:
        scores = logits
        if self.seen is not None:
            rep = self.repetition.unsqueeze(1)
            scores = torch.where(self.seen, torch.where(scores > 0, scores / rep, scores * rep), scores)
        if self.counts is not None:
            scores = scores - self.frequency.unsqueeze(1) * self.counts
            scores = scores - self.presence.unsqueeze(1) * (self.counts > 0).float()
        if self.bias is not None:
            scores = scores + self.bias
        failed: dict[int, BaseException] = {}
        for i, p in enumerate(self.params):
            for proc in p.logits_processors:
                try:
                    scores[i] = proc(self.histories[i], scores[i])
                except Exception as exc:  # one request's processor must not fail its neighbours
                    log.warning("logits processor failed for row %d: %r", i, exc)
                    failed[i] = exc
        return scores, failed

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        greedy_ids = scores.argmax(dim=-1)
        flags = [p.greedy for p in self.params]  # host-side flags: no device sync to branch on
        if all(flags):
            return greedy_ids
        scores = self._warp(scores / self.temperature.unsqueeze(1))
        probs = torch.softmax(scores, dim=-1)
        cdf = probs.cumsum(dim=-1)
        u = torch.stack([
            torch.zeros((), device=self.device) if greedy else torch.rand((), generator=g, device=self.device)
            for g, greedy in zip(self.generators, flags, strict=True)
        ])
        sampled = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).squeeze(1)
        sampled = sampled.clamp_(max=self.vocab_size - 1)
        return torch.where(self.greedy, greedy_ids, sampled)

    def _warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k, then top-p, then typical-p, each a no-op on rows that did not ask for it."""
        sampling = [p for p in self.params if not p.greedy]
        ks = [p.top_k for p in self.params if 0 < p.top_k < self.vocab_size]
        if ks and sampling:
            kmax = max(ks)  # one topk of the largest k serves every row; rows without top-k keep all
            top = torch.topk(scores, kmax, dim=-1).values
            kth = top.gather(1, (self.top_k.clamp(max=kmax) - 1).unsqueeze(1))
            kth = kth.masked_fill((self.top_k >= self.vocab_size).unsqueeze(1), NEG_INF)
            scores = scores.masked_fill(scores < kth, NEG_INF)
        if any(p.top_p < 1.0 for p in sampling):
            sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
            p = torch.softmax(sorted_scores, dim=-1)
            mass_before = p.cumsum(dim=-1) - p
            drop = (mass_before > self.top_p.unsqueeze(1)) & (self.top_p < 1.0).unsqueeze(1)
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
        last = (cumulative < self.typical_p.unsqueeze(1)).sum(dim=1).clamp(max=self.vocab_size - 1)
        drop_sorted = sorted_shift > sorted_shift.gather(1, last.unsqueeze(1))
        drop_sorted &= (self.typical_p < 1.0).unsqueeze(1)
        return scores.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), NEG_INF)


def sample_rowwise(sampling: SamplingState, logits: torch.Tensor) -> SampleResult:
    """Sample each row alone, so that a row whose processing raises fails by itself."""
    parts, failed = [], {}
    for i in range(len(sampling)):
        one = copy.copy(sampling)
        one.select([i])  # select() rebinds attributes, so the original is untouched
        try:
            parts.append(one.sample(logits[i : i + 1]))
        except Exception as exc:
            failed[i] = exc
            parts.append(None)
    ok = next((p for p in parts if p is not None), None)
    zero = torch.zeros(1, dtype=torch.long, device=logits.device)
    ids = torch.cat([p.ids if p else zero for p in parts])
    lps = torch.cat([p.logprobs if p else zero.float() for p in parts])
    top_ids = top_lp = None
    if ok is not None and ok.top_ids is not None:
        width = max(p.top_ids.shape[1] for p in parts if p)
        top_ids = torch.zeros(len(parts), width, dtype=torch.long, device=logits.device)
        top_lp = torch.zeros(len(parts), width, device=logits.device)
        for i, p in enumerate(parts):
            if p is not None and p.top_ids is not None:
                top_ids[i, : p.top_ids.shape[1]], top_lp[i, : p.top_ids.shape[1]] = p.top_ids[0], p.top_logprobs[0]
    for i, p in enumerate(parts):
        if p is not None and p.failed:  # a logits processor of that one row raised
            failed[i] = next(iter(p.failed.values()))
    return SampleResult(ids, lps, top_ids, top_lp, failed)
