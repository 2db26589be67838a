"""Tool calling: parse a model's tool calls (``auto``), and force them with a schema (``required`` / named).

Interface (what the server uses):

- Types (``base.py``): ``ToolCall(id, name, arguments: str)``, ``ExtractedToolCalls(content, tool_calls)``,
  streaming ``ToolCallDelta(index, id, name, arguments)`` and ``DeltaMessage(content, tool_calls)``.
- ``get_tool_parser(name, chat_template=None) -> type[ToolParser]``: "hermes", "llama3_json", "mistral", or
  "auto" (picked from the chat template). One parser instance per request (``parser_cls(tools)``):
  ``extract(text) -> ExtractedToolCalls``; streaming ``feed(delta_text) -> DeltaMessage`` then ``finish()``.
  A streamed call arrives as two deltas of the same index: (id, name, arguments="") then (arguments=<all of them>);
  the server may send them as one chunk or two. ``parser_cls.needs_special_tokens``: detokenize with
  ``skip_special_tokens=False`` (mistral, llama3_json).
- ``forced_tool_calls_schema(tools, tool_choice, parallel_tool_calls) -> dict`` and
  ``parse_forced_tool_calls(text) -> list[ToolCall]`` (``forced.py``).
- ``template_supports_tools``, ``default_tool_prompt``, ``messages_for_plain_template`` (``prompt.py``).
"""

from .base import DeltaMessage, ExtractedToolCalls, ToolCall, ToolCallDelta, ToolParser, new_tool_call_id
from .forced import forced_tool_calls_schema, parse_forced_tool_calls, tool_functions
from .parsers import TOOL_PARSERS, HermesToolParser, Llama3JsonToolParser, MistralToolParser
from .prompt import (
    DEFAULT_TOOL_PROMPT,
    default_tool_prompt,
    messages_for_plain_template,
    pick_tool_parser_name,
    template_supports_tools,
)

TOOL_PARSER_NAMES = (*TOOL_PARSERS, "auto")


def get_tool_parser(name: str, chat_template: str | None = None) -> type[ToolParser]:
    """The parser class registered as ``name``; "auto" picks the one the chat template writes."""
    if name == "auto":
        name = pick_tool_parser_name(chat_template)
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r} (known: {', '.join(TOOL_PARSER_NAMES)})")
    return TOOL_PARSERS[name]


__all__ = [
    "DEFAULT_TOOL_PROMPT",
    "TOOL_PARSERS",
    "TOOL_PARSER_NAMES",
    "DeltaMessage",
    "ExtractedToolCalls",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "MistralToolParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolParser",
    "default_tool_prompt",
    "forced_tool_calls_schema",
    "get_tool_parser",
    "messages_for_plain_template",
    "new_tool_call_id",
    "parse_forced_tool_calls",
    "pick_tool_parser_name",
    "template_supports_tools",
    "tool_functions",
]
