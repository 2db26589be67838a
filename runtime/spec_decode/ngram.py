"""Prompt lookup (n-gram) drafts: when the sequence's last n tokens occurred earlier in it, propose the tokens that
followed that occurrence. Quoting, rewriting and code editing repeat long runs of the context, so the guess is often
right; free text rarely matches, and then nothing is proposed (the step costs what it did)."""

from __future__ import annotations

import numpy as np


def propose_ngram(token_ids: list[int], num_tokens: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``num_tokens`` draft tokens for ``token_ids`` (prompt + output so far); [] without a match.

    The longest n in [min_n, max_n] whose suffix occurs earlier wins; among its occurrences the latest one (the
    most recent context is the likeliest to be continued the same way)."""
    length = len(token_ids)
    if num_tokens < 1 or length <= min_n:
        return []
    arr = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = arr[length - n :]
        # windows that start at 0 .. length - n - 1: every earlier occurrence (not the suffix itself)
        windows = np.lib.stride_tricks.sliding_window_view(arr[: length - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return token_ids[start : start + num_tokens]
    return []
