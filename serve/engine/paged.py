"""Attention over the block pool: one forward's layout, and the attention function that reads it.

A forward (a prefill chunk or a decode step) carries rows of different lengths. Each new token's
keys and values are written into its row's blocks (`PagedCache.update`, called by every attention
layer), then `paged_attention` gathers each group of rows' blocks into [rows, H, T, D] and runs one
SDPA per group. Rows are grouped by length, longest first: a row joins the current group while it
wastes at most half of the group's columns and the group stays within `attention_tokens` gathered
tokens. So a long row beside many short ones costs its own length, not everyone's, and one layer's
gathered copy never exceeds `attention_tokens` tokens (plus one row that is longer on its own).

The function is registered with transformers' AttentionInterface under "serve_paged"; called
without a layout (e.g. `model.generate`) it is plain SDPA. Masks are built here, per group, so the
model is told no attention mask at all (transformers then skips building one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from serve.engine.blocks import SCRATCH, BlockPool

ATTENTION = "serve_paged"


@dataclass
class Group:
    """Rows whose blocks are gathered together: `rows` (None: every row, in order), their block tables
    flattened to one length, and each query's position (what it may attend to)."""

    rows: torch.Tensor | None
    count: int
    tables: torch.Tensor  # [count * blocks]
    positions: torch.Tensor  # [count, Q]; padding queries sit at 0 and see only their row's first key
    tokens: int  # count * blocks * block_size: the gathered size of one layer
    causal: bool = False  # every row is a whole prompt from position 0: plain causal attention, no mask
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor:
        """[count, 1, Q, T] bool: key j is visible from a query at position p iff p - window < j <= p."""
        if window not in self._masks:
            keys = torch.arange(self.tokens // self.count, device=self.positions.device)
            pos = self.positions[:, None, :, None]
            visible = keys <= pos
            if window is not None:
                visible &= keys > pos - window
            self._masks[window] = visible
        return self._masks[window]


@dataclass
class Layout:
    """One forward: where its new tokens are written (`slots`, one per query, row-major), each query's
    position ([B, Q]; padding queries sit at 0), and the groups its rows are read in."""

    pool: BlockPool
    slots: torch.Tensor
    positions: torch.Tensor
    groups: list[Group]


def build_layout(pool: BlockPool, tables: list[list[int]], starts: list[int], new: list[int],
                 attention_tokens: int, device: torch.device) -> Layout:
    """The layout of a forward in which row i holds `starts[i]` cached tokens and adds `new[i]`.

    Queries are left-padded to Q = max(new); row i's table must already cover start + new tokens.
    """
    bs, q_len = pool.block_size, max(new)
    slots: list[int] = []
    positions: list[list[int]] = []
    for table, start, n in zip(tables, starts, new, strict=True):
        pad = q_len - n
        pos = list(range(start, start + n))
        slots += [SCRATCH * bs] * pad + [table[p // bs] * bs + p % bs for p in pos]
        positions.append([0] * pad + pos)
    ends = [max(s + n, 1) for s, n in zip(starts, new, strict=True)]  # a row with nothing yet still reads block 0
    pos_t = torch.tensor(positions, dtype=torch.long, device=device)
    whole = [s == 0 and n == q_len > 1 for s, n in zip(starts, new, strict=True)]
    groups = [_group(rows, tables, pos_t, ends, bs, device, all(whole[i] for i in rows))
              for rows in group_rows(ends, bs, attention_tokens)]
    return Layout(pool, torch.tensor(slots, dtype=torch.long, device=device), pos_t, groups)


def group_rows(lengths: list[int], block_size: int, attention_tokens: int) -> list[list[int]]:
    """Row indices in groups: longest first; a row joins while it fills at least half of the group's
    blocks and the group's gathered size stays within `attention_tokens`."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    width = 0
    for i in order:
        blocks = -(-lengths[i] // block_size)
        if groups and 2 * blocks >= width and (len(groups[-1]) + 1) * width * block_size <= attention_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
            width = blocks
    return groups


def _group(rows: list[int], tables: list[list[int]], positions: torch.Tensor, ends: list[int], bs: int,
           device: torch.device, causal: bool) -> Group:
    width = -(-max(ends[i] for i in rows) // bs)
    flat: list[int] = []
    for i in rows:
        used = tables[i][: -(-ends[i] // bs)]
        flat += used + [used[-1]] * (width - len(used))  # padding repeats a block of the row itself: masked, finite
    index = None if rows == list(range(positions.shape[0])) else torch.tensor(rows, dtype=torch.long, device=device)
    return Group(
        rows=index,
        count=len(rows),
        tables=torch.tensor(flat, dtype=torch.long, device=device),
        positions=positions if index is None else positions.index_select(0, index),
        tokens=len(rows) * width * bs,
        causal=causal,
    )


class PagedCache(Cache):
    """What the model sees as its cache: each layer's new keys and values go into the pool."""

    def __init__(self, layout: Layout):
        super().__init__(layers=[])
        self.layout = layout

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # [B, H, Q, D] each -> [2, H, B * Q, D], in the row-major order of `slots`
        new = torch.stack([key_states, value_states]).transpose(1, 2).flatten(2, 3)
        self.layout.pool.write(layer_idx, self.layout.slots.to(key_states.device), new)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    paged_kv: Layout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA over the pool, one call per group of rows; query [B, Hq, Q, D] -> output [B, Q, Hq, D]."""
    if paged_kv is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit soft-capping is not supported by the engine's attention")
    batch, heads, q_len, dim = query.shape
    window = kwargs.get("sliding_window")
    out = query.new_empty(batch, heads, q_len, dim)
    for group in paged_kv.groups:
        rows = None if group.rows is None else group.rows.to(query.device)
        q = query if rows is None else query.index_select(0, rows)
        if group.causal and (window is None or window >= q_len):
            # Whole prompts from position 0: their keys are this forward's own, and SDPA's causal mode
            # skips the blocks above the diagonal (half the work of an explicit mask).
            k, v = (key, value) if rows is None else (key.index_select(0, rows), value.index_select(0, rows))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != heads)
        else:
            layer = int(module.layer_idx)  # type: ignore[arg-type]  # an attention module's own int attribute
            keys, values = paged_kv.pool.gather(layer, group.tables.to(query.device), group.count)
            mask = group.mask(window).to(query.device)
            if q_len == 1:  # decode: the query heads that share a key head become that head's queries
                kv_heads = keys.shape[1]
                packed = q.reshape(group.count, kv_heads, heads // kv_heads, dim)
                o = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=scaling)
                o = o.reshape(group.count, heads, 1, dim)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling,
                                                   enable_gqa=keys.shape[1] != heads)
        if rows is None:
            out = o
        else:
            out.index_copy_(0, rows, o)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, paged_attention)
