"""One generated sequence (one batch row): its tokens, text, detokenizer and stopping criteria."""

from __future__ import annotations

from serve.engine.detokenize import IncrementalDetokenizer
from serve.engine.request import (
    FinishInfo,
    FinishReason,
    RequestState,
    TokenEvent,
    TokenInfo,
)
from serve.engine.stopping import StopCriteria


class SequenceState:
    """Advances by one sampled token at a time and says when it is done."""

    def __init__(self, req: RequestState, seq_index: int, seed: int | None, tokenizer, eos_ids,
                 special_ids: frozenset[int]):
        params = req.params
        self.req = req
        self.seq_index = seq_index
        self.seed = seed
        self.history: list[int] = list(req.request.prompt_ids)  # shared with the sampling state
        self.generated = 0
        self.text = ""  # decoded text of the non-special output tokens
        self.cumulative_logprob = 0.0
        self.finished = False
        self._special_ids = special_ids
        self._detok = IncrementalDetokenizer(tokenizer, req.request.prompt_ids)
        self._stop = StopCriteria(eos_ids, params.stop, params.max_new_tokens, params.ignore_eos)

    def advance(self, token_id: int, logprob: float, top: list[TokenInfo] | None) -> TokenEvent:
        """Take the sampled token; the returned event carries `finish` when the sequence ends."""
        special = token_id in self._special_ids
        piece = self._detok.step(token_id)
        self.history.append(token_id)
        self.generated += 1
        self.cumulative_logprob += logprob
        new_chars = 0
        if not special:
            self.text += piece
            new_chars = len(piece)
        stop = self._stop(token_id, self.text, new_chars, self.generated)
        finish = None
        if stop is not None:
            self.finished = True
            if stop.reason is FinishReason.STOP:
                self.text = self.text[: stop.end]
            finish = FinishInfo(
                reason=stop.reason,
                text=self.text,
                stop_sequence=stop.sequence,
                stop_start=stop.start,
                generated_tokens=self.generated,
                seed=self.seed,
                cumulative_logprob=self.cumulative_logprob,
            )
        token = TokenInfo(token_id, piece, logprob, special)
        return TokenEvent(self.seq_index, self.generated - 1, token, top, finish)
