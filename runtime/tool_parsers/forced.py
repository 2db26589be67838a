"""``tool_choice: "required"`` or a named function, enforced with structured outputs.

    schema = forced_tool_calls_schema(tools, tool_choice, parallel_tool_calls)   # a JSON schema (dict)
    # ... generate with StructuredOutputsParams(json=schema) ...
    calls = parse_forced_tool_calls(text)                                        # list[ToolCall]; [] if malformed

The schema is an array of ``{"name": <const>, "arguments": <that function's parameters>}`` (``anyOf`` over the
tools for "required"), ``minItems`` 1, ``maxItems`` 1 unless ``parallel_tool_calls``. Each tool's parameters schema
is hoisted into the root ``$defs`` (its own ``$defs`` renamed, its ``$ref``s rewritten), so that references inside
one tool's parameters still resolve once nested. ``ValueError`` names ``tools`` or ``tool_choice``.
"""

from __future__ import annotations

import copy
from typing import Any

from .base import ToolCall, call_from_object, loads_or_none


def tool_functions(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``function`` objects of OpenAI ``tools`` (``{"type": "function", "function": {...}}``), checked."""
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list")
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        functions.append({**function, "parameters": parameters})
    return functions


def forced_function_name(tool_choice: Any) -> str | None:
    """The name in ``{"type": "function", "function": {"name": ...}}``; None for "required"."""
    if tool_choice == "required":
        return None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}")
    return str(function["name"])


def forced_tool_calls_schema(
    tools: list[dict[str, Any]], tool_choice: Any, parallel_tool_calls: bool = True
) -> dict[str, Any]:
    functions = tool_functions(tools)
    name = forced_function_name(tool_choice)
    if name is not None:
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
    defs: dict[str, Any] = {}
    items = []
    for i, function in enumerate(functions):
        prefix = f"tool{i}"
        defs.update(_hoist(function["parameters"], prefix))
        items.append(
            {
                "type": "object",
                "properties": {"name": {"const": function["name"]}, "arguments": {"$ref": f"#/$defs/{prefix}"}},
                "required": ["name", "arguments"],
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "items": items[0] if len(items) == 1 else {"anyOf": items},
        "minItems": 1,
        "$defs": defs,
    }
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def parse_forced_tool_calls(text: str) -> list[ToolCall]:
    """The calls in an output generated under :func:`forced_tool_calls_schema`; [] when it does not parse (e.g.
    cut off by max_tokens): the caller returns the text as content then."""
    value = loads_or_none(text)
    if not isinstance(value, list):
        return []
    calls = [call_from_object(obj, ("arguments",)) for obj in value]
    return [c for c in calls if c is not None] if all(c is not None for c in calls) else []


def _hoist(parameters: dict[str, Any], prefix: str) -> dict[str, Any]:
    """{prefix: parameters, prefix__X: each of its $defs/definitions X}, with the $refs rewritten to match."""
    schema = copy.deepcopy(parameters)
    own: dict[str, Any] = {}
    for keyword in ("$defs", "definitions"):
        for def_name, sub in (schema.pop(keyword, None) or {}).items():
            own[f"#/{keyword}/{def_name}"] = (f"{prefix}__{def_name}", sub)

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items()}
            ref = node.get("$ref")
            if isinstance(ref, str):
                if ref == "#":
                    out["$ref"] = f"#/$defs/{prefix}"
                else:
                    base, rest = _split_ref(ref, own)
                    if base is not None:
                        out["$ref"] = f"#/$defs/{own[base][0]}{rest}"
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    hoisted = {prefix: rewrite(schema)}
    for new_name, sub in own.values():
        hoisted[new_name] = rewrite(sub)
    return hoisted


def _split_ref(ref: str, own: dict[str, Any]) -> tuple[str | None, str]:
    """("#/$defs/X", "/properties/y") for a ref into one of this tool's definitions; (None, "") otherwise."""
    for base in own:
        if ref == base or ref.startswith(base + "/"):
            return base, ref[len(base) :]
    return None, ""
