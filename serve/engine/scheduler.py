"""Admission under token budgets: who is prefilled next, and the budgets themselves."""

from __future__ import annotations

import logging
import os
from collections import deque
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DEFAULT_PREFILL_TOKENS = 4096  # TGI's default for MAX_BATCH_PREFILL_TOKENS
CPU_MEMORY_FRACTION = 0.3  # of free RAM given to the KV cache on CPU (the rest: weights, activations)
GPU_MEMORY_FRACTION = 0.8  # of free device memory after the weights are loaded
DEFAULT_PREFIX_CACHE_TOKENS = 8192  # prompt tokens kept for prefix reuse (at most 1/8 of the KV budget)


@dataclass(frozen=True)
class EngineConfig:
    """Budgets and limits. Build it with `from_model` to size the unset ones from the hardware."""

    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int = 128
    max_batch_size: int | None = None
    prefix_cache_tokens: int = 0

    @classmethod
    def from_model(
        cls,
        model,
        max_batch_prefill_tokens: int | None = None,
        max_batch_total_tokens: int | None = None,
        max_concurrent_requests: int = 128,
        max_input_tokens: int | None = None,
        max_total_tokens: int | None = None,
        max_batch_size: int | None = None,
        prefix_cache_tokens: int | None = None,
    ) -> EngineConfig:
        """Fill unset values from the model's context length and free memory (SPEC section 2)."""
        context = context_length(model)
        total = min(max_total_tokens or context, context)
        inp = max_input_tokens or total - 1
        if inp >= total:
            raise ValueError(f"MAX_INPUT_TOKENS ({inp}) must be less than MAX_TOTAL_TOKENS ({total})")
        prefill = max_batch_prefill_tokens or max(DEFAULT_PREFILL_TOKENS, inp)
        if prefill < inp:
            raise ValueError(f"MAX_BATCH_PREFILL_TOKENS ({prefill}) must be >= MAX_INPUT_TOKENS ({inp})")
        batch_total = max_batch_total_tokens
        if batch_total is None:  # sized from free memory, which the prefix cache shares
            budget = kv_token_budget(model)
            if prefix_cache_tokens is None:
                prefix_cache_tokens = min(DEFAULT_PREFIX_CACHE_TOKENS, budget // 8)
            batch_total = budget - prefix_cache_tokens
        elif prefix_cache_tokens is None:
            prefix_cache_tokens = min(DEFAULT_PREFIX_CACHE_TOKENS, batch_total // 8)
        if batch_total < total:
            raise ValueError(f"MAX_BATCH_TOTAL_TOKENS ({batch_total}) must be >= MAX_TOTAL_TOKENS ({total})")
        return cls(prefill, batch_total, inp, total, max_concurrent_requests, max_batch_size, prefix_cache_tokens)


def context_length(model) -> int:
    """The longest sequence the model was trained for."""
    cfg = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one token occupies across all layers."""
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    itemsize = torch.finfo(model.dtype).bits // 8
    return 2 * cfg.num_hidden_layers * heads * head_dim * itemsize


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where the cache will live."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * GPU_MEMORY_FRACTION)
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages * CPU_MEMORY_FRACTION)


def kv_token_budget(model) -> int:
    """MAX_BATCH_TOTAL_TOKENS sized from free memory."""
    device = next(model.parameters()).device
    budget = free_memory_bytes(device) // kv_bytes_per_token(model)
    log.info("KV cache budget: %d tokens (%d bytes per token)", budget, kv_bytes_per_token(model))
    return int(budget)


def validate(request, cfg: EngineConfig, vocab_size: int) -> None:
    """Reject what can never run (raises ValueError with the message the API returns)."""
    p, n_prompt = request.params, len(request.prompt_ids)
    if n_prompt == 0:
        raise ValueError("the prompt is empty")
    if n_prompt > cfg.max_input_tokens:
        raise ValueError(f"`inputs` must have less than {cfg.max_input_tokens} tokens. Given: {n_prompt}")
    if p.max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if n_prompt + p.max_new_tokens > cfg.max_total_tokens:
        raise ValueError(
            f"`inputs` tokens + `max_new_tokens` must be <= {cfg.max_total_tokens}. "
            f"Given: {n_prompt} `inputs` tokens and {p.max_new_tokens} `max_new_tokens`"
        )
    if (n_prompt + p.max_new_tokens) * p.n > cfg.max_batch_total_tokens:
        raise ValueError(f"the request needs more than MAX_BATCH_TOTAL_TOKENS={cfg.max_batch_total_tokens}")
    if p.n < 1:
        raise ValueError("n must be at least 1")
    bad = [t for t in p.logit_bias if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"logit_bias token ids out of range [0, {vocab_size}): {bad}")
    if any(t < 0 or t >= vocab_size for t in request.prompt_ids):
        raise ValueError("prompt token ids out of range")


class Scheduler:
    """FIFO admission: newcomers join while the prefill and total-token budgets allow."""

    def __init__(self, config: EngineConfig):
        self.config = config

    def admit(self, waiting: deque, reserved_tokens: int, running_rows: int) -> list:
        """Pop from `waiting` the requests to prefill now.

        `reserved_tokens`: the worst-case tokens (prompt + max new, per sequence) of running rows.
        A prefill is padded to its longest prompt, so its cost is rows x longest.
        """
        cfg = self.config
        admitted: list = []
        width = rows = 0
        while waiting:
            req = waiting[0]
            new_width = max(width, req.prompt_len)
            if admitted and new_width * (len(admitted) + 1) > cfg.max_batch_prefill_tokens:
                break
            if reserved_tokens + req.reserved_tokens > cfg.max_batch_total_tokens and (running_rows or admitted):
                break
            if cfg.max_batch_size and running_rows + rows + req.n > cfg.max_batch_size and (running_rows or admitted):
                break
            admitted.append(waiting.popleft())
            width, rows = new_width, rows + req.n
            reserved_tokens += req.reserved_tokens
        return admitted
