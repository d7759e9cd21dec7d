"""Incremental detokenization: each token's share of the text, never half a UTF-8 character.

`tokenizers.decoders.DecodeStream` does the real work (it buffers byte-fallback pieces until they
form a whole character). It is seeded with the tail of the prompt so that the first generated token
keeps its leading space on SentencePiece-style tokenizers ("▁Hello" alone decodes to "Hello").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers.decoders import DecodeStream

from serve.engine.interfaces import Tokenizer

PROMPT_CONTEXT = 6  # prompt tokens fed to the stream first; enough to fix leading-space handling


def backend_of(tokenizer: Tokenizer) -> Any:
    """The `tokenizers.Tokenizer` behind a transformers tokenizer, or None for a slow one."""
    return getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)


class IncrementalDetokenizer:
    """Turns token ids into text pieces one at a time; `step` returns "" while a character is pending."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int]):
        self._tokenizer = tokenizer
        self._backend = backend_of(tokenizer)
        context = list(prompt_ids[-PROMPT_CONTEXT:])
        if self._backend is not None:
            self._stream = DecodeStream(ids=context, skip_special_tokens=False)
        else:  # slow tokenizer: TGI's prefix/read offset method over the whole id list
            self._ids = context
            self._prefix_offset = 0
            self._read_offset = len(context)

    def step(self, token_id: int) -> str:
        """The new text that `token_id` completes (possibly "", possibly several characters).

        DecodeStream raises on some byte-fallback vocabularies (Llama-2, Mistral, Gemma: "Invalid
        prefix encountered"); the engine fails that one request when it does.
        """
        if self._backend is not None:
            return self._stream.step(self._backend, token_id) or ""
        return self._offset_step(token_id)

    def _offset_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=False)
        new = decode(self._ids[self._prefix_offset :], skip_special_tokens=False)
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return new[len(prefix) :]
        return ""


class TokenTexts:
    """Cached single-token texts, for top-n alternatives and prompt tokens (no context needed)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text
