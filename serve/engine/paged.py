"""Attention over the block pool: one forward's layout, and the attention function that reads it.

A forward (a prefill chunk, a decode step, or both at once) carries rows that each add some new
tokens after the ones they have cached. The new tokens of every row are packed into one sequence,
row after row ([1, N]: no padding reaches the model's linear layers). Each new token's keys and
values are written into its row's blocks (`PagedCache.update`, called by every attention layer),
then `paged_attention` takes each group of rows' queries out of the packed sequence, gathers their
blocks into [rows, H, T, D] and runs one SDPA per group.

Rows adding one token (decode) and rows adding several (prefill) are grouped apart, so a decode row
never pays for a prompt's queries. Within each kind, rows are grouped by length, longest first: a
row joins the current group while it wastes at most half of the group's columns and the group stays
within `attention_tokens` gathered tokens. So a long row beside many short ones costs its own
length, not everyone's, and one layer's gathered copy never exceeds `attention_tokens` tokens (plus
one row that is longer on its own).

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

from serve.engine.blocks import BlockPool

ATTENTION = "serve_paged"


@dataclass
class Group:
    """Rows whose blocks are gathered together, and where their queries sit in the packed sequence.

    Each row's queries are left-padded to the group's `q_len`; a padding query repeats the row's
    first one, sits at position 0 (it sees only its row's first key) and its output is dropped.
    """

    count: int
    q_len: int
    tables: torch.Tensor  # [count * blocks]: the rows' block tables flattened to one length
    positions: torch.Tensor  # [count, q_len]: each query's position (what it may attend to)
    tokens: int  # count * blocks * block_size: the gathered size of one layer
    start: int | None  # the queries are the packed run [start, start + count * q_len), in order, unpadded
    index: torch.Tensor | None  # otherwise [count * q_len]: the packed query of each (row, column)
    keep: torch.Tensor | None  # the (row, column) entries that are real queries (None: all of them)
    dest: torch.Tensor | None  # their packed indices (where their outputs go)
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

    def take(self, states: torch.Tensor) -> torch.Tensor:
        """The group's rows out of packed per-head states [H, N, D]: [count, H, q_len, D]."""
        if self.start is not None:
            states = states[:, self.start : self.start + self.count * self.q_len]
        else:
            assert self.index is not None
            states = states.index_select(1, self.index.to(states.device))
        return states.unflatten(1, (self.count, self.q_len)).transpose(0, 1)


@dataclass
class Layout:
    """One forward: where its new tokens are written (`slots`, one per packed token), each token's
    position ([1, N]), the groups its rows are read in, and per row: how many tokens it adds (`new`)
    and where they start in the packed sequence (`offsets`). `last` [R] holds the packed index of the
    last new token of each row that adds any, in row order: the positions whose logits sample."""

    pool: BlockPool
    slots: torch.Tensor
    positions: torch.Tensor
    groups: list[Group]
    new: list[int]
    offsets: list[int]
    last: torch.Tensor


def build_layout(pool: BlockPool, tables: list[list[int]], starts: list[int], new: list[int],
                 attention_tokens: int, device: torch.device) -> Layout:
    """The layout of a forward in which row i holds `starts[i]` cached tokens and adds `new[i]` (maybe 0).

    Row i's table must already cover start + new tokens.
    """
    bs = pool.block_size
    slots: list[int] = []
    positions: list[int] = []
    offsets: list[int] = []
    for table, start, n in zip(tables, starts, new, strict=True):
        offsets.append(len(slots))
        slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
        positions += range(start, start + n)
    ends = [s + n for s, n in zip(starts, new, strict=True)]
    groups = []
    for kind in ([i for i, n in enumerate(new) if n == 1], [i for i, n in enumerate(new) if n > 1]):
        for rows in group_rows([ends[i] for i in kind], bs, attention_tokens):
            groups.append(_group([kind[j] for j in rows], tables, starts, new, offsets, bs, device))
    last = [offsets[i] + n - 1 for i, n in enumerate(new) if n > 0]
    return Layout(pool, torch.tensor(slots, dtype=torch.long, device=device),
                  torch.tensor([positions], dtype=torch.long, device=device), groups, list(new), offsets,
                  torch.tensor(last, dtype=torch.long, device=device))


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


def _group(rows: list[int], tables: list[list[int]], starts: list[int], new: list[int], offsets: list[int],
           bs: int, device: torch.device) -> Group:
    q_len = max(new[i] for i in rows)
    width = -(-max(starts[i] + new[i] for i in rows) // bs)
    flat: list[int] = []
    index: list[int] = []
    positions: list[list[int]] = []
    keep: list[int] = []
    for j, i in enumerate(rows):
        used = tables[i][: -(-(starts[i] + new[i]) // bs)]
        flat += used + [used[-1]] * (width - len(used))  # padding repeats a block of the row itself: masked, finite
        pad = q_len - new[i]
        index += [offsets[i]] * pad + list(range(offsets[i], offsets[i] + new[i]))
        positions.append([0] * pad + list(range(starts[i], starts[i] + new[i])))
        keep += range(j * q_len + pad, (j + 1) * q_len)
    padded = len(keep) < len(index)
    start = index[0] if index == list(range(index[0], index[0] + len(index))) else None  # never when padded

    def tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return Group(
        count=len(rows),
        q_len=q_len,
        tables=tensor(flat),
        positions=tensor(positions),
        tokens=len(rows) * width * bs,
        start=start,
        index=None if start is not None else tensor(index),
        keep=tensor(keep) if padded else None,
        dest=None if start is not None else tensor([index[k] for k in keep]),
        causal=q_len > 1 and all(starts[i] == 0 and new[i] == q_len for i in rows),
    )


class PagedCache(Cache):
    """What the model sees as its cache: each layer's new keys and values go into the pool."""

    def __init__(self, layout: Layout):
        super().__init__(layers=[])
        self.layout = layout

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # [1, H, N, D] each -> [2, H, N, D], in the packed order of `slots`
        new = torch.stack([key_states, value_states]).transpose(1, 2).flatten(2, 3)
        self.layout.pool.write(layer_idx, self.layout.slots.to(key_states.device), new)
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always given explicitly


def paged_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    paged_kv: Layout | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA over the pool, one call per group of rows; packed query [1, Hq, N, D] -> output [1, N, Hq, D]."""
    if paged_kv is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit soft-capping is not supported by the engine's attention")
    _, heads, tokens, dim = query.shape
    window = kwargs.get("sliding_window")
    out = None
    for group in paged_kv.groups:
        q = group.take(query[0])
        if group.causal and (window is None or window >= group.q_len):
            # Whole prompts from position 0: their keys are this forward's own, and SDPA's causal mode
            # skips the blocks above the diagonal (half the work of an explicit mask).
            k, v = group.take(key[0]), group.take(value[0])
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=k.shape[1] != heads)
        else:
            layer = int(module.layer_idx)  # type: ignore[arg-type]  # an attention module's own int attribute
            keys, values = paged_kv.pool.gather(layer, group.tables.to(query.device), group.count)
            mask = group.mask(window).to(query.device)
            if group.q_len == 1:  # decode: the query heads that share a key head become that head's queries
                kv_heads = keys.shape[1]
                packed = q.reshape(group.count, kv_heads, heads // kv_heads, dim)
                o = F.scaled_dot_product_attention(packed, keys, values, attn_mask=mask, scale=scaling)
                o = o.reshape(group.count, heads, 1, dim)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling,
                                                   enable_gqa=keys.shape[1] != heads)
        o = o.transpose(1, 2).flatten(0, 1)  # [count * q_len, Hq, D], row by row
        if group.start == 0 and o.shape[0] == tokens:
            out = o  # the only group: every query, in order
            continue
        if out is None:
            out = query.new_empty(tokens, heads, dim)
        if group.start is not None:
            out[group.start : group.start + o.shape[0]] = o
        else:
            assert group.dest is not None
            real = o if group.keep is None else o.index_select(0, group.keep.to(o.device))
            out.index_copy_(0, group.dest.to(o.device), real)
    assert out is not None, "a forward without queries"
    return out.unsqueeze(0), None


AttentionInterface.register(ATTENTION, paged_attention)
