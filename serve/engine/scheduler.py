"""Admission: who is prefilled next, first come first served, within the budgets.

A request is let in only when the pool can give it every block it may ever need
(`EngineConfig.kv_tokens_needed`) beside what the running rows may still take, so a running
sequence never waits for memory and the pool can never run out. The first request that does not
fit waits, and so does everyone behind it (FIFO: a long request is not overtaken for ever by short
ones); it fits at the latest when the running rows have finished, because a request that could not
fit an idle engine is refused at submission.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container

from serve.engine.config import EngineConfig
from serve.engine.request import RequestState


class Scheduler:
    """FIFO admission under the KV pool, the row count and the prefill budget."""

    def __init__(self, config: EngineConfig):
        self.config = config

    def admit(self, waiting: deque[RequestState], free_tokens: int, running_rows: int,
              cancelled: Container[str] = ()) -> list[RequestState]:
        """Pop from `waiting` the requests to prefill now.

        `free_tokens`: pool tokens that are free and not set aside for the running rows.
        A prefill packs its prompts, so its cost is the sum of their lengths.
        `cancelled`: ids cancelled since the step began (their clients left); they are popped and
        never prefilled (the engine ends them at its next step).
        """
        cfg = self.config
        admitted: list[RequestState] = []
        tokens = 0
        rows = running_rows
        while waiting:
            req = waiting[0]
            if req.request.request_id in cancelled or not req.active:
                waiting.popleft()
                continue
            need = cfg.kv_tokens_needed(req.prompt_len, req.params.max_new_tokens, req.n)
            if admitted and tokens + req.prompt_len > cfg.max_batch_prefill_tokens:
                break
            if need > free_tokens or rows + req.n > cfg.max_batch_size:
                break
            admitted.append(waiting.popleft())
            tokens, rows, free_tokens = tokens + req.prompt_len, rows + req.n, free_tokens - need
        return admitted
