"""Reasoning parsers: split ``<think>…</think>`` from the answer (``reasoning_content`` vs ``content``).

    parser = get_reasoning_parser("qwen3")(tokenizer)   # tokenizer: for the tag token ids (optional)
    reasoning, content = parser.extract(text)          # whole output; either may be None
    for delta in text_deltas:
        reasoning_delta, content_delta = parser.feed(delta)   # a ReasoningDelta (NamedTuple), "" when nothing
    reasoning_delta, content_delta = parser.finish()
    parser.is_reasoning_end(prompt_token_ids, output_token_ids)   # structured outputs start after this is True

Formats:
- ``qwen3``: the output holds both tags (``<think>\\n…\\n</think>\\n\\nanswer``). An output that does not begin with
  ``<think>`` (thinking disabled: the template wrote an empty block into the prompt) is all content.
- ``deepseek_r1``: the template opens ``<think>`` in the prompt; the output is reasoning until ``</think>`` (a
  leading ``<think>`` in the output is tolerated). An output without ``</think>`` is all reasoning.
An unclosed think block (cut off by max_tokens) is reasoning. Whitespace right after ``</think>`` is dropped.
``extract`` is ``feed(text) + finish()`` on a fresh parser, so a stream split anywhere gives the same two texts.

``is_reasoning_end``: in token space, for the engine (a grammar constrains only the answer): True when a
``</think>`` comes after the last ``<think>`` in prompt + output; False inside an open block; with no tag at all,
``qwen3`` is answering (True) and ``deepseek_r1`` is thinking (False). A tokenizer without single-token tags
(or none given) has no reasoning in token space: True.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, NamedTuple, Protocol

THINK_START = "<think>"
THINK_END = "</think>"


class _Vocab(Protocol):
    def token_to_id(self, token: str) -> int | None: ...


class ReasoningDelta(NamedTuple):
    reasoning: str
    content: str


class ReasoningParser:
    name: ClassVar[str] = ""
    starts_in_reasoning: ClassVar[bool] = False  # deepseek_r1: the prompt opened the block

    def __init__(self, tokenizer: _Vocab | None = None) -> None:
        self.start_token_id = tokenizer.token_to_id(THINK_START) if tokenizer is not None else None
        self.end_token_id = tokenizer.token_to_id(THINK_END) if tokenizer is not None else None
        self._buffer = ""
        # "start": before the first non-space text; "reasoning"; "content"
        self._state = "start"
        self._content_started = False
        self._saw_reasoning = False

    # ---- text ------------------------------------------------------------------------------------------------

    def feed(self, delta_text: str) -> ReasoningDelta:
        self._buffer += delta_text
        return self._run(final=False)

    def finish(self) -> ReasoningDelta:
        return self._run(final=True)

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None for a part that is absent."""
        parser = type(self)()
        first, last = parser.feed(text), parser.finish()
        reasoning = first.reasoning + last.reasoning
        content = first.content + last.content
        return (reasoning or None), (content or None)

    def _run(self, *, final: bool) -> ReasoningDelta:
        reasoning = content = ""
        while True:
            if self._state == "start":
                stripped = self._buffer.lstrip()
                if stripped.startswith(THINK_START):
                    self._buffer = stripped[len(THINK_START) :]
                    self._state, self._saw_reasoning = "reasoning", True
                    continue
                if THINK_START.startswith(stripped) and not final:
                    return ReasoningDelta(reasoning, content)  # may still become "<think>"
                self._state = "reasoning" if self.starts_in_reasoning else "content"
                self._saw_reasoning = self.starts_in_reasoning
                continue
            if self._state == "reasoning":
                end = self._buffer.find(THINK_END)
                if end >= 0:
                    reasoning += self._buffer[:end]
                    self._buffer = self._buffer[end + len(THINK_END) :]
                    self._state = "content"
                    continue
                hold = 0 if final else _partial_suffix(self._buffer, THINK_END)
                reasoning += self._buffer[: len(self._buffer) - hold]
                self._buffer = self._buffer[len(self._buffer) - hold :]
                return ReasoningDelta(reasoning, content)
            # content
            text = self._buffer
            self._buffer = ""
            if not self._content_started and self._saw_reasoning:
                text = text.lstrip()  # "</think>\n\nanswer": the blank lines belong to neither
            if text:
                self._content_started = True
            content += text
            return ReasoningDelta(reasoning, content)

    # ---- tokens ----------------------------------------------------------------------------------------------

    def is_reasoning_end(self, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int] = ()) -> bool:
        if self.start_token_id is None or self.end_token_id is None:
            return True
        ids = [*prompt_token_ids, *output_token_ids]
        last_start = _last_index(ids, self.start_token_id)
        last_end = _last_index(ids, self.end_token_id)
        if last_end > last_start:
            return True
        if last_start >= 0:
            return False
        return not self.starts_in_reasoning


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    starts_in_reasoning = True


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p for p in (Qwen3ReasoningParser, DeepSeekR1ReasoningParser)
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r} (known: {', '.join(REASONING_PARSERS)})")
    return REASONING_PARSERS[name]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0


def _last_index(ids: list[int], token_id: int) -> int:
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] == token_id:
            return i
    return -1
