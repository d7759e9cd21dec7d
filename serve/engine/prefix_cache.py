"""Keys and values of recent prompts, so a prompt that starts like an earlier one skips that part.

Chat prompts share long prefixes (the system prompt, a few-shot preamble, the conversation so far),
and a prefill is the costliest thing the engine does. Like vLLM's automatic prefix caching and
TGI's prefix cache, every prefilled prompt is kept here (least recently used first out, bounded in
tokens) and a new prompt reuses the longest prefix it shares with one of them, at token granularity.

The cached keys carry their rotary positions, which are right for the new prompt because every row's
positions start at 0 on its first real token; the prefill then runs only over the rest of the prompt.
An entry holds, per layer, a tensor [2 (keys, values), kv_heads, tokens, head_dim] on that layer's
device (accelerate may spread the layers over several GPUs).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

MIN_PREFIX = 16  # shorter shared prefixes are not worth a lookup (and key the index)


@dataclass
class Entry:
    ids: np.ndarray  # the prompt's token ids
    kv: list[torch.Tensor]  # per layer: [2, kv_heads, len(ids), head_dim]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.kv)


class PrefixCache:
    """An LRU store of prompt KV, bounded by `capacity` tokens (0 disables it)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.tokens = 0
        self.nbytes = 0  # bytes of the stored keys and values
        self.peak_nbytes = 0
        self._entries: OrderedDict[tuple[int, ...], Entry] = OrderedDict()
        self._by_head: dict[tuple[int, ...], set[tuple[int, ...]]] = {}  # first MIN_PREFIX ids -> keys
        self.hit_tokens = 0  # prompt tokens served from here (for tests and benchmarks)

    def __len__(self) -> int:
        return len(self._entries)

    def _best(self, ids: Sequence[int]) -> tuple[int, tuple[int, ...] | None]:
        if self.capacity <= 0 or len(ids) <= MIN_PREFIX:
            return 0, None
        keys = self._by_head.get(tuple(ids[:MIN_PREFIX]))
        if not keys:
            return 0, None
        query = np.asarray(ids, dtype=np.int64)
        best, best_key = 0, None
        for key in keys:
            cached = self._entries[key].ids
            m = min(len(cached), len(query))
            diff = np.flatnonzero(cached[:m] != query[:m])
            common = int(diff[0]) if len(diff) else m
            if common > best:
                best, best_key = common, key
        return best, best_key

    def lookup(self, ids: Sequence[int]) -> list[torch.Tensor] | None:
        """KV of the longest cached prefix of `ids`, leaving at least one token to compute.

        The tensors are views of the stored entry: copy them and let go before the next `insert`,
        which may evict that entry (its memory would then outlive the bound).
        """
        common, key = self._best(ids)
        usable = min(common, len(ids) - 1)
        if key is None or usable < MIN_PREFIX:
            return None
        self._entries.move_to_end(key)
        self.hit_tokens += usable
        return [kv[:, :, :usable] for kv in self._entries[key].kv]

    def insert(self, ids: Sequence[int], make_kv: Callable[[], list[torch.Tensor]]) -> bool:
        """Keep the KV of a prefilled prompt (`make_kv` copies it out, called only when it is kept).

        A prompt already covered by a stored one is not stored again (that one is refreshed); a
        stored prompt the new one extends is dropped. Returns whether the prompt was stored.
        """
        if self.capacity <= 0 or len(ids) <= MIN_PREFIX or len(ids) > self.capacity:
            return False
        common, key = self._best(ids)
        if key is not None and common == len(ids):  # already covered by a longer (or equal) entry
            self._entries.move_to_end(key)
            return False
        if key is not None and common == len(self._entries[key].ids):  # the new prompt extends it
            self._remove(key)
        while self.tokens + len(ids) > self.capacity:  # room first: the store never holds more than its bound
            self._remove(next(iter(self._entries)))
        new_key = tuple(ids)
        entry = Entry(np.asarray(ids, dtype=np.int64), make_kv())
        self._entries[new_key] = entry
        self._by_head.setdefault(new_key[:MIN_PREFIX], set()).add(new_key)
        self.tokens += len(ids)
        self.nbytes += entry.nbytes
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes)
        return True

    def _remove(self, key: tuple[int, ...]) -> None:
        entry = self._entries.pop(key)
        self.tokens -= len(entry.ids)
        self.nbytes -= entry.nbytes
        head = self._by_head[key[:MIN_PREFIX]]
        head.discard(key)
        if not head:
            del self._by_head[key[:MIN_PREFIX]]
