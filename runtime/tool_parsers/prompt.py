"""Tools for chat templates that know nothing of tools, and picking a parser from a template.

- ``template_supports_tools(chat_template)``: the template reads ``tools`` (Qwen2.5/3, Llama 3.1, Mistral, Hermes).
- ``default_tool_prompt(tools)``: the system text kubellm adds for a template without tool support: it lists the
  functions as JSON inside ``<tools></tools>`` and asks for ``<tool_call>{"name", "arguments"}</tool_call>``
  (the Hermes / Qwen format, read back by the ``hermes`` parser).
- ``messages_for_plain_template(messages, tools)``: the conversation rewritten for such a template: the default
  prompt joined to the system message (or added as one), assistant ``tool_calls`` written out as
  ``<tool_call>`` text, and ``role: "tool"`` results as user turns inside ``<tool_response>`` (with their
  ``tool_call_id``).
- ``pick_tool_parser_name(chat_template)``: ``auto``'s choice: the format the template itself writes.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_TOOL_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def template_supports_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in str(chat_template)


def pick_tool_parser_name(chat_template: str | None) -> str:
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"  # Qwen / Hermes templates, and the default tool prompt


def default_tool_prompt(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return DEFAULT_TOOL_PROMPT.format(tools=listed)


def messages_for_plain_template(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict]:
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = [_call_text(call) for call in message["tool_calls"]]
            text = "\n".join([*([message["content"]] if message.get("content") else []), *calls])
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            result = message.get("content")
            result = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
            call_id = message.get("tool_call_id")
            header = f'<tool_response id="{call_id}">' if call_id else "<tool_response>"
            response = f"{header}\n{result}\n</tool_response>"
            if out and out[-1].get("role") == "user" and out[-1].get("content", "").endswith("</tool_response>"):
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + response}  # parallel results: one turn
            else:
                out.append({"role": "user", "content": response})
        else:
            out.append(dict(message))
    if tools:
        prompt = default_tool_prompt(tools)
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _call_text(call: dict[str, Any]) -> str:
    function = call.get("function", {})
    arguments = function.get("arguments", "{}")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        parsed = arguments
    body = json.dumps({"name": function.get("name"), "arguments": parsed}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"
