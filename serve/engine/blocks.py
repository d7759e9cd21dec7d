"""The engine's KV memory: one pool of fixed-size blocks per layer, sized once, never grown.

Every key and value a running sequence holds lives in a block of `block_size` token slots; a row
is a list of blocks (its block table), like vLLM's and TGI's paged caches. A finished row hands its
blocks back and nothing is ever copied to make room, so the memory the cache can take is exactly
the pool: `num_blocks * block_size` slots of `bytes_per_token` bytes.

Blocks are reference-counted because the `n` sequences of one request share the full blocks of
their prompt.

Each layer's tensors are created at the first write into that layer, on the device of that write
(accelerate may spread layers over several GPUs). On CPU `torch.empty` only reserves address space:
pages become resident when a block is first used, so resident memory follows the blocks in use.
"""

from __future__ import annotations

import torch


class BlockPool:
    """Fixed-size KV blocks for every layer, with a free list and reference counts."""

    def __init__(self, num_blocks: int, block_size: int, num_layers: int, kv_heads: int, head_dim: int):
        if num_blocks < 1:
            raise ValueError("the pool needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.kv: list[torch.Tensor | None] = [None] * num_layers  # per layer, created at its first write
        self._refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: low ids first, freed blocks reused first
        self.peak_in_use = 0
        self.peak_gathered = 0  # the most tokens of one layer gathered for one attention call

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def nbytes(self) -> int:
        """Bytes of the layer tensors created so far (the whole pool once every layer has been written)."""
        return sum(t.nbytes for t in self.kv if t is not None)

    def allocate(self, count: int) -> list[int]:
        """`count` zeroed blocks. Running out is a broken invariant: admission reserves blocks first."""
        if count > len(self._free):
            raise RuntimeError(f"KV pool exhausted: {count} blocks asked, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(count)]
        for b in blocks:
            self._refs[b] = 1
        # Zeroed because attention reads whole blocks: the unused tail of a row's last block is masked
        # out, but a NaN left there by an earlier owner would still poison the softmax (0 * NaN).
        self._zero(blocks)
        self.peak_in_use = max(self.peak_in_use, self.blocks_in_use)
        return blocks

    def retain(self, blocks: list[int]) -> None:
        """One more row refers to `blocks` (the shared prompt blocks of a request's sequences)."""
        for b in blocks:
            self._refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        """A row lets go of `blocks`; those nobody refers to any more are free again."""
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)

    def reset(self) -> None:
        """Every block free again (after a batch was discarded without releasing its rows)."""
        self._refs = [0] * self.num_blocks
        self._free = list(range(self.num_blocks - 1, -1, -1))

    # -- tensors --------------------------------------------------------------------------------
    # One tensor per layer, [2 (keys, values), H, num_blocks, block_size, D]: head-major, so a gathered
    # row is one contiguous [T, D] matrix per head (what SDPA reads fastest), and one index_select
    # gathers keys and values together.
    def layer(self, idx: int, like: torch.Tensor) -> torch.Tensor:
        """Layer `idx`'s tensor, created on `like`'s device and dtype at first use."""
        kv = self.kv[idx]
        if kv is None:
            kv = like.new_empty(2, self.kv_heads, self.num_blocks, self.block_size, self.head_dim)
            used = [b for b, r in enumerate(self._refs) if r > 0]
            if used:
                kv.index_fill_(2, torch.tensor(used, device=like.device), 0)
            self.kv[idx] = kv
        return kv

    def _zero(self, blocks: list[int]) -> None:
        for kv in self.kv:
            if kv is not None:
                kv.index_fill_(2, torch.tensor(blocks, device=kv.device), 0)

    def _slots(self, kv: torch.Tensor) -> torch.Tensor:
        return kv.view(2, self.kv_heads, -1, self.head_dim)  # [2, H, token slots, D]

    def write(self, idx: int, slots: torch.Tensor, kv_new: torch.Tensor) -> None:
        """Store one layer's new keys and values, [2, H, N, D], at token slots `slots` [N]."""
        self._slots(self.layer(idx, kv_new)).index_copy_(2, slots, kv_new)

    def gather(self, idx: int, tables: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `rows` block tables (flattened, equal lengths) as [rows, H, T, D] each."""
        kv = self.kv[idx]
        assert kv is not None, "attention before the layer was written"
        self.peak_gathered = max(self.peak_gathered, tables.numel() * self.block_size)
        both = kv.index_select(2, tables).view(2, self.kv_heads, rows, -1, self.head_dim)
        return both[0].transpose(0, 1), both[1].transpose(0, 1)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks in every layer (a sequence's own copy of a shared, partly filled block)."""
        for kv in self.kv:
            if kv is not None:
                s, d = torch.tensor(src, device=kv.device), torch.tensor(dst, device=kv.device)
                kv.index_copy_(2, d, kv.index_select(2, s))

    def read_tokens(self, slots: torch.Tensor) -> list[torch.Tensor]:
        """A copy of the tokens at `slots`: per layer, [2 (keys, values), H, tokens, D]."""
        out = []
        for kv in self.kv:
            assert kv is not None
            out.append(self._slots(kv).index_select(2, slots.to(kv.device)))
        return out

    def write_tokens(self, slots: torch.Tensor, kv: list[torch.Tensor]) -> None:
        """Store per-layer [2, H, tokens, D] keys and values (from `read_tokens`) at `slots`."""
        for idx, layer_kv in enumerate(kv):
            self.write(idx, slots.to(layer_kv.device), layer_kv)
