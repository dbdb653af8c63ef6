"""Prompt lookup decoding: draft the tokens that followed the latest earlier match of the last n-gram.

Strong wherever the output copies its input (editing, summarising, code, retrieval
answers). Each sequence keeps an incremental index n-gram -> where it last ended, so a
proposal costs a few dict lookups instead of a scan of the whole context.
"""

from __future__ import annotations

import weakref

from thrifty.engine.sequence import Sequence
from thrifty.spec.draft import Draft, PerSequenceProposer


class _Index:
    def __init__(self, ngram_sizes: range) -> None:
        self.sizes = ngram_sizes
        self.indexed = 0  # positions p < indexed have been recorded
        self.ends: dict[tuple[int, ...], int] = {}  # n-gram -> latest p with tokens[p - n:p] == n-gram

    def update(self, tokens: list[int]) -> None:
        # Position p is recorded once a token follows it, so the sequence's own suffix never matches itself.
        for p in range(self.indexed, len(tokens)):
            for n in self.sizes:
                if p >= n:
                    self.ends[tuple(tokens[p - n:p])] = p
        self.indexed = len(tokens)


class NgramProposer(PerSequenceProposer):
    name = "ngram"
    # Copied chains tend to be right all the way or wrong at once, and a lookup costs nothing to
    # draft, so long drafts pay in a copy spell; the controller shortens them elsewhere (edit
    # workload, float32 target: 2.16x with 16 against 1.96x with 8 in the same session).
    default_draft_tokens = 16

    def __init__(self, min_n: int = 1, max_n: int = 4, short_match_caps: dict[int, int] | None = None) -> None:
        self.sizes = range(min_n, max_n + 1)
        # A short match predicts little: on the edit and code prompts a 1-token match drafted about 6
        # tokens and got 0.8 accepted, a 4-token one 8.4 (match_size -> most draft tokens).
        self.short_match_caps = {1: 2, 2: 8} if short_match_caps is None else short_match_caps
        self._indexes: weakref.WeakKeyDictionary[Sequence, _Index] = weakref.WeakKeyDictionary()

    def propose(self, seq: Sequence, max_tokens: int) -> Draft | None:
        tokens = seq.token_ids
        index = self._indexes.get(seq)
        if index is None:
            index = self._indexes[seq] = _Index(self.sizes)
        index.update(tokens)
        for n in reversed(self.sizes):  # longest match first: the most specific context
            if len(tokens) <= n:
                continue
            end = index.ends.get(tuple(tokens[-n:]))
            if end is not None:
                continuation = tokens[end:end + min(max_tokens, self.short_match_caps.get(n, max_tokens))]
                if continuation:
                    return Draft.chain(continuation, self.name)
        return None
