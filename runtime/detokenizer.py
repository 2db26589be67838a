"""Streaming detokenization: token ids in, text deltas out, stop strings applied.

Two holds make a delta safe to send:

1. UTF-8: byte-level BPE splits an emoji or a CJK character over several tokens; until the last byte arrives
   the decoded text ends in U+FFFD, and nothing of it is emitted.
2. Stop strings: a suffix of the text that is a prefix of a stop string might still become that stop string;
   it is held until the next tokens decide.

Only a short window of ids is decoded per step (the ids since the last emitted boundary, plus the chunk before
it so that tokenizers which strip a leading space, like SentencePiece's, decode a continuation correctly):

    ids:    ... | prefix_offset ........ read_offset ........ len(ids)
                  (already emitted:      (not yet emitted)
                   context for decode)
    delta = decode(ids[prefix_offset:]) - decode(ids[prefix_offset:read_offset])

Each step costs O(window + longest stop string), not O(all tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

# How many prompt tokens give the first generated token its decoding context.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character has at most 4 bytes: past this many undecided tokens, a trailing U+FFFD is invalid bytes.
MAX_UNDECIDED_TOKENS = 6


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per-request streaming detokenizer; see the module docstring.

    ``step(new_token_ids) -> (delta, stop)``: the text safe to emit now and, when a stop string completed, that
    string (the request should finish; text after it is dropped and never emitted). ``flush()`` releases the
    held-back text when the request finishes for another reason (length, EOS, abort).

    ``min_tokens``: stop strings count only from the ``min_tokens``-th generated token on (as vLLM checks them);
    before that all text is emitted as it comes, so an early match loses nothing while the tokens keep growing.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stop)!r}")
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self.min_tokens = min_tokens
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # Keep only the ids of the current decode window; older ids are never decoded again.
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)
        if self._prefix_text.endswith(REPLACEMENT_CHAR):
            # the prompt ends inside a character: decode generated tokens on their own
            self._ids, self._read_offset, self._prefix_text = [], 0, ""
        self._pending = ""  # decoded, complete text held back because it may start a stop string
        self._chunks: list[str] = []  # everything emitted, for `output_text`
        self.num_generated_tokens = 0
        self.stop_reason: str | None = None  # the stop string that finished the request
        self.finished = False

    @property
    def output_text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    def step(self, new_token_ids: Sequence[int]) -> tuple[str, str | None]:
        if self.finished:
            return "", self.stop_reason
        self.num_generated_tokens += len(new_token_ids)
        self._ids.extend(int(t) for t in new_token_ids)
        self._pending += self._decode_new(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """The text still held back (a partial character becomes U+FFFD, as ``decode`` would give it)."""
        if self.finished:
            return ""
        self._pending += self._decode_new(final=True)
        delta, _ = self._release(final=True)
        self.finished = True
        return delta

    # ------------------------------------------------------------------------------------------------ internals

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, *, final: bool) -> str:
        """Complete text from the ids after ``read_offset``; nothing while it ends in a partial character."""
        if self._read_offset == len(self._ids):
            return ""
        text = self._decode(self._ids[self._prefix_offset :])
        if not final and text.endswith(REPLACEMENT_CHAR):
            if len(self._ids) - self._read_offset <= MAX_UNDECIDED_TOKENS:
                return ""  # most likely a character still arriving byte by byte
            # invalid bytes (U+FFFD for good) keep arriving: emit up to the last token boundary that ends a
            # complete character, so that the window stays short
            return self._decode_up_to_complete()
        if not text.startswith(self._prefix_text):
            # a tokenizer whose decode is not prefix-stable over this window: decode the new ids alone
            new = self._decode(self._ids[self._read_offset :])
        else:
            new = text[len(self._prefix_text) :]
        if not new and len(self._ids) - self._read_offset <= MAX_UNDECIDED_TOKENS:
            # e.g. a skipped special token: keep the window (and its context) as it is
            return ""
        # slide the window: the newly decoded chunk becomes the context of the next one
        self._ids = self._ids[self._read_offset :]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new

    def _decode_up_to_complete(self) -> str:
        """Emit up to the latest token boundary that no later byte can change, keeping the rest undecided.

        A boundary is safe when decoding the two sides apart gives the whole text and the right side is not
        empty (so no future byte can land next to the left side's last bytes).
        """
        text = self._decode(self._ids[self._prefix_offset :])
        for end in range(len(self._ids) - 1, self._read_offset, -1):
            head = self._decode(self._ids[self._prefix_offset : end])
            tail = self._decode(self._ids[end:])
            if (
                tail
                and head + tail == text
                and head.startswith(self._prefix_text)
                and len(head) > len(self._prefix_text)
            ):
                new = head[len(self._prefix_text) :]
                # the window's context becomes ids[read_offset:end]; ids[end:] stay undecided
                self._ids = self._ids[self._read_offset :]
                end -= self._read_offset
                self._prefix_text = self._decode(self._ids[:end])
                self._prefix_offset, self._read_offset = 0, end
                return new
        return ""

    def _release(self, *, final: bool) -> tuple[str, str | None]:
        """Apply the stop strings to the pending text; emit what can no longer be part of one."""
        text = self._pending
        if self.stop and self.num_generated_tokens >= self.min_tokens:
            match = self._find_stop(text)
            if match is not None:
                index, stop = match
                end = index + len(stop) if self.include_stop_str_in_output else index
                self._pending = ""
                self.finished = True
                self.stop_reason = stop
                return self._emit(text[:end]), stop
            if not final:
                hold = self._stop_prefix_len(text)
                self._pending = text[len(text) - hold :] if hold else ""
                return self._emit(text[: len(text) - hold]), None
        self._pending = ""
        return self._emit(text), None

    def _emit(self, text: str) -> str:
        if text:
            self._chunks.append(text)
        return text

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string that completes first in ``text`` (ties: the one starting first, i.e. the longest).

        Deciding by where a match ends, not where it starts, gives the same answer however the tokens were
        grouped into steps: streaming one token at a time, the first stop string to complete is the one seen.
        """
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self.stop:
            index = text.find(stop)  # the first occurrence is also the first to end
            if index >= 0:
                candidate = (index + len(stop), index, stop)
                if best is None or candidate[:2] < best[:2]:
                    best = candidate
        return None if best is None else (best[1], best[2])

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        for length in range(min(len(text), self._max_stop_len - 1), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self.stop):
                return length
        return 0
