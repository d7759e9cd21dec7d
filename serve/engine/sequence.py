"""One generated sequence (one batch row): its tokens, text, detokenizer, grammar matcher and stopping criteria."""

from __future__ import annotations

from collections.abc import Iterable

from serve.engine.detokenize import IncrementalDetokenizer
from serve.engine.interfaces import Tokenizer
from serve.engine.request import (
    FinishInfo,
    FinishReason,
    RequestState,
    TokenEvent,
    TokenInfo,
)
from serve.engine.stopping import Stop, StopCriteria


class GrammarViolation(RuntimeError):
    """A constrained row's matcher refused its token or failed: only that row's request fails."""


class SequenceState:
    """Advances by one sampled token at a time and says when it is done."""

    def __init__(self, req: RequestState, seq_index: int, seed: int | None, tokenizer: Tokenizer,
                 eos_ids: Iterable[int], special_ids: frozenset[int]):
        params = req.params
        self.req = req
        self.seq_index = seq_index
        self.seed = seed
        self.history: list[int] = list(req.request.prompt_ids)  # shared with the sampling state
        self.generated = 0
        self.text = ""  # decoded text of the non-special output tokens
        self.cumulative_logprob = 0.0
        self._special_ids = special_ids
        self._detok = IncrementalDetokenizer(tokenizer, req.request.prompt_ids)
        self._stop = StopCriteria(eos_ids, params.stop, params.max_new_tokens, params.ignore_eos)
        # Each row its own matcher at the grammar's start (n > 1 rows fork here); the sampling state
        # masks logits with this very object, as it penalises with `history`.
        self.matcher = req.grammar.new_matcher() if req.grammar is not None else None

    def advance(self, token_id: int, logprob: float, top: list[TokenInfo] | None) -> TokenEvent:
        """Take the sampled token; the returned event carries `finish` when the sequence ends.

        It may raise (the detokenizer on a byte-fallback vocabulary, a stop criterion): the engine
        then fails this sequence's request only.
        """
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
        if self._grammar_complete(token_id) and (stop is None or stop.reason is FinishReason.LENGTH):
            stop = Stop(FinishReason.EOS)  # a complete grammar ends the sequence as EOS would
        finish = None
        if stop is not None:
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

    def _grammar_complete(self, token_id: int) -> bool:
        """Feed the matcher its token; True once the grammar can take no more. Raises GrammarViolation."""
        m = self.matcher
        if m is None:
            return False
        if not m.consume_token(token_id):
            raise GrammarViolation(f"grammar matcher refused token {token_id}: {m.get_error() or 'not allowed'}")
        return m.is_stopped()
