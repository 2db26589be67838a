"""Tool-call parsing: typed results, and one incremental state machine that both streaming and ``extract`` run.

    parser = HermesToolParser()
    for delta_text in text_deltas:
        message = parser.feed(delta_text)     # DeltaMessage(content, tool_calls)
    message = parser.finish()                 # flushes held text; an unfinished call becomes content
    HermesToolParser().extract(full_text)     # ExtractedToolCalls(content, tool_calls): the same machine at once

Because ``extract`` is ``feed(text) + finish()``, a stream split anywhere yields the same calls, the same arguments
and the same content as the whole text (the tests split recorded outputs at every character boundary).

A call is sent once it has parsed completely: its first delta carries index, id and name (``arguments=""``), the
next one its arguments. Sending the arguments only then is what keeps a stream from carrying a call the final
message would not have: a malformed call (bad JSON, no name, cut off by max_tokens) comes back as content, never as
an exception. Content: the text outside calls; whitespace between calls is dropped, and content that is only
whitespace is None when calls were made. ``arguments`` is the JSON object re-serialized (``json.dumps``, not
ASCII-escaped), as vLLM returns it.

Subclasses name their start markers and implement ``_parse_call(text, final)`` for the text after a marker.
``needs_special_tokens``: the markers are special tokens (``[TOOL_CALLS]``, ``<|python_tag|>``), so the text must be
detokenized with ``skip_special_tokens=False``.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, ClassVar

_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, serialized


@dataclass
class ExtractedToolCalls:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)

    @property
    def tools_called(self) -> bool:
        return bool(self.tool_calls)


@dataclass(frozen=True)
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class DeltaMessage:
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.content and not self.tool_calls


@dataclass(frozen=True)
class CallParse:
    """What ``_parse_call`` made of the text after a start marker."""

    consumed: int  # characters of that text used up
    calls: list[ToolCall]
    content: str = ""  # text given back as content (a malformed call)
    done: bool = True  # False: more calls follow without a new marker (llama3_json's "; {...}")


class ToolParser:
    name: ClassVar[str] = ""
    start_markers: ClassVar[tuple[str, ...]] = ()
    needs_special_tokens: ClassVar[bool] = False

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self.tools = tools or []
        self._buffer = ""  # text not yet decided
        self._in_call = False
        self._held_ws = ""  # trailing whitespace of the content, sent only when more content follows
        self._ws_before_call = ""  # the held whitespace when a call began: content again if the call is malformed
        self._after_call = False  # whitespace right after a call is not content
        self._num_calls = 0
        self._finished = False

    # ------------------------------------------------------------------------------------------------ public

    def feed(self, delta_text: str) -> DeltaMessage:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buffer += delta_text
        return self._run(final=False)

    def finish(self) -> DeltaMessage:
        if self._finished:
            return DeltaMessage()
        message = self._run(final=True)
        self._finished = True
        if self._num_calls == 0 and self._held_ws:
            message.content = (message.content or "") + self._held_ws
        self._held_ws = ""
        return message

    def extract(self, text: str) -> ExtractedToolCalls:
        """The whole output at once: the same machine as streaming, on a fresh parser."""
        parser = type(self)(self.tools)
        first, last = parser.feed(text), parser.finish()
        content = (first.content or "") + (last.content or "")
        calls: dict[int, dict[str, str]] = {}
        for delta in [*first.tool_calls, *last.tool_calls]:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            call["name"] = delta.name or call["name"]
            call["arguments"] += delta.arguments
        tool_calls = [ToolCall(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]
        return ExtractedToolCalls(content if content and (content.strip() or not tool_calls) else None, tool_calls)

    # ----------------------------------------------------------------------------------------- for subclasses

    def _parse_call(self, text: str, final: bool) -> CallParse | None:
        """Parse the text after a start marker; None: not decidable yet (only when not ``final``)."""
        raise NotImplementedError

    def _find_start(self, text: str) -> tuple[int, str] | None:
        """The first start marker in ``text``: (index, marker)."""
        found = [(i, m) for m in self.start_markers if (i := text.find(m)) >= 0]
        return min(found) if found else None

    def _hold_len(self, text: str) -> int:
        """How many trailing characters of content might begin a start marker."""
        for length in range(min(len(text), max((len(m) for m in self.start_markers), default=1) - 1), 0, -1):
            if any(m.startswith(text[-length:]) for m in self.start_markers):
                return length
        return 0

    # ------------------------------------------------------------------------------------------------ machine

    def _run(self, *, final: bool) -> DeltaMessage:
        out = DeltaMessage()
        while True:
            if self._in_call:
                parsed = self._parse_call(self._buffer, final)
                if parsed is None:
                    return out
                self._buffer = self._buffer[parsed.consumed :]
                for call in parsed.calls:
                    index = self._num_calls
                    self._num_calls += 1
                    out.tool_calls.append(ToolCallDelta(index, call.id, call.name, ""))
                    out.tool_calls.append(ToolCallDelta(index, arguments=call.arguments))
                if parsed.calls:
                    self._ws_before_call, self._after_call = "", True
                if parsed.content:
                    self._content(out, self._ws_before_call + parsed.content)
                    self._ws_before_call = ""
                self._in_call = not parsed.done
                if final and not self._buffer:
                    return out
                continue
            start = self._find_start(self._buffer)
            if start is not None:
                index, marker = start
                self._content(out, self._buffer[:index])
                self._buffer = self._buffer[index + len(marker) :]
                self._in_call = True
                self._ws_before_call, self._held_ws = self._held_ws, ""  # whitespace before a call is not content
                continue
            hold = 0 if final else self._hold_len(self._buffer)
            self._content(out, self._buffer[: len(self._buffer) - hold])
            self._buffer = self._buffer[len(self._buffer) - hold :]
            return out

    def _content(self, out: DeltaMessage, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            self._after_call = not text
        if not text:
            return
        text = self._held_ws + text
        body = text.rstrip()
        self._held_ws = text[len(body) :]
        if body:
            out.content = (out.content or "") + body


# ---- JSON helpers ------------------------------------------------------------------------------------------


def json_value_end(text: str, start: int) -> int | None:
    """The index just past the JSON object or array that begins at ``text[start]``; None if it is not closed yet.

    A scanner, not a parser: it tracks strings, escapes and bracket depth only (json.loads checks the rest).
    """
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def call_from_object(obj: Any, argument_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """A ToolCall from ``{"name": str, "arguments": {...}}`` (or the arguments as a JSON string); None if malformed."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    key = next((k for k in argument_keys if k in obj), None)
    arguments = {} if key is None else obj[key]
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(new_tool_call_id(), obj["name"], json.dumps(arguments, ensure_ascii=False))


def loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
