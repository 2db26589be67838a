"""One chat choice's text turned into OpenAI's message parts, the same way streamed and whole.

    text deltas ─▶ reasoning parser (--reasoning-parser): reasoning_content | answer
                   answer ─▶ tool_choice required / named: grammar-made calls (tools.ForcedCallStream)
                             tool_choice auto: the --tool-call-parser: content | tool_calls
                             otherwise: content

A non-streamed answer is the same machine fed the whole text at once, with its deltas merged (``merge``), so a
stream's fragments concatenate to exactly the non-streamed fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..reasoning import ReasoningParser
from ..tool_parsers import ToolParser
from . import protocol as p
from .tools import ForcedCallStream, ToolPlan, delta_calls


@dataclass
class ChoiceOutput:
    tools: ToolPlan
    tool_parser: ToolParser | None = None
    reasoning: ReasoningParser | None = None
    forced: ForcedCallStream | None = None
    num_calls: int = 0
    _parts: list[p.DeltaMessage] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.tools.is_forced:
            self.forced = ForcedCallStream(self.tools)

    def feed(self, text: str) -> p.DeltaMessage | None:
        """The delta for this much more text; None when there is nothing to send yet."""
        if not text:
            return None
        if self.reasoning is None:
            return self._answer(text, None)
        thought, answer = self.reasoning.feed(text)
        return self._answer(answer, thought or None)

    def finish(self, reason: p.FinishReasonName | None) -> tuple[p.DeltaMessage | None, p.FinishReasonName | None]:
        """What is still held back, and the finish reason to report ("tool_calls" when calls were made)."""
        thought, answer = ("", "") if self.reasoning is None else self.reasoning.finish()
        delta = self._answer(answer, thought or None)
        calls: list[p.DeltaToolCall] = []
        content = ""
        if self.forced is not None:
            whole = False
            if reason == "stop":
                more, whole = self.forced.finish()
                calls += more
            if not whole and self.tools.mode == "required":
                # cut by max_tokens: no call was sent, the partial text comes back as content
                content = "".join(self.forced.text)
        elif self.tool_parser is not None:
            flushed = self.tool_parser.finish()
            calls += delta_calls(flushed.tool_calls)
            content = flushed.content or ""
        self.num_calls += sum(1 for c in calls if c.id is not None)
        if calls or content:
            extra = p.DeltaMessage(content=content or None, tool_calls=calls or None)
            delta = extra if delta is None else _join(delta, extra)
        if self.num_calls and reason == "stop":
            reason = "tool_calls"
        return delta, reason

    def _answer(self, text: str, thought: str | None) -> p.DeltaMessage | None:
        content: str | None = None
        calls: list[p.DeltaToolCall] = []
        if text:
            if self.forced is not None:
                calls = self.forced.feed(text)
            elif self.tool_parser is not None:
                parsed = self.tool_parser.feed(text)
                content, calls = parsed.content or None, delta_calls(parsed.tool_calls)
            else:
                content = text
        self.num_calls += sum(1 for c in calls if c.id is not None)
        if content is None and not calls and thought is None:
            return None
        kwargs: dict[str, object] = {}
        if thought is not None:
            kwargs["reasoning_content"] = thought
        if content is not None:
            kwargs["content"] = content
        if calls:
            kwargs["tool_calls"] = calls
        return p.DeltaMessage(**kwargs)  # type: ignore[arg-type]


def _join(a: p.DeltaMessage, b: p.DeltaMessage) -> p.DeltaMessage:
    return merge([a, b], as_delta=True)  # type: ignore[return-value]


def merge(deltas: list[p.DeltaMessage], *, as_delta: bool = False) -> p.ChatResponseMessage | p.DeltaMessage:
    """Deltas folded into one message: texts concatenated, tool calls grouped by index."""
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(d.reasoning_content or "" for d in deltas)
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        for c in d.tool_calls or []:
            entry = calls.setdefault(c.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] = c.id or entry["id"]
            if c.function is not None:
                entry["name"] = c.function.name or entry["name"]
                entry["arguments"] += c.function.arguments or ""
    if as_delta:
        kwargs: dict[str, object] = {}
        if any(d.reasoning_content is not None for d in deltas):
            kwargs["reasoning_content"] = reasoning
        if any(d.content is not None for d in deltas):
            kwargs["content"] = content
        all_calls = [c for d in deltas for c in d.tool_calls or []]
        if all_calls:
            kwargs["tool_calls"] = all_calls
        return p.DeltaMessage(**kwargs)  # type: ignore[arg-type]
    tool_calls = [
        p.ResponseToolCall(id=c["id"], function=p.ResponseFunctionCall(name=c["name"], arguments=c["arguments"]))
        for _, c in sorted(calls.items())
    ]
    return p.ChatResponseMessage(
        content=None if tool_calls and not content.strip() else content,
        tool_calls=tool_calls,
        reasoning_content=reasoning or None,
    )
