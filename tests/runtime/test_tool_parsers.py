"""Tool-call parsers on outputs in each model family's format (written as the models' chat templates and model
cards give them, malformed ones included), whole and streamed split at every character boundary; the forced-call
schema helpers; the prompt for templates without tool support."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from kubellm.runtime.tool_parsers import (
    ExtractedToolCalls,
    ToolParser,
    default_tool_prompt,
    forced_tool_calls_schema,
    get_tool_parser,
    messages_for_plain_template,
    parse_forced_tool_calls,
    pick_tool_parser_name,
    template_supports_tools,
)


@dataclass(frozen=True)
class Case:
    parser: str
    text: str
    calls: list[tuple[str, dict]]  # (name, arguments)
    content: str | None


WEATHER = '{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA", "unit": "celsius"}}'
CASES = {
    # hermes: Qwen2.5 / Qwen3 / Hermes 2 Pro
    "hermes_single": Case(
        "hermes",
        f"<tool_call>\n{WEATHER}\n</tool_call>",
        [("get_current_temperature", {"location": "San Francisco, CA, USA", "unit": "celsius"})],
        None,
    ),
    "hermes_content_and_parallel": Case(
        "hermes",
        'Let me check both cities.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>',
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Zürich"})],
        "Let me check both cities.",
    ),
    "hermes_no_end_tag_at_eos": Case("hermes", '<tool_call>\n{"name": "ping", "arguments": {}}', [("ping", {})], None),
    "hermes_arguments_as_string": Case(
        "hermes",
        '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": [2, 3]}"}</tool_call>',
        [("add", {"a": 1, "b": [2, 3]})],
        None,
    ),
    "hermes_malformed_json": Case(
        "hermes",
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
        [],
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
    ),
    "hermes_truncated": Case(
        "hermes",
        '<tool_call>\n{"name": "get_weather", "argu',
        [],
        '<tool_call>\n{"name": "get_weather", "argu',
    ),
    "hermes_no_name": Case(
        "hermes", '<tool_call>{"arguments": {}}</tool_call>', [], '<tool_call>{"arguments": {}}</tool_call>'
    ),
    "hermes_good_then_bad": Case(
        "hermes",
        '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": [1]}</tool_call>',
        [("a", {"x": 1})],
        '<tool_call>{"name": "b", "arguments": [1]}</tool_call>',
    ),
    "hermes_plain_text": Case(
        "hermes", "I use <tools> and a <tool_cal sign.\n", [], "I use <tools> and a <tool_cal sign.\n"
    ),
    # llama3_json: Llama 3.1 / 3.2
    "llama3_python_tag": Case(
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}',
        [("get_weather", {"city": "Paris", "days": 3})],
        None,
    ),
    "llama3_bare_semicolons": Case(
        "llama3_json",
        '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}',
        [("a", {"x": 1}), ("b", {})],
        None,
    ),
    "llama3_text": Case("llama3_json", "The answer is 4.", [], "The answer is 4."),
    "llama3_json_not_a_call": Case("llama3_json", '{"answer": 4}', [], '{"answer": 4}'),
    "llama3_truncated": Case(
        "llama3_json", '{"name": "a", "parameters": {"x": 1}', [], '{"name": "a", "parameters": {"x": 1}'
    ),
    # mistral
    "mistral_array": Case(
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"tz": "CET"}}]',
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})],
        None,
    ),
    "mistral_v11": Case(
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}',
        [("get_weather", {"city": "Paris"}), ("get_time", {})],
        None,
    ),
    "mistral_content_first": Case(
        "mistral",
        'Checking. [TOOL_CALLS][{"name": "f", "arguments": {"q": "a]b}"}}]',
        [("f", {"q": "a]b}"})],
        "Checking.",
    ),
    "mistral_truncated": Case(
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par',
        [],
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Par',
    ),
    "mistral_bad_name": Case("mistral", "[TOOL_CALLS]get weather[ARGS]{}", [], "[TOOL_CALLS]get weather[ARGS]{}"),
}


def check(result: ExtractedToolCalls, case: Case) -> None:
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == case.calls
    assert result.content == case.content
    assert all(c.id.startswith("call_") for c in result.tool_calls)
    assert len({c.id for c in result.tool_calls}) == len(result.tool_calls)


def stream(parser: ToolParser, chunks: list[str]) -> ExtractedToolCalls:
    """Feed the chunks, check the OpenAI delta order (id and name first, then arguments), reassemble."""
    content = ""
    calls: dict[int, dict[str, str]] = {}
    for message in [*(parser.feed(c) for c in chunks), parser.finish()]:
        content += message.content or ""
        for delta in message.tool_calls:
            if delta.index not in calls:
                assert delta.id and delta.name and delta.arguments == "", delta
                assert delta.index == len(calls)
                calls[delta.index] = {"id": delta.id, "name": delta.name, "arguments": ""}
            else:
                assert delta.id is None and delta.name is None
                calls[delta.index]["arguments"] += delta.arguments
    from kubellm.runtime.tool_parsers import ToolCall

    tool_calls = [ToolCall(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    return ExtractedToolCalls(content if content and (content.strip() or not tool_calls) else None, tool_calls)


@pytest.mark.parametrize("name", sorted(CASES))
def test_extract(name: str) -> None:
    case = CASES[name]
    check(get_tool_parser(case.parser)().extract(case.text), case)


@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_split_at_every_boundary(name: str) -> None:
    case = CASES[name]
    cls = get_tool_parser(case.parser)
    expected = cls().extract(case.text)
    for cut in range(len(case.text) + 1):
        got = stream(cls(), [case.text[:cut], case.text[cut:]])
        check(got, case)
        assert [c.arguments for c in got.tool_calls] == [c.arguments for c in expected.tool_calls]
    check(stream(cls(), list(case.text)), case)  # one character at a time


def test_content_streams_before_the_call_ends() -> None:
    parser = get_tool_parser("hermes")()
    assert parser.feed("Let me look that up").content == "Let me look that up"
    assert parser.feed(" for you. <tool").content == " for you."  # "<tool" may begin a call: held
    message = parser.feed('_call>{"name": "f", "arguments": {"a": 1}}')
    assert message.is_empty  # inside a call nothing is sent until it has parsed
    message = parser.feed("</tool_call>")
    assert [(d.index, d.name, d.arguments) for d in message.tool_calls] == [(0, "f", ""), (0, None, '{"a": 1}')]
    assert parser.finish().is_empty


def test_registry_and_auto() -> None:
    assert get_tool_parser("hermes").name == "hermes"
    assert get_tool_parser("auto", "{% for m in messages %}[TOOL_CALLS]{% endfor %}").name == "mistral"
    assert get_tool_parser("auto", "<|python_tag|>{{ tools }}").name == "llama3_json"
    assert get_tool_parser("auto", "{{ tools }}<tool_call>").name == "hermes"
    assert pick_tool_parser_name(None) == "hermes"
    assert get_tool_parser("mistral").needs_special_tokens and not get_tool_parser("hermes").needs_special_tokens
    with pytest.raises(ValueError, match="unknown tool call parser 'nope'"):
        get_tool_parser("nope")


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def test_forced_schema_shapes() -> None:
    required = forced_tool_calls_schema(TOOLS, "required", parallel_tool_calls=False)
    assert required["minItems"] == 1 and required["maxItems"] == 1
    assert [item["properties"]["name"]["const"] for item in required["items"]["anyOf"]] == ["get_weather", "now"]
    named = forced_tool_calls_schema(TOOLS, {"type": "function", "function": {"name": "now"}}, True)
    assert "maxItems" not in named and named["items"]["properties"]["name"] == {"const": "now"}
    with pytest.raises(ValueError, match="tool_choice names the function 'nope'"):
        forced_tool_calls_schema(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="tool_choice"):
        forced_tool_calls_schema(TOOLS, "sometimes")
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        forced_tool_calls_schema([{"type": "function", "function": {"name": ""}}], "required")


def test_forced_schema_hoists_defs_and_rewrites_refs() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "route",
            "parameters": {
                "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}}}},
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/point"}, "b": {"$ref": "#/$defs/point/properties/x"}},
            },
        },
    }
    schema = forced_tool_calls_schema([tool], "required")
    assert schema["items"]["properties"]["arguments"] == {"$ref": "#/$defs/tool0"}
    assert schema["$defs"]["tool0"]["properties"] == {
        "a": {"$ref": "#/$defs/tool0__point"},
        "b": {"$ref": "#/$defs/tool0__point/properties/x"},
    }
    assert schema["$defs"]["tool0__point"] == {"type": "object", "properties": {"x": {"type": "number"}}}


def test_parse_forced_tool_calls() -> None:
    calls = parse_forced_tool_calls(
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]'
    )
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("now", {})]
    assert parse_forced_tool_calls('[{"name": "get_weather", "arguments": {"ci') == []  # cut off by max_tokens
    assert parse_forced_tool_calls('{"name": "x", "arguments": {}}') == []


def test_messages_for_a_template_without_tools() -> None:
    assert not template_supports_tools("{{ messages }}") and template_supports_tools("{% if tools %}{% endif %}")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    out = messages_for_plain_template(messages, TOOLS)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert out[3] == {"role": "user", "content": '<tool_response id="call_1">\n{"temp": 21}\n</tool_response>'}
    # what the default prompt asks for is what the hermes parser reads
    parsed = get_tool_parser("hermes")().extract(out[2]["content"])
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert all(json.dumps(tool, ensure_ascii=False) in default_tool_prompt(TOOLS) for tool in TOOLS)
