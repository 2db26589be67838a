"""Tool calling for /v1/chat/completions: what the template sees, what the grammar enforces, what comes back.

    tool_choice   prompt                                  grammar                              read back by
    none          no tools                                -                                    -
    auto          tools= to the template, or the          -                                    --tool-call-parser
                  default tool prompt where it has none
    required      same                                    forced_tool_calls_schema: a JSON     parse_forced_tool_calls
                                                          array of {"name", "arguments"}
    named         same                                    that function's parameters schema    the text is the arguments

``required`` and a named function are enforced with structured outputs, so even a tiny model returns calls whose
arguments validate. A named call's grammar is its parameters schema itself (rather than a one-element array), so
its arguments stream as they are generated. History: an assistant turn's ``tool_calls`` and ``role: "tool"``
turns reach a tool-aware template as HF templates expect them (arguments as a dict); a plain template gets them
rewritten as text (``tool_parsers.messages_for_plain_template``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ..structured_outputs import StructuredOutputsParams
from ..tool_parsers import (
    ToolCallDelta,
    ToolParser,
    forced_tool_calls_schema,
    get_tool_parser,
    messages_for_plain_template,
    new_tool_call_id,
    parse_forced_tool_calls,
)
from . import protocol as p
from .errors import bad_request
from .structured import Constraint

ToolMode = Literal["none", "auto", "required", "named"]


@dataclass
class ToolPlan:
    mode: ToolMode = "none"
    tools: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's shape, for the template and the parser
    named: str | None = None
    constraint: Constraint | None = None  # required / named: the grammar that makes the calls

    @property
    def is_forced(self) -> bool:
        return self.mode in ("required", "named")


def plan_tools(req: p.ChatCompletionRequest) -> ToolPlan:
    """Check tools and tool_choice; a 400 names the field."""
    tools = req.tools or []
    choice = req.tool_choice
    if not tools:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("tools must have distinct function names", param="tools")
    as_dicts = [t.model_dump(exclude_none=True) for t in tools]
    if choice == "none":
        return ToolPlan()
    if choice is None or choice == "auto":
        return ToolPlan("auto", as_dicts)
    if choice == "required":
        try:
            schema = forced_tool_calls_schema(as_dicts, "required", req.parallel_tool_calls)
        except ValueError as exc:
            raise bad_request(str(exc), param="tools") from None
        return ToolPlan("required", as_dicts, constraint=_constraint(schema, "tools"))
    assert isinstance(choice, p.NamedToolChoice)
    name = choice.function.name
    if name not in names:
        raise bad_request(f"tool_choice names the function '{name}', which is not in tools", param="tool_choice")
    index = names.index(name)
    schema = tools[index].function.parameters or {"type": "object", "properties": {}}
    return ToolPlan("named", as_dicts, named=name, constraint=_constraint(schema, f"tools.{index}"))


def _constraint(schema: dict[str, Any], param: str) -> Constraint:
    # strict (OpenAI's function strict mode): no undeclared properties, so that a small model cannot keep adding
    # keys after the arguments until max_tokens (the call wrapper declares only name and arguments)
    return Constraint(StructuredOutputsParams(json=schema, strict=True), param)


def template_messages(
    messages: list[p.ChatMessage], plan: ToolPlan, native: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages for the template, its ``tools=``). ``native``: the template renders tools and calls itself."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list) and any(not isinstance(part, p.TextContentPart) for part in m.content):
            raise bad_request("only text content parts are supported", param=f"messages.{i}.content")
        item: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name:
            item["name"] = m.name
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            item["tool_calls"] = [_call_for_template(c, i, native) for c in m.tool_calls]
        out.append(item)
    tools = plan.tools if plan.mode != "none" else None
    if native:
        return out, tools
    return messages_for_plain_template(out, tools), None


def _call_for_template(call: p.ToolCall, message_index: int, native: bool) -> dict[str, Any]:
    arguments: Any = call.function.arguments or "{}"
    if native:  # HF templates write ``arguments | tojson``: they want the object
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise bad_request(
                "tool call arguments must be a JSON text", param=f"messages.{message_index}.tool_calls"
            ) from None
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def new_parser(plan: ToolPlan, parser_name: str | None, chat_template: str | None) -> ToolParser | None:
    """``auto``'s parser, one per choice; None when the server has no --tool-call-parser."""
    if plan.mode != "auto" or parser_name is None:
        return None
    return get_tool_parser(parser_name, chat_template)(plan.tools)


def forced_calls(plan: ToolPlan, text: str) -> list[p.ResponseToolCall]:
    """The calls a grammar-made output spells; [] when it is not whole (cut by max_tokens)."""
    if plan.mode == "named":
        assert plan.named is not None
        try:
            json.loads(text)
        except ValueError:
            return []
        return [_response_call(new_tool_call_id(), plan.named, text.strip())]
    return [_response_call(c.id, c.name, c.arguments) for c in parse_forced_tool_calls(text)]


def _response_call(call_id: str, name: str, arguments: str) -> p.ResponseToolCall:
    return p.ResponseToolCall(id=call_id, function=p.ResponseFunctionCall(name=name, arguments=arguments))


def delta_calls(deltas: list[ToolCallDelta]) -> list[p.DeltaToolCall]:
    """A tool parser's streamed call fragments in OpenAI's chunk shape."""
    out = []
    for d in deltas:
        if d.id is not None:
            function = p.DeltaFunctionCall(name=d.name, arguments=d.arguments)
            out.append(p.DeltaToolCall(index=d.index, id=d.id, type="function", function=function))
        else:
            out.append(p.DeltaToolCall(index=d.index, function=p.DeltaFunctionCall(arguments=d.arguments)))
    return out


class ForcedCallStream:
    """Streaming a grammar-made tool call as ``delta.tool_calls``.

    named: id, type and name first, then each text delta as an ``arguments`` fragment (they concatenate to the
    final arguments). required: the array is known to be whole only at the end, so its calls are sent then, each
    as a header delta (id, name) and one arguments delta.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text: list[str] = []
        self.started = False

    def feed(self, text: str) -> list[p.DeltaToolCall]:
        self.text.append(text)
        if self.plan.mode != "named" or not text or (not self.started and not text.strip()):
            return []
        out = []
        if not self.started:
            self.started = True
            assert self.plan.named is not None
            function = p.DeltaFunctionCall(name=self.plan.named, arguments="")
            out.append(p.DeltaToolCall(index=0, id=new_tool_call_id(), type="function", function=function))
            text = "".join(self.text).lstrip()  # the arguments as forced_calls returns them: stripped
        out.append(p.DeltaToolCall(index=0, function=p.DeltaFunctionCall(arguments=text)))
        return out

    def finish(self) -> tuple[list[p.DeltaToolCall], bool]:
        """(deltas still to send, whether the output was whole calls)."""
        calls = forced_calls(self.plan, "".join(self.text))
        if not calls or self.plan.mode == "named":
            return [], bool(calls)
        out = []
        for index, call in enumerate(calls):
            header = p.DeltaFunctionCall(name=call.function.name, arguments="")
            out.append(p.DeltaToolCall(index=index, id=call.id, type="function", function=header))
            out.append(p.DeltaToolCall(index=index, function=p.DeltaFunctionCall(arguments=call.function.arguments)))
        return out, True
