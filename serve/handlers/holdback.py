"""How much of a streamed answer may be sent yet: never the start of a stop string.

The engine matches stop strings on text and cuts the answer there; OpenAI's answers leave the stop
string out. A stream must therefore keep back any tail of the text that could still grow into a
stop string, until the next token decides. This is an API concern (TGI's generate streams every
token as it comes), so it lives with the handlers, not in the engine.

Linear in the output: every stop string has a Knuth-Morris-Pratt automaton that reads each new
character once, and only the unsent tail (shorter than the longest stop string, plus one token)
is kept.
"""

from __future__ import annotations

from collections.abc import Sequence


def _failure(pattern: str) -> list[int]:
    """KMP's failure function: for each prefix, the length of its longest proper border."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


class _Matcher:
    """How long a prefix of `pattern` the text read so far ends with."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.fail = _failure(pattern)
        self.state = 0

    def read(self, text: str) -> int:
        """Advance over `text`; return the new state."""
        pattern, fail, k = self.pattern, self.fail, self.state
        for ch in text:
            if k == len(pattern):  # a whole match: continue from its longest border
                k = fail[k - 1]
            while k and pattern[k] != ch:
                k = fail[k - 1]
            if pattern[k] == ch:
                k += 1
        self.state = k
        return k


class Holdback:
    """One sequence's streamed text: `push` each token's text, send what it returns."""

    def __init__(self, stops: Sequence[str]):
        self._matchers = [_Matcher(s) for s in stops if s]
        self._pending = ""  # received and not sent; it is the tail that may start a stop string
        self.sent = 0  # characters sent so far

    def push(self, piece: str) -> str:
        """Take the next piece of text; return the part of the text that may be sent now."""
        if not self._matchers:
            self.sent += len(piece)
            return piece
        self._pending += piece
        keep = max(m.read(piece) for m in self._matchers)
        ready = len(self._pending) - min(keep, len(self._pending))
        out, self._pending = self._pending[:ready], self._pending[ready:]
        self.sent += len(out)
        return out

    def finish(self, final: str) -> str:
        """The rest of `final` (the whole answer, cut before its stop string) not sent yet."""
        self._pending = ""
        return final[self.sent:]
