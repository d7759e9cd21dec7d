"""TGI's watermark (Kirchenbauer et al. 2023), as one vectorised step over the batch.

For every watermarked row and step, TGI adds `delta` to the logits of a "greenlist" of
`int(gamma * vocab)` token ids: the first ids of `torch.randperm(vocab)` drawn from a CPU generator
seeded with `key * previous token`, so a detector that knows the key can recompute it. Drawing that
permutation costs about 1 ms for a 50k vocabulary (10-20 ms when the CPU is busy, as its fill runs as
a parallel region), once per row per step in TGI: a request with many rows would stall everyone.

The greenlist depends only on the previous token, so here each one is drawn once and kept as a row
of a bounded, least-recently-used table of masks on the device. A step gathers its rows' masks with
one `index_select` and adds `delta` with one multiply-add; a row pays a draw only when its previous
token is not in the table, so one request's extra cost per step is at most one draw per row.
The draw itself is TGI's, on a CPU generator whatever the device, so the output is exact.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

# TGI's watermark constants (Kirchenbauer et al. 2023): half the vocabulary is "green" per step.
WATERMARK_GAMMA = 0.5
WATERMARK_DELTA = 2.0
WATERMARK_KEY = 15485863
TABLE_BYTES = 32 << 20  # device memory for cached masks (one byte per vocabulary entry each)
MIN_ENTRIES = 64


def greenlist(prev_token: int, vocab: int, gamma: float = WATERMARK_GAMMA, key: int = WATERMARK_KEY) -> torch.Tensor:
    """The green token ids after `prev_token` (CPU, int64), exactly as TGI draws them."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed(key * prev_token)
    return torch.randperm(vocab, generator=rng)[: int(vocab * gamma)]


class Greenlists:
    """Greenlist masks for one vocabulary size on one device, least recently used out first."""

    def __init__(self, vocab: int, device: torch.device, capacity: int | None = None):
        self.vocab, self.device = vocab, device
        self.capacity = capacity or max(MIN_ENTRIES, TABLE_BYTES // vocab)
        self._table: torch.Tensor | None = None  # [capacity, vocab] bool, allocated on first use
        self._slots: OrderedDict[int, int] = OrderedDict()  # previous token -> table row
        self.draws = 0  # greenlists drawn so far (for tests and benchmarks)

    def masks(self, prev_tokens: Sequence[int]) -> torch.Tensor:
        """[len(prev_tokens), vocab] bool: True where a token is green after that row's previous token."""
        if self._table is None:
            self._table = torch.zeros(self.capacity, self.vocab, dtype=torch.bool, device=self.device)
        wanted = dict.fromkeys(prev_tokens)  # this step's tokens: never evicted while it runs
        for token in wanted:
            if token in self._slots:
                self._slots.move_to_end(token)
        overflow: dict[int, torch.Tensor] = {}
        for token in wanted:
            if token not in self._slots:
                mask = self._draw(token)
                slot = self._free_slot(wanted)
                if slot is None:  # more distinct tokens in one step than the table holds
                    overflow[token] = mask
                else:
                    self._table[slot].copy_(mask)
                    self._slots[token] = slot
        if not overflow:
            slots = torch.tensor([self._slots[t] for t in prev_tokens], dtype=torch.long, device=self.device)
            return self._table.index_select(0, slots)
        table = self._table
        return torch.stack([overflow[t] if t in overflow else table[self._slots[t]] for t in prev_tokens])

    def _draw(self, token: int) -> torch.Tensor:
        self.draws += 1
        mask = torch.zeros(self.vocab, dtype=torch.bool)
        mask[greenlist(token, self.vocab)] = True
        return mask.to(self.device, non_blocking=True)

    def _free_slot(self, keep: dict[int, None]) -> int | None:
        if len(self._slots) < self.capacity:
            return len(self._slots)  # rows are handed out in order and only ever reused
        for token in self._slots:  # oldest first
            if token not in keep:
                return self._slots.pop(token)
        return None


_tables: dict[tuple[str, int], Greenlists] = {}


def greenlists_for(device: torch.device, vocab: int) -> Greenlists:
    """The table shared by every batch on `device` (greenlists depend on the token only, not the request)."""
    key = (str(device), vocab)
    table = _tables.get(key)
    if table is None:
        table = _tables[key] = Greenlists(vocab, device)
    return table
