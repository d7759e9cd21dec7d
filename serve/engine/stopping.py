"""Stopping criteria: EOS ids, stop strings (matched on text, across token boundaries), length."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from serve.engine.request import FinishReason


@dataclass(frozen=True)
class Stop:
    """A decision to stop. For stop strings, `start` is where the string begins in the text."""

    reason: FinishReason
    sequence: str | None = None
    start: int | None = None

    @property
    def end(self) -> int | None:
        """Index just past the matched stop string (TGI keeps the text up to here)."""
        return None if self.start is None else self.start + len(self.sequence or "")


class StopCriteria:
    """Called once per generated token with the text so far; returns a `Stop` or None."""

    def __init__(
        self, eos_ids: Iterable[int], stop: Iterable[str], max_new_tokens: int, ignore_eos: bool = False
    ):
        self.eos_ids = frozenset(() if ignore_eos else eos_ids)
        self.stop = tuple(s for s in stop if s)
        self.max_len = max((len(s) for s in self.stop), default=0)
        self.max_new_tokens = max_new_tokens

    def __call__(self, token_id: int, text: str, new_chars: int, generated: int) -> Stop | None:
        """`text`: all output text so far; `new_chars`: how much of it this token added."""
        if token_id in self.eos_ids:
            return Stop(FinishReason.EOS)
        if self.stop and new_chars:
            found = self._find_stop(text, new_chars)
            if found:
                return found
        if generated >= self.max_new_tokens:
            return Stop(FinishReason.LENGTH)
        return None

    def _find_stop(self, text: str, new_chars: int) -> Stop | None:
        # Only a match that ends inside the new text is new; it may start in earlier tokens.
        window_start = max(0, len(text) - new_chars - self.max_len + 1)
        window = text[window_start:]
        best: Stop | None = None
        for seq in self.stop:
            at = window.find(seq)
            if at >= 0 and (best is None or window_start + at < (best.start or 0)):
                best = Stop(FinishReason.STOP, seq, window_start + at)
        return best

