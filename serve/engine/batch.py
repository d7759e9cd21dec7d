"""The running rows and where their keys and values live: the only module that knows the cache layout.

A row is a block table (the pool blocks holding its tokens, in order, see blocks.py), the number of
tokens cached and `limit`, the most blocks it may ever hold (prompt + max_new_tokens - 1 tokens),
which admission set aside when the request was let in. So:
- a decode step writes one slot per row, and a row takes a fresh block every `block_size` steps;
- a finished row hands its blocks back; nothing is moved, and no row holds more than its own tokens;
- newcomers are prefilled straight into their own blocks, so merging them is appending rows;
- the n sequences of one request share the full blocks of their prompt and copy the partly filled one.
No cached token is ever recomputed. Attention reads the blocks through paged.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from serve.engine.blocks import BlockPool
from serve.engine.paged import Layout, build_layout


@dataclass
class Row:
    """One sequence's block table, its cached tokens and the most blocks it may hold."""

    blocks: list[int]
    length: int
    limit: int


class KVBatch:
    """Rows in the block pool, in batch order."""

    def __init__(self, pool: BlockPool, rows: list[Row], attention_tokens: int, device: torch.device):
        self.pool, self.rows = pool, rows
        self.attention_tokens, self.device = attention_tokens, device

    @property
    def size(self) -> int:
        return len(self.rows)

    @property
    def tokens(self) -> int:
        """Tokens cached over all rows."""
        return sum(r.length for r in self.rows)

    @property
    def outstanding(self) -> int:
        """Blocks the rows may still take: the pool always keeps that many free."""
        return sum(r.limit - len(r.blocks) for r in self.rows)

    # -- newcomers ------------------------------------------------------------------------------------
    @classmethod
    def allocate(cls, pool: BlockPool, prompts: Sequence[Sequence[int]], limits: Sequence[int],
                 prefixes: Sequence[list[torch.Tensor] | None], attention_tokens: int,
                 device: torch.device) -> KVBatch:
        """Rows for new prompts, with blocks for the whole prompt and the cached prefixes written in.

        `prefixes[i]`, when given, holds the keys and values of the first tokens of prompt i (per
        layer, [2, kv_heads, p_i, head_dim], from the prefix cache); only the rest is prefilled.
        """
        batch = cls(pool, [], attention_tokens, device)
        try:
            for prompt, limit, prefix in zip(prompts, limits, prefixes, strict=True):
                row = Row(pool.allocate(-(-len(prompt) // pool.block_size)), 0, limit)
                batch.rows.append(row)
                if prefix is not None:
                    row.length = prefix[0].shape[2]
                    pool.write_tokens(batch._slots(row, 0, row.length), prefix)
        except BaseException:
            batch.release()
            raise
        return batch

    def prefill_chunks(self, prompts: Sequence[Sequence[int]], chunk: int) -> Iterator[tuple[dict, list[int]]]:
        """Model inputs for the prompts' uncached tokens, packed row after row, at most `chunk` tokens
        per forward (a long prompt spans several).

        Yields the inputs and, per row, the prompt position of its first token in that forward (how
        many it adds is the layout's `new`), so a caller can tell which logits belong to which token.
        """
        rests = _uncached(prompts, self.rows)
        done = [0] * self.size
        while any(d < len(rest) for d, rest in zip(done, rests, strict=True)):
            budget, new = chunk, []
            for d, rest in zip(done, rests, strict=True):
                new.append(min(len(rest) - d, budget))
                budget -= new[-1]
            first = [r.length for r in self.rows]
            ids = [t for d, n, rest in zip(done, new, rests, strict=True) for t in rest[d : d + n]]
            layout = self._layout(self.rows, new)
            done = [d + n for d, n in zip(done, new, strict=True)]
            yield self._inputs(torch.tensor([ids], dtype=torch.long, device=self.device), layout), first

    def fork(self, repeats: Sequence[int]) -> None:
        """Row i becomes repeats[i] consecutive rows (the n sequences of one prompt)."""
        bs, rows, twins, copies = self.pool.block_size, [], [], []
        try:
            for row, n in zip(self.rows, repeats, strict=True):
                rows.append(row)
                full = row.length // bs
                for _ in range(n - 1):
                    self.pool.retain(row.blocks[:full])
                    twins.append(Row(row.blocks[:full], row.length, row.limit))
                    rows.append(twins[-1])
                    if row.length % bs:  # the partly filled block: each sequence writes its own next tokens
                        twins[-1].blocks = twins[-1].blocks + self.pool.allocate(1)
                        copies.append((row.blocks[full], twins[-1].blocks[-1]))
            if copies:
                self.pool.copy_blocks([s for s, _ in copies], [d for _, d in copies])
        except BaseException:
            for twin in twins:
                self.pool.release(twin.blocks)
            raise
        self.rows = rows

    def row_kv(self, row: int) -> list[torch.Tensor]:
        """A copy of one row's cached keys and values: per layer, [2, kv_heads, tokens, head_dim]."""
        r = self.rows[row]
        return self.pool.read_tokens(self._slots(r, 0, r.length))

    # -- the running batch ----------------------------------------------------------------------------
    def merged(self, other: KVBatch) -> KVBatch:
        """A new batch of our rows, then those of `other`, which is left empty: its rows now belong
        to the result (nothing is copied, and releasing `other` afterwards hands nothing back)."""
        batch = KVBatch(self.pool, self.rows + other.rows, self.attention_tokens, self.device)
        other.rows = []
        return batch

    def decode_inputs(self, last_ids: torch.Tensor, joining: KVBatch | None = None,
                      prompts: Sequence[Sequence[int]] = ()) -> dict:
        """Inputs for one decode step: every row's last token, written after its cached ones.

        With `joining` (newcomers from `allocate`, and their `prompts`), the same forward also
        prefills their uncached prompt tokens, whole, packed after the running rows: one pass over
        the weights serves both, so running streams do not wait a separate prefill forward.
        """
        bs = self.pool.block_size
        full = [r for r in self.rows if r.length == len(r.blocks) * bs]
        if any(len(r.blocks) >= r.limit for r in full):
            raise RuntimeError("a row outgrew the blocks set aside for it")
        for row, block in zip(full, self.pool.allocate(len(full)) if full else [], strict=True):
            row.blocks.append(block)
        rows, new, ids = list(self.rows), [1] * self.size, last_ids
        if joining is not None:
            rests = _uncached(prompts, joining.rows)
            rows += joining.rows
            new += [len(rest) for rest in rests]
            flat = [t for rest in rests for t in rest]
            ids = torch.cat([last_ids, torch.tensor(flat, dtype=torch.long, device=last_ids.device)])
        return self._inputs(ids.unsqueeze(0), self._layout(rows, new))

    def rewind(self) -> None:
        """Undo `decode_inputs` after its forward failed: each row is one token shorter again (the
        slots that forward wrote are written anew by the next one; a block it added stays)."""
        for row in self.rows:
            row.length -= 1

    def remove(self, rows: Sequence[int]) -> list[int]:
        """Drop `rows`, handing their blocks back; returns, for each remaining row, its old index."""
        gone = set(rows)
        for i in gone:
            self.pool.release(self.rows[i].blocks)
        order = [i for i in range(self.size) if i not in gone]
        self.rows = [self.rows[i] for i in order]
        return order

    def release(self) -> None:
        """Hand every row's blocks back (rows that will never run)."""
        for row in self.rows:
            self.pool.release(row.blocks)
        self.rows = []

    # -- helpers --------------------------------------------------------------------------------------
    def _layout(self, rows: list[Row], new: list[int]) -> Layout:
        """The layout of a forward adding `new[i]` tokens to `rows[i]` (whose lengths then grow by that)."""
        layout = build_layout(self.pool, [r.blocks for r in rows], [r.length for r in rows], new,
                              self.attention_tokens, self.device)
        for row, n in zip(rows, new, strict=True):
            row.length += n
        return layout

    @staticmethod
    def _inputs(input_ids: torch.Tensor, layout: Layout) -> dict:
        return {"input_ids": input_ids, "position_ids": layout.positions, "paged_kv": layout}

    def _slots(self, row: Row, start: int, end: int) -> torch.Tensor:
        bs = self.pool.block_size
        return torch.tensor([row.blocks[p // bs] * bs + p % bs for p in range(start, end)], dtype=torch.long,
                            device=self.device)


def _uncached(prompts: Sequence[Sequence[int]], rows: list[Row]) -> list[list[int]]:
    """Each prompt's tokens past what its row has cached (a prefix from the prefix cache)."""
    return [list(p[r.length :]) for p, r in zip(prompts, rows, strict=True)]
