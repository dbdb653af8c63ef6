"""Incremental detokenization: turn a growing list of token ids into text deltas.

Decoding each new token alone is wrong for byte-level BPE (a character may span
tokens, giving U+FFFD halves) and for SentencePiece (a token's leading space depends
on what precedes it). So each step decodes a short window of earlier tokens plus the
new ones and emits only the text past that window, once it no longer ends in an
incomplete character.
"""

from __future__ import annotations

from typing import Protocol

# How many prompt tokens to decode as context for the first generated ones.
CONTEXT_TOKENS = 6


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text it completes (possibly empty)."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        # The tokens just emitted become the context of the next step; older ones are dropped
        # so each step costs the same.
        del self.token_ids[:self.read_offset]
        self.prefix_offset, self.read_offset = 0, len(self.token_ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character shows as U+FFFD)."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text):]
