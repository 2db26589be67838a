"""The tool-call formats: hermes, llama3_json, mistral (see base.py for the machine they plug into).

hermes (Hermes 2 Pro, Qwen2.5, Qwen3, and the default tool prompt)::

    optional text <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

    A missing ``</tool_call>`` at the end of the output is tolerated (small models stop at EOS right after the JSON).

llama3_json (Llama 3.1 / 3.2 JSON tool calling): the whole output is calls, optionally after ``<|python_tag|>``::

    {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

    An output that does not begin with ``{`` or ``<|python_tag|>`` is content.

mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (tokenizer v3-v7), or
``[TOOL_CALLS]name[ARGS]{...}`` once per call (v11+).
"""

from __future__ import annotations

import re
from typing import ClassVar

from .base import CallParse, ToolParser, call_from_object, json_value_end, loads_or_none


class HermesToolParser(ToolParser):
    name = "hermes"
    start_markers = ("<tool_call>",)
    END = "</tool_call>"

    def _parse_call(self, text: str, final: bool) -> CallParse | None:
        end = text.find(self.END)
        if end < 0:
            if not final:
                return None
            body, consumed = text, len(text)
        else:
            body, consumed = text[:end], end + len(self.END)
        call = call_from_object(loads_or_none(body.strip()))
        if call is None:
            return CallParse(consumed, [], self.start_markers[0] + text[:consumed])
        return CallParse(consumed, [call])


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    needs_special_tokens = True
    PYTHON_TAG = "<|python_tag|>"

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self._decided = False  # whether the output is calls (or content) is known
        self._content_only = False

    def _find_start(self, text: str) -> tuple[int, str] | None:
        if self._content_only:
            return None
        stripped = text.lstrip()
        lead = len(text) - len(stripped)
        if stripped.startswith("{"):
            self._decided = True
            return lead, ""
        if stripped.startswith(self.PYTHON_TAG):
            self._decided = True
            return lead, self.PYTHON_TAG
        if stripped and not self.PYTHON_TAG.startswith(stripped):
            self._decided = self._content_only = True
        return None

    def _hold_len(self, text: str) -> int:
        return 0 if self._content_only else len(text)  # undecided: hold everything

    def _parse_call(self, text: str, final: bool) -> CallParse | None:
        stripped = text.lstrip()
        lead = len(text) - len(stripped)
        if stripped.startswith(";"):
            stripped = stripped[1:].lstrip()
            lead = len(text) - len(stripped)
        if not stripped:
            return CallParse(len(text), [], done=False) if final else None
        if not stripped.startswith("{"):
            return self._rest_is_content(text)
        end = json_value_end(stripped, 0)
        if end is None:
            return self._rest_is_content(text) if final else None
        call = call_from_object(loads_or_none(stripped[:end]), ("parameters", "arguments"))
        if call is None:
            return self._rest_is_content(text)
        return CallParse(lead + end, [call], done=False)

    def _rest_is_content(self, text: str) -> CallParse:
        self._content_only = True
        return CallParse(len(text), [], text)


class MistralToolParser(ToolParser):
    name = "mistral"
    needs_special_tokens = True
    start_markers = ("[TOOL_CALLS]",)
    ARGS: ClassVar[str] = "[ARGS]"
    _NAME = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*")
    # a name still arriving, or the first characters of "[ARGS]" after it
    _PARTIAL = re.compile(r"[A-Za-z0-9_.\-]*\s*(\[(A(R(G(S)?)?)?)?)?")

    def _parse_call(self, text: str, final: bool) -> CallParse | None:
        stripped = text.lstrip()
        lead = len(text) - len(stripped)
        if not stripped:
            return CallParse(len(text), [], self.start_markers[0] + text) if final else None
        if stripped[0] in "[{":
            end = json_value_end(stripped, 0)
            if end is None:
                return self._malformed(text) if final else None
            value = loads_or_none(stripped[:end])
            objects = value if isinstance(value, list) else [value]
            calls = [call_from_object(obj) for obj in objects]
            if not objects or any(c is None for c in calls):
                return self._malformed(text[: lead + end], lead + end)
            return CallParse(lead + end, [c for c in calls if c is not None])
        # v11+: name[ARGS]{...}
        args = stripped.find(self.ARGS)
        if args < 0:
            partial_name = self._PARTIAL.fullmatch(stripped) is not None
            return None if partial_name and not final else self._malformed(text)
        name = self._NAME.fullmatch(stripped[:args])
        body_start = args + len(self.ARGS)
        body = stripped[body_start:].lstrip()
        body_start += len(stripped) - body_start - len(body)  # where the arguments begin in `stripped`
        if name is None or (body and body[0] != "{"):
            return self._malformed(text)
        end = json_value_end(body, 0) if body else None
        if end is None:
            return self._malformed(text) if final else None
        call = call_from_object({"name": name.group(1), "arguments": loads_or_none(body[:end])})
        consumed = lead + body_start + end
        if call is None:
            return self._malformed(text[:consumed], consumed)
        return CallParse(consumed, [call])

    def _malformed(self, text: str, consumed: int | None = None) -> CallParse:
        return CallParse(len(text) if consumed is None else consumed, [], self.start_markers[0] + text)


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}
