"""The padded batch and its KV cache: the only module that knows the cache layout.

Rows are left-padded to a common length T, so one decode step is one forward over [B, 1] tokens.
Each layer keeps keys and values in a preallocated slab [rows capacity, H, columns capacity, D]
and hands the model views of the live [B, H, T, D] corner. So:
- a decode step writes one column (transformers' DynamicLayer re-concatenates the cache each step);
- a finished row leaves by moving the last row into its slot (one row copied, not the batch);
- newcomers are written into free rows, right-aligned with the others;
- columns that became padding for every row are dropped only when they waste a lot.
No cached token is ever recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

COL_CHUNK = 128  # spare columns allocated at a time, so a slab grows once per ~128 steps


class SlabLayer(DynamicLayer):
    """A DynamicLayer backed by a slab; `keys`/`values` are views of its live corner."""

    def __init__(self) -> None:
        super().__init__()
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None
        self.rows = 0
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.rows = key_states.shape[0]
        end = self.length + key_states.shape[-2]
        if self.kbuf is None or end > self.kbuf.shape[2]:
            self.reserve(self.rows, end + COL_CHUNK, like=key_states)
        self.kbuf[: self.rows, :, self.length : end] = key_states
        self.vbuf[: self.rows, :, self.length : end] = value_states
        self.set_live(self.rows, end)
        return self.keys, self.values

    def reserve(self, rows: int, cols: int, like: torch.Tensor | None = None) -> None:
        """Grow the slab to at least rows x cols, keeping the live content in place."""
        ref = self.kbuf if self.kbuf is not None else like
        if self.kbuf is not None and rows <= self.kbuf.shape[0] and cols <= self.kbuf.shape[2]:
            return
        if self.kbuf is not None:
            rows, cols = max(rows, self.kbuf.shape[0]), max(cols, self.kbuf.shape[2])
        kbuf = ref.new_zeros(rows, ref.shape[1], cols, ref.shape[3])
        vbuf = ref.new_zeros(rows, ref.shape[1], cols, ref.shape[3])
        if self.kbuf is not None:
            kbuf[: self.rows, :, : self.length] = self.keys
            vbuf[: self.rows, :, : self.length] = self.values
        self.kbuf, self.vbuf = kbuf, vbuf

    def set_live(self, rows: int, length: int) -> None:
        self.rows, self.length = rows, length
        self.keys = self.kbuf[:rows, :, :length]
        self.values = self.vbuf[:rows, :, :length]


def new_cache(num_layers: int) -> Cache:
    """An empty cache of slab layers, for a prefill."""
    return Cache(layers=[SlabLayer() for _ in range(num_layers)])


class KVBatch:
    """Left-padded rows sharing one cache of length T, with the attention mask and next positions."""

    def __init__(self, cache: Cache, mask: torch.Tensor, positions: torch.Tensor):
        self.cache = cache
        self.mask = mask  # [B, T] long: 1 for real tokens, 0 for left padding
        self.positions = positions  # [B] long: position id of each row's next token

    @property
    def layers(self) -> list[SlabLayer]:
        return self.cache.layers

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    @staticmethod
    def prefill_inputs(prompts: Sequence[Sequence[int]], pad_id: int, device, num_layers: int,
                       prefixes: Sequence[list[torch.Tensor] | None] | None = None) -> tuple[dict, Cache]:
        """Left-padded model inputs for a prefill of `prompts`, and the cache to prefill into.

        `prefixes[i]`, when given, holds the keys and values of the first tokens of prompt i (per
        layer, [2, kv_heads, p_i, head_dim], from the prefix cache): those are written into the
        cache right-aligned in the first P = max(p_i) columns, and only the rest of each prompt is
        fed to the model, left-padded after them. Row i then reads
        `[pad | prefix_i | pad | rest_i]`; the gap is masked like any padding.
        """
        prefixes = list(prefixes) if prefixes is not None else [None] * len(prompts)
        done = [p[0].shape[2] if p is not None else 0 for p in prefixes]
        rests = [prompt[n:] for prompt, n in zip(prompts, done, strict=True)]
        head, width = max(done), max(len(r) for r in rests)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), head + width), dtype=torch.long)
        for i, (rest, n) in enumerate(zip(rests, done, strict=True)):
            ids[i, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            mask[i, head - n : head] = 1
            mask[i, head + width - len(rest) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, head:]
        cache = new_cache(num_layers)
        if head:
            for layer_idx, layer in enumerate(cache.layers):
                ref = prefixes[done.index(head)][layer_idx][0]
                layer.lazy_initialization(ref[None], ref[None])
                layer.reserve(len(prompts), head + width + COL_CHUNK, like=ref[None])
                for i, prefix in enumerate(prefixes):
                    if prefix is not None:
                        layer.kbuf[i, :, head - done[i] : head] = prefix[layer_idx][0]
                        layer.vbuf[i, :, head - done[i] : head] = prefix[layer_idx][1]
                layer.set_live(len(prompts), head)
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}
        return inputs, cache

    def row_kv(self, row: int) -> list[torch.Tensor]:
        """A copy of the keys and values of one row's real tokens: per layer, [2, kv_heads, tokens, head_dim]."""
        cols = self.mask[row].nonzero().squeeze(1)
        out = []
        for layer in self.layers:
            idx = cols.to(layer.keys.device)
            out.append(torch.stack([layer.keys[row].index_select(1, idx), layer.values[row].index_select(1, idx)]))
        return out

    @classmethod
    def from_prefill(cls, cache: Cache, inputs: dict) -> KVBatch:
        """Wrap the cache a prefill filled. Padding columns are zeroed so they can never carry NaNs."""
        mask = inputs["attention_mask"]
        pad = (mask == 0)[:, None, :, None]
        for layer in cache.layers:
            layer.keys.masked_fill_(pad, 0)
            layer.values.masked_fill_(pad, 0)
        return cls(cache, mask, mask.sum(dim=1))

    def decode_inputs(self, last_ids: torch.Tensor) -> dict:
        """Inputs for one decode step: every row's last token, the mask grown by one column."""
        ones = torch.ones((self.size, 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        pos = self.positions.unsqueeze(1)
        self.positions = self.positions + 1
        return {"input_ids": last_ids.unsqueeze(1), "attention_mask": self.mask, "position_ids": pos,
                "past_key_values": self.cache}

    def repeat_rows(self, repeats: Sequence[int]) -> None:
        """Row i becomes repeats[i] consecutive rows (n sequences sharing one prefill)."""
        idx = torch.tensor([i for i, r in enumerate(repeats) for _ in range(r)], device=self.mask.device)
        for layer in self.layers:
            kbuf, vbuf = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
            layer.kbuf, layer.vbuf = kbuf, vbuf
            layer.set_live(len(idx), layer.length)
        self.mask = self.mask.index_select(0, idx)
        self.positions = self.positions.index_select(0, idx)

    def remove(self, rows: Sequence[int]) -> list[int]:
        """Drop `rows`; returns, for each remaining row in its new place, its old index.

        The last live row moves into each freed slot, so the cost is one row per removal.
        """
        order = list(range(self.size))
        for r in sorted(set(rows), reverse=True):
            last = len(order) - 1
            if r != last:
                self._move_row(last, r)
                order[r] = order[last]
            order.pop()
        idx = torch.tensor(order, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, idx)
        self.positions = self.positions.index_select(0, idx)
        for layer in self.layers:
            layer.set_live(len(order), layer.length)
        self._trim()
        return order

    def _move_row(self, src: int, dst: int) -> None:
        for layer in self.layers:
            layer.kbuf[dst, :, : layer.length] = layer.kbuf[src, :, : layer.length]
            layer.vbuf[dst, :, : layer.length] = layer.vbuf[src, :, : layer.length]

    def _trim(self) -> None:
        """Drop columns that are padding for every row (leading ones, and the gaps prefix reuse leaves),
        but only when they are a real waste: it copies the cache."""
        if self.size == 0:
            return
        live = self.mask.any(dim=0)
        kept = int(live.sum())  # a host sync, only when rows leave
        if self.length - kept < max(COL_CHUNK, self.length // 4):
            return
        cols = live.nonzero().squeeze(1)
        for layer in self.layers:
            idx = cols.to(layer.kbuf.device)
            for buf in (layer.kbuf, layer.vbuf):
                buf[: self.size, :, :kept] = buf[: self.size, :, : self.length].index_select(2, idx)
            layer.set_live(self.size, kept)
        self.mask = self.mask.index_select(1, cols)

    def add(self, other: KVBatch) -> None:
        """Append the rows of `other` below ours, right-aligned at the common length."""
        b, width = self.size, max(self.length, other.length)
        shift = width - self.length
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.reserve(b + other.size if b + other.size <= mine.kbuf.shape[0] else 2 * (b + other.size),
                         width + COL_CHUNK)
            for buf, src in ((mine.kbuf, theirs.keys), (mine.vbuf, theirs.values)):
                if shift:  # newcomers are longer than our cache: move our rows right
                    buf[:b, :, shift:width] = buf[:b, :, : self.length].clone()
                    buf[:b, :, :shift] = 0
                buf[b : b + other.size, :, : width - other.length] = 0
                buf[b : b + other.size, :, width - other.length : width] = src
            mine.set_live(b + other.size, width)
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        self.positions = torch.cat([self.positions, other.positions])


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    if mask.shape[1] == width:
        return mask
    pad = torch.zeros(mask.shape[0], width - mask.shape[1], dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=1)
