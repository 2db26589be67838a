"""Suffix drafts across requests: agent loops and repeated tool calls repeat themselves from one request to the
next, so besides the request's own tokens (prompt lookup) the finished outputs of recent requests are indexed.

    finished request ──▶ its last ``MAX_TOKENS_PER_REQUEST`` tokens ──▶ index: n-gram ─▶ (request, end position)
    a decoding sequence: its own context first (ngram.py); else its last n tokens (longest n first) in the index
                         ─▶ the tokens that followed there

Memory is bounded: at most ``max_cached_requests`` requests, each at most ``MAX_TOKENS_PER_REQUEST`` tokens, and
``max_n - min_n + 1`` index entries per token; the oldest request is evicted first (with its index entries).
"""

from __future__ import annotations

from collections import OrderedDict

MAX_TOKENS_PER_REQUEST = 2048


class SuffixCache:
    def __init__(self, max_cached_requests: int, min_n: int, max_n: int) -> None:
        self.max_cached_requests = max_cached_requests
        self.min_n, self.max_n = min_n, max_n
        self._docs: OrderedDict[int, list[int]] = OrderedDict()  # doc id -> tokens, oldest first
        # n-gram -> (doc id, index just past it), its latest occurrence; keys of every length in [min_n, max_n]
        self._index: dict[tuple[int, ...], tuple[int, int]] = {}
        self._next_id = 0

    @property
    def num_cached_tokens(self) -> int:
        return sum(len(d) for d in self._docs.values())

    def add(self, token_ids: list[int]) -> None:
        """Index a finished request's tokens (its prompt and output), evicting the oldest beyond the budget."""
        tokens = list(token_ids[-MAX_TOKENS_PER_REQUEST:])
        if len(tokens) <= self.min_n:
            return
        doc = self._next_id
        self._next_id += 1
        self._docs[doc] = tokens
        for n in range(self.min_n, self.max_n + 1):
            for end in range(n, len(tokens)):  # an n-gram with at least one token after it
                self._index[tuple(tokens[end - n : end])] = (doc, end)
        while len(self._docs) > self.max_cached_requests:
            self._evict()

    def _evict(self) -> None:
        doc, tokens = self._docs.popitem(last=False)
        for n in range(self.min_n, self.max_n + 1):
            for end in range(n, len(tokens)):
                key = tuple(tokens[end - n : end])
                if self._index.get(key, (None, 0))[0] == doc:
                    del self._index[key]  # a later request's occurrence, if any, was indexed over it

    def propose(self, context: list[int], num_tokens: int) -> list[int]:
        """What followed the longest suffix of ``context`` (length in [min_n, max_n]) in a cached request."""
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            hit = self._index.get(tuple(context[-n:]))
            if hit is not None:
                doc, end = hit
                return self._docs[doc][end : end + num_tokens]
        return []
