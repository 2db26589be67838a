"""The chat choice machine (reasoning, then tool calls, then content) without a server: a stream split anywhere
gives exactly the non-streamed message. Seeds of the random splits are printed."""

from __future__ import annotations

import json
import random

import pytest

from kubellm.runtime.reasoning import get_reasoning_parser
from kubellm.runtime.server import protocol as p
from kubellm.runtime.server.chat_output import ChoiceOutput, merge
from kubellm.runtime.server.tools import ToolPlan
from kubellm.runtime.tool_parsers import get_tool_parser

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def _machine(mode: str, reasoning: bool) -> ChoiceOutput:
    plan = ToolPlan(mode, TOOLS, named="get_weather" if mode == "named" else None)  # type: ignore[arg-type]
    parser = get_tool_parser("hermes")(TOOLS) if mode == "auto" else None
    return ChoiceOutput(plan, parser, get_reasoning_parser("qwen3")() if reasoning else None)


def _run(machine: ChoiceOutput, pieces: list[str]) -> tuple[p.ChatResponseMessage, str | None]:
    deltas = [d for d in (machine.feed(x) for x in pieces) if d is not None]
    last, reason = machine.finish("stop")
    message = merge([*deltas, *([last] if last else [])])
    assert isinstance(message, p.ChatResponseMessage)
    for d in deltas:  # every streamed call fragment: id and name on the first one of its index only
        for c in d.tool_calls or []:
            assert (c.id is None) == (c.function is None or c.function.name is None)
    return message, reason


CASES = [
    ("auto", False, 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("auto", True, '<think>\nThe user wants weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
     '"arguments": {"city": "Oslo"}}\n</tool_call>'),
    ("auto", False, "<tool_call>\n{not json}\n</tool_call>"),  # malformed: comes back as content
    ("none", True, "<think>hmm</think>\n\nThe answer is 4."),
    ("named", False, '{"city": "Rome", "days": 3}'),
    ("required", False, '[{"name": "get_weather", "arguments": {"city": "Lima"}}]'),
]  # fmt: skip


@pytest.mark.parametrize(("mode", "reasoning", "text"), CASES)
def test_stream_split_anywhere_equals_whole(mode: str, reasoning: bool, text: str) -> None:
    whole, whole_reason = _run(_machine(mode, reasoning), [text])
    seed = random.randrange(2**32)
    print(f"seed={seed}")
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(1, 12))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        streamed, reason = _run(_machine(mode, reasoning), pieces)
        assert reason == whole_reason
        assert streamed.content == whole.content
        assert streamed.reasoning_content == whole.reasoning_content
        assert [(c.function.name, c.function.arguments) for c in streamed.tool_calls] == [
            (c.function.name, c.function.arguments) for c in whole.tool_calls
        ]


def test_what_each_case_means() -> None:
    m, reason = _run(_machine("auto", False), [CASES[0][2]])
    assert reason == "tool_calls" and m.content == "Sure."
    assert json.loads(m.tool_calls[0].function.arguments) == {"city": "Paris"}
    m, reason = _run(_machine("auto", True), [CASES[1][2]])
    assert (m.reasoning_content or "").strip() == "The user wants weather." and m.tool_calls[
        0
    ].function.name == "get_weather"
    m, reason = _run(_machine("auto", False), [CASES[2][2]])
    assert reason == "stop" and not m.tool_calls and "{not json}" in (m.content or "")
    m, reason = _run(_machine("none", True), [CASES[3][2]])
    assert (m.reasoning_content, m.content, reason) == ("hmm", "The answer is 4.", "stop")
    m, reason = _run(_machine("named", False), [CASES[4][2]])
    assert reason == "tool_calls" and m.content is None and m.tool_calls[0].function.arguments == CASES[4][2]
    m, reason = _run(_machine("required", False), [CASES[5][2]])
    assert reason == "tool_calls" and json.loads(m.tool_calls[0].function.arguments) == {"city": "Lima"}


def test_a_required_call_cut_by_max_tokens_comes_back_as_content() -> None:
    machine = _machine("required", False)
    text = '[{"name": "get_weather", "arguments": {"ci'
    assert machine.feed(text) is None
    last, reason = machine.finish("length")
    assert reason == "length" and last is not None and last.content == text and not last.tool_calls
