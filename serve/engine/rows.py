"""The per-row state of sampling: parameters, generators, histories and [B, V] statistics.

One `Rows` holds them all, in row order, so selecting or appending rows handles every one of them
alike; a new per-row field only has to be declared here.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from serve.engine.request import SamplingParams

if TYPE_CHECKING:
    import llguidance


@dataclass
class Rows:
    """Everything kept per batch row, in row order.

    `select` and `extend` go over every field, so a per-row field added here can never be left out
    and silently shift rows. A [B, V] statistic is None while no row needs it (all zeros).
    """

    params: list[SamplingParams]
    histories: list[list[int]]  # prompt + output ids, the very lists SequenceState appends to
    matchers: list[llguidance.LLMatcher | None]  # grammar per row (None: free), the very ones SequenceState advances
    generators: list[torch.Generator]
    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B] float32, 1.0 for greedy rows
    top_k: torch.Tensor  # [B] long, vocab size when off
    top_p: torch.Tensor  # [B] float32
    typical_p: torch.Tensor  # [B] float32
    repetition: torch.Tensor  # [B] float32 (HF/TGI multiplicative)
    frequency: torch.Tensor  # [B] float32 (OpenAI additive)
    presence: torch.Tensor  # [B] float32 (OpenAI additive)
    counts: torch.Tensor | None = None  # [B, V] float32: output token counts (OpenAI penalties)
    seen: torch.Tensor | None = None  # [B, V] bool: tokens in prompt or output (repetition penalty)
    bias: torch.Tensor | None = None  # [B, V] float32: logit_bias

    def __len__(self) -> int:
        return len(self.params)

    def select(self, keep: Sequence[int]) -> Rows:
        """Rows `keep`, in that order."""
        idx = torch.tensor(list(keep), dtype=torch.long, device=self.greedy.device)
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                picked[f.name] = [value[i] for i in keep]
            else:
                picked[f.name] = None if value is None else value.index_select(0, idx)
        return Rows(**picked)

    def extend(self, other: Rows) -> Rows:
        """Our rows, then those of `other`."""
        joined: dict[str, Any] = {}
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if isinstance(mine, list):
                joined[f.name] = mine + theirs
            elif mine is None and theirs is None:
                joined[f.name] = None
            else:
                joined[f.name] = torch.cat([_or_zeros(mine, theirs, len(self)), _or_zeros(theirs, mine, len(other))])
        return Rows(**joined)


def _or_zeros(value: torch.Tensor | None, like: torch.Tensor, rows: int) -> torch.Tensor:
    return value if value is not None else like.new_zeros((rows, *like.shape[1:]))


def build_rows(params: list[SamplingParams], seeds: list[int | None], histories: list[list[int]],
               vocab_size: int, device: torch.device,
               matchers: Sequence[llguidance.LLMatcher | None] | None = None) -> Rows:
    """The per-row state of new rows: a handful of kernels whatever the number of rows and biases."""

    def column(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    f32 = torch.float32
    rows = Rows(
        params=params,
        histories=histories,
        matchers=list(matchers) if matchers is not None else [None] * len(params),
        generators=[_generator(s, device) for s in seeds],
        greedy=column([p.greedy for p in params], torch.bool),
        temperature=column([1.0 if p.greedy else p.temperature for p in params], f32),
        top_k=column([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.long),
        top_p=column([p.top_p for p in params], f32),
        typical_p=column([p.typical_p for p in params], f32),
        repetition=column([p.repetition_penalty for p in params], f32),
        frequency=column([p.frequency_penalty for p in params], f32),
        presence=column([p.presence_penalty for p in params], f32),
    )
    shape = (len(params), vocab_size)
    if any(p.frequency_penalty or p.presence_penalty for p in params):
        rows.counts = torch.zeros(shape, dtype=f32, device=device)  # output tokens only (OpenAI)
    if any(p.repetition_penalty != 1.0 for p in params):  # prompt and output (HF/TGI)
        rows.seen = _scatter(shape, histories, [True], torch.bool, device)
    if any(p.logit_bias for p in params):
        biases = [p.logit_bias for p in params]
        values = [v for b in biases for v in b.values()]
        rows.bias = _scatter(shape, [list(b) for b in biases], values, f32, device)
    return rows


def _scatter(shape: tuple[int, int], columns: list[list[int]], values: list, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """A zero [B, V] tensor with `values` (one per column, or one for all) written at row i's `columns[i]`.

    One index_put for the whole batch: writing entries one by one (16 rows x 300 biases) would stall
    every other request for the length of a step.
    """
    out = torch.zeros(shape, dtype=dtype, device=device)
    lengths = torch.tensor([len(c) for c in columns], dtype=torch.long)
    if int(lengths.sum()) == 0:
        return out
    rows = torch.repeat_interleave(torch.arange(len(columns)), lengths)
    cols = torch.tensor(list(itertools.chain.from_iterable(columns)), dtype=torch.long)
    vals = torch.tensor(values, dtype=dtype)
    out.index_put_((rows.to(device), cols.to(device)), vals.to(device))
    return out


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else random.getrandbits(63))
    return gen
