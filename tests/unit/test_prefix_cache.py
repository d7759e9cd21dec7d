"""The prefix store alone: longest match, one token always left to compute, LRU bound in tokens."""

from __future__ import annotations

import torch

from serve.engine.prefix_cache import MIN_PREFIX, PrefixCache


def kv(ids: list[int], layers: int = 2) -> list[torch.Tensor]:
    """Fake per-layer KV whose values encode the token ids, so slices can be checked."""
    t = torch.tensor(ids, dtype=torch.float32)
    return [t.view(1, 1, -1, 1).expand(2, 3, -1, 4).clone() + layer for layer in range(layers)]


def test_longest_shared_prefix_is_returned_and_one_token_is_left():
    cache = PrefixCache(1000)
    base = list(range(100, 140))
    assert cache.insert(base, lambda: kv(base))
    cache.insert(base[:20] + [7] * 20, lambda: kv(base[:20] + [7] * 20))
    hit = cache.lookup(base[:30] + [1, 2, 3])
    assert hit is not None and len(hit) == 2 and hit[0].shape == (2, 3, 30, 4)
    assert hit[1][0, 0, :, 0].tolist() == [float(i + 1) for i in base[:30]]
    assert cache.lookup(base)[0].shape[2] == len(base) - 1  # the same prompt: all but its last token
    assert cache.lookup(base[: MIN_PREFIX - 1] + [0] * 30) is None  # too short a match
    assert cache.lookup([5] * 50) is None
    assert cache.hit_tokens == 30 + len(base) - 1


def test_extension_replaces_and_duplicates_are_not_stored():
    cache = PrefixCache(1000)
    a = list(range(30))
    cache.insert(a, lambda: kv(a))
    copied = []
    assert not cache.insert(a[:25], lambda: copied.append(1))  # covered by the stored prompt: no copy made
    assert not cache.insert(a, lambda: copied.append(1)) and not copied
    assert cache.insert(a + [99, 98], lambda: kv(a + [99, 98]))
    assert len(cache) == 1 and cache.tokens == 32


def test_least_recently_used_prompts_leave_first_within_the_token_bound():
    cache = PrefixCache(100)
    prompts = [[i] * 40 for i in range(1, 4)]
    cache.insert(prompts[0], lambda: kv(prompts[0]))
    cache.insert(prompts[1], lambda: kv(prompts[1]))
    assert cache.lookup(prompts[0] + [5]) is not None  # touch the first: the second is now the oldest
    cache.insert(prompts[2], lambda: kv(prompts[2]))
    assert cache.tokens == 80 and len(cache) == 2
    assert cache.lookup(prompts[1] + [5]) is None and cache.lookup(prompts[0] + [5]) is not None
    assert PrefixCache(0).lookup(prompts[0]) is None and not PrefixCache(0).insert(prompts[0], lambda: kv(prompts[0]))
