"""From sampled ids to the events each request's client reads, one row's failure kept to its request.

Everything here is per row: the detokenizer (which raises on some byte-fallback vocabularies), the
stop criteria, the texts of top-n alternatives. When one of them raises, only that row's request
fails (with the reason as its error); the other rows of the step are published as usual. See
faults.py for what escalates instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from serve.engine.detokenize import TokenTexts
from serve.engine.faults import Action, EngineFault, Scope, decide, describe
from serve.engine.request import RequestState, TokenEvent, TokenInfo
from serve.engine.sampling import SampleResult
from serve.engine.sequence import SequenceState

log = logging.getLogger(__name__)

TopTokens = tuple[list[list[int]], list[list[float]]]  # (ids, logprobs) per row, widest top-n of the step


class Publisher:
    """Advances every row by its sampled token and sends each request its events (one wakeup each)."""

    def __init__(self, vocab_size: int, token_text: TokenTexts, special_ids: frozenset[int],
                 fail: Callable[[RequestState, str], None], finish: Callable[[RequestState], None]):
        self.vocab_size, self.token_text, self.special_ids = vocab_size, token_text, special_ids
        self._fail, self._finish = fail, finish

    def publish(self, rows: list[SequenceState], result: SampleResult) -> list[int]:
        """Send the step's events (one host sync for the whole batch); return the rows that are done."""
        ids, lps = torch.stack([result.ids.double(), result.logprobs.double()]).tolist()
        tops = None
        if result.top_ids is not None and result.top_logprobs is not None:
            tops = (result.top_ids.tolist(), result.top_logprobs.tolist())
        finished: set[int] = set()
        batches: dict[int, tuple[RequestState, list[TokenEvent]]] = {}
        for i, seq in enumerate(rows):
            req = seq.req
            if i in result.failed and req.active:
                self._row_failed(req, "sampling", result.failed[i])
            if not req.active:
                continue
            try:
                event = self._advance(seq, int(ids[i]), lps[i], tops, i)
            except Exception as exc:
                self._row_failed(req, "decoding the output", exc)
                continue
            batches.setdefault(id(req), (req, []))[1].append(event)
            if event.finish is not None:
                finished.add(i)
                req.unfinished -= 1
        for req, events in batches.values():
            if req.active:  # a request failed by a later row of the same step sends nothing more
                req.handle.put_many(events)
                if req.unfinished == 0:
                    self._finish(req)
        return [i for i, seq in enumerate(rows) if i in finished or not seq.req.active]

    def _advance(self, seq: SequenceState, token_id: int, logprob: float, tops: TopTokens | None,
                 i: int) -> TokenEvent:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"sampled token id {token_id} is outside the vocabulary")
        top = self._top_tokens(tops, i, seq.req.params.top_n_tokens) if tops else None
        return seq.advance(token_id, logprob, top)

    def _top_tokens(self, tops: TopTokens, i: int, n: int) -> list[TokenInfo] | None:
        if n <= 0:
            return None
        ids, lps = tops[0][i][:n], tops[1][i][:n]
        return [TokenInfo(t, self.token_text(t), lp, t in self.special_ids) for t, lp in zip(ids, lps)]

    def _row_failed(self, req: RequestState, what: str, exc: Exception) -> None:
        if decide(exc, Scope.REQUEST) is Action.RESTART:
            raise EngineFault(f"engine failure: device error while {what}: {describe(exc)}") from exc
        log.warning("request %s failed while %s: %s", req.request.request_id, what, describe(exc), exc_info=exc)
        self._fail(req, f"{what} failed: {describe(exc)}")
