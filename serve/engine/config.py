"""Budgets and limits of the engine, and how the unset ones are sized from the model and the hardware.

The memory the engine takes for keys and values is fixed at start-up and logged as one figure,
`kv_budget_bytes`: the block pool (MAX_BATCH_TOTAL_TOKENS), the prefix
cache (PREFIX_CACHE_TOKENS) and the attention workspace (the blocks of one layer gathered for one
SDPA call, at most `attention_tokens`). Beside it, the sampling workspace grows with the rows decoded
together (MAX_BATCH_SIZE): [rows, vocab] logits, penalties and sorts, at most
SAMPLING_BYTES_PER_LOGIT per vocabulary entry per row.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch

log = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKENS = 4096  # TGI's default for MAX_BATCH_PREFILL_TOKENS
CPU_MEMORY_FRACTION = 0.3  # of free RAM given to the KV cache on CPU (the rest: weights, activations)
GPU_MEMORY_FRACTION = 0.8  # of free device memory after the weights are loaded
DEFAULT_PREFIX_CACHE_TOKENS = 8192  # prompt tokens kept for prefix reuse (at most 1/8 of the KV budget)
BLOCK_SIZE = 16  # tokens per KV block (vLLM's default): at most 15 slots of a sequence are unused
DEFAULT_MAX_BATCH_SIZE = 256  # rows decoded together (vLLM's max_num_seqs)
MIN_ATTENTION_TOKENS = 32768  # one layer's gathered keys and values per SDPA call (grows to one full sequence)
# Peak bytes per [rows, vocab] entry of one sampling step with every option on (penalties, logit
# bias, watermark, top-k, top-p, typical-p, top-n, a grammar on every row), model logits included:
# measured 80 on CPU, fp32, with or without the grammar, whose mask is freed before the sort's peak
# (tests/unit/test_memory.py). The watermark's greenlist table is one fixed 32 MB per process.
SAMPLING_BYTES_PER_LOGIT = 96


@dataclass(frozen=True)
class EngineConfig:
    """Budgets and limits. Build it with `from_model` to size the unset ones from the hardware."""

    max_batch_prefill_tokens: int
    max_batch_total_tokens: int  # the block pool, in tokens (a multiple of block_size)
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int = 128
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # rows decoded together (sequences, so n counts)
    prefix_cache_tokens: int = 0
    block_size: int = BLOCK_SIZE
    attention_tokens: int = MIN_ATTENTION_TOKENS
    kv_bytes_per_token: int = 0  # keys and values of one token, all layers (0: unknown)
    num_layers: int = 1

    def kv_tokens_needed(self, prompt_tokens: int, max_new_tokens: int, n: int) -> int:
        """The pool tokens a request takes at most, running alone: what admission sets aside for it.

        Each sequence caches prompt + max_new_tokens - 1 tokens (the last token is never fed back),
        in whole blocks; the n sequences share the full blocks of their prompt.
        """
        shared = prompt_tokens // self.block_size
        return self.block_size * (shared + n * (self.row_blocks(prompt_tokens, max_new_tokens) - shared))

    def unfit_reason(self, prompt_tokens: int, max_new_tokens: int, n: int) -> str | None:
        """Why a request could never be admitted, even into an idle engine (None: it fits, perhaps after a wait).

        The HTTP boundary calls it to answer 422 instead of queueing a request that would wait for ever.
        """
        if n > self.max_batch_size:
            return f"n ({n}) is more sequences than the server decodes together (MAX_BATCH_SIZE={self.max_batch_size})"
        need = self.kv_tokens_needed(prompt_tokens, max_new_tokens, n)
        if need > self.max_batch_total_tokens:
            return (f"the request needs {need} KV cache tokens ({prompt_tokens} prompt + {max_new_tokens} new, "
                    f"x {n} sequences, in blocks of {self.block_size}), more than the server holds "
                    f"(MAX_BATCH_TOTAL_TOKENS={self.max_batch_total_tokens})")
        return None

    def row_blocks(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """The most blocks one sequence holds: its prompt and every generated token but the last."""
        return -(-(prompt_tokens + max_new_tokens - 1) // self.block_size)

    @property
    def pool_blocks(self) -> int:
        """Blocks of the pool."""
        return self.max_batch_total_tokens // self.block_size

    @property
    def kv_budget_bytes(self) -> int:
        """All the KV memory the engine may hold: pool, prefix cache, one layer's attention workspace."""
        per_layer = self.kv_bytes_per_token // max(self.num_layers, 1)
        pool = self.pool_blocks * self.block_size * self.kv_bytes_per_token
        return pool + self.prefix_cache_tokens * self.kv_bytes_per_token + self.attention_tokens * per_layer

    def sampling_bytes(self, vocab_size: int) -> int:
        """The most one sampling step takes with max_batch_size rows."""
        return self.max_batch_size * vocab_size * SAMPLING_BYTES_PER_LOGIT

    @classmethod
    def from_model(
        cls,
        model,
        max_batch_prefill_tokens: int | None = None,
        max_batch_total_tokens: int | None = None,
        max_concurrent_requests: int = 128,
        max_input_tokens: int | None = None,
        max_total_tokens: int | None = None,
        prefix_cache_tokens: int | None = None,
        max_batch_size: int | None = None,
    ) -> EngineConfig:
        """Fill unset values from the model's context length and free memory, and log the budgets."""
        context = context_length(model)
        total = min(max_total_tokens or context, context)
        inp = max_input_tokens or total - 1
        if inp >= total:
            raise ValueError(f"MAX_INPUT_TOKENS ({inp}) must be less than MAX_TOTAL_TOKENS ({total})")
        prefill = max_batch_prefill_tokens or max(DEFAULT_PREFILL_TOKENS, inp)
        if prefill < inp:
            raise ValueError(f"MAX_BATCH_PREFILL_TOKENS ({prefill}) must be >= MAX_INPUT_TOKENS ({inp})")
        rows = max_batch_size or DEFAULT_MAX_BATCH_SIZE
        layers, per_token = model.config.get_text_config().num_hidden_layers, kv_bytes_per_token(model)
        sized = cls(prefill, 0, inp, total, max_concurrent_requests, rows, 0,
                    attention_tokens=max(MIN_ATTENTION_TOKENS, -(-total // BLOCK_SIZE) * BLOCK_SIZE),
                    kv_bytes_per_token=per_token, num_layers=layers)
        # Beside the pool: one layer's attention workspace, in tokens of all layers.
        overhead = -(-sized.attention_tokens // layers)
        batch_total = max_batch_total_tokens
        if batch_total is None:  # sized from free memory, shared with the prefix cache and the sampling rows
            vocab = model.config.get_text_config().vocab_size
            free = free_memory_bytes(next(model.parameters()).device) - sized.sampling_bytes(vocab)
            budget = max(free // per_token - overhead, 0)
            if prefix_cache_tokens is None:
                prefix_cache_tokens = min(DEFAULT_PREFIX_CACHE_TOKENS, budget // 8)
            batch_total = budget - prefix_cache_tokens
        elif prefix_cache_tokens is None:
            prefix_cache_tokens = min(DEFAULT_PREFIX_CACHE_TOKENS, batch_total // 8)
        one_request = sized.kv_tokens_needed(inp, total - inp, 1)
        if max_batch_total_tokens is None and batch_total < one_request:
            log.warning("free memory sizes the KV pool at %d tokens, less than one request of MAX_TOTAL_TOKENS; "
                        "using %d (set MAX_BATCH_TOTAL_TOKENS, or lower MAX_TOTAL_TOKENS)", batch_total, one_request)
            batch_total = one_request
        batch_total -= batch_total % BLOCK_SIZE
        cfg = replace(sized, max_batch_total_tokens=batch_total, prefix_cache_tokens=prefix_cache_tokens)
        if one_request > batch_total:
            raise ValueError(f"MAX_BATCH_TOTAL_TOKENS ({batch_total}) must be >= MAX_TOTAL_TOKENS ({total})")
        cfg.log_budgets(model.config.get_text_config().vocab_size)
        return cfg

    def log_budgets(self, vocab_size: int) -> None:
        """One line with the KV budget and what it is made of, one with the sampling workspace."""
        log.info(
            "KV budget: %d bytes = pool %d tokens (%d blocks of %d) + prefix cache %d tokens + attention "
            "workspace %d tokens of one layer, %d bytes per token; sampling workspace: %d rows x %d vocab x %d B = "
            "%d bytes", self.kv_budget_bytes, self.max_batch_total_tokens, self.pool_blocks, self.block_size,
            self.prefix_cache_tokens, self.attention_tokens, self.kv_bytes_per_token, self.max_batch_size,
            vocab_size, SAMPLING_BYTES_PER_LOGIT, self.sampling_bytes(vocab_size),
        )


def context_length(model) -> int:
    """The longest sequence the model was trained for."""
    cfg = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the model's attention."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, head_dim


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one token occupies across all layers."""
    layers, heads, head_dim = kv_shape(model)
    return 2 * layers * heads * head_dim * (torch.finfo(model.dtype).bits // 8)


def free_memory_bytes(device: torch.device) -> int:
    """The share of free memory, where the cache will live, that the engine may take."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * GPU_MEMORY_FRACTION)
    return int(available_ram_bytes() * CPU_MEMORY_FRACTION)


def available_ram_bytes() -> int:
    """RAM that can be taken without swapping: MemAvailable (page cache included, as the kernel reclaims it).

    Free pages alone (SC_AVPHYS_PAGES) say next to nothing on a machine whose page cache holds the
    model files: the budget came out 0 on a 24 GB host with 14 GB available.
    """
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
