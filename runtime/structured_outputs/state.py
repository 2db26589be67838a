"""Per-sequence grammar state and the token bitmask.

    state = compiled.new_state()
    bitmask = allocate_bitmask(num_rows, vocab_size)        # [num_rows, ceil(vocab_size / 32)] int32, CPU
    state.fill_bitmask(bitmask, row)                         # bit j of row set <=> token j allowed next
    apply_bitmask(logits, bitmask, rows, vocab_size)         # logits [num_rows, width]: masked -> -inf, rows only
    state.accept(token_id)  # after the engine appended the sampled token; False: the token breaks the grammar

``is_terminated()``: the grammar is complete and its stop token was accepted. ``rollback(n)`` undoes the last n
accepted tokens (speculative decoding). ``fork()`` copies the state (``n > 1`` choices after a shared prefix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import xgrammar as xg

if TYPE_CHECKING:
    from .backend import CompiledGrammar


class GrammarState:
    """Wraps one ``xgrammar.GrammarMatcher``; not thread-safe (a sequence lives in one engine thread)."""

    def __init__(self, compiled: CompiledGrammar, matcher: xg.GrammarMatcher | None = None) -> None:
        self.compiled = compiled
        self._matcher = matcher if matcher is not None else xg.GrammarMatcher(compiled.compiled)
        self.num_accepted_tokens = 0

    def accept(self, token_id: int) -> bool:
        ok = bool(self._matcher.accept_token(int(token_id)))
        self.num_accepted_tokens += ok
        return ok

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())

    def is_completed(self) -> bool:
        """The text so far is a complete match (the stop token may still follow)."""
        return bool(self._matcher.is_completed())

    def rollback(self, num_tokens: int) -> None:
        if not 0 <= num_tokens <= self.num_accepted_tokens:
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self.num_accepted_tokens} were accepted")
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self.num_accepted_tokens -= num_tokens

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (the matcher does not move)."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def fork(self) -> GrammarState:
        state = GrammarState(self.compiled, self._matcher.fork())
        state.num_accepted_tokens = self.num_accepted_tokens
        return state


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, ceil(vocab_size / 32)] int32 on the CPU, all tokens allowed."""
    return xg.allocate_token_bitmask(num_rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab_size: int) -> None:
    """Mask ``logits[rows]`` in place ([num_rows, width], any float dtype, any device) by ``bitmask[rows]``.

    ``width`` may exceed ``vocab_size`` (a padded head): those columns are masked too, no grammar allows them.
    The bitmask has a row per logits row (the other rows are not read).
    """
    if not rows:
        return
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    width = logits.shape[-1]
    xg.apply_token_bitmask_inplace(logits, bitmask, vocab_size=min(vocab_size, width), indices=rows)
    if width > vocab_size:
        logits[rows, vocab_size:] = float("-inf")
