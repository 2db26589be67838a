"""Reasoning parsers on outputs in the Qwen3 and DeepSeek-R1 formats, whole and streamed split at every boundary;
the token-space end of reasoning on the real tokenizer's ids."""

from __future__ import annotations

import pytest

from kubellm.runtime.reasoning import get_reasoning_parser

QWEN3 = {
    "think_then_answer": (
        "<think>\nThe user wants 2+2. That is 4.\n</think>\n\nThe answer is 4.",
        ("\nThe user wants 2+2. That is 4.\n", "The answer is 4."),
    ),
    "thinking_disabled": ("The answer is 4.", (None, "The answer is 4.")),
    "empty_think": ('<think>\n\n</think>\n\n{"a": 1}', ("\n\n", '{"a": 1}')),
    "cut_off_while_thinking": ("<think>\nLet me count: 1, 2, 3", ("\nLet me count: 1, 2, 3", None)),
    "a_lone_angle_bracket": ("<thi is not a tag", (None, "<thi is not a tag")),
    "tags_in_the_answer": ("<think>a</think>b </think> c", ("a", "b </think> c")),
    "leading_space": ("  <think>x</think>y", ("x", "y")),
}
DEEPSEEK_R1 = {
    "opened_by_the_template": ("Okay, 2+2 is 4.\n</think>\n\n**4**", ("Okay, 2+2 is 4.\n", "**4**")),
    "with_the_tag_too": ("<think>Okay.</think>Done", ("Okay.", "Done")),
    "never_closed": ("Still thinking about", ("Still thinking about", None)),
    "closed_at_once": ("</think>Answer", (None, "Answer")),
}
CASES = [("qwen3", k, *v) for k, v in QWEN3.items()] + [("deepseek_r1", k, *v) for k, v in DEEPSEEK_R1.items()]


@pytest.mark.parametrize(("name", "case", "text", "expected"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_extract_and_stream_at_every_boundary(name: str, case: str, text: str, expected: tuple) -> None:
    cls = get_reasoning_parser(name)
    assert cls().extract(text) == expected
    splits = [[text[:cut], text[cut:]] for cut in range(len(text) + 1)] + [list(text)]
    for chunks in splits:
        parser = cls()
        reasoning = content = ""
        for delta in [*(parser.feed(c) for c in chunks), parser.finish()]:
            reasoning += delta.reasoning
            content += delta.content
        assert (reasoning or None, content or None) == expected, chunks


def test_reasoning_streams_as_it_comes() -> None:
    parser = get_reasoning_parser("qwen3")()
    assert parser.feed("<thi") == ("", "")  # may become the tag
    assert parser.feed("nk>Hmm, le") == ("Hmm, le", "")
    assert parser.feed("t me see</thi") == ("t me see", "")  # "</thi" held back
    assert parser.feed("nk>\n\nIt is") == ("", "It is")
    assert parser.feed(" 4.") == ("", " 4.")
    assert parser.finish() == ("", "")


class _Vocab:
    def __init__(self, ids: dict[str, int]) -> None:
        self.ids = ids

    def token_to_id(self, token: str) -> int | None:
        return self.ids.get(token)


def test_is_reasoning_end_in_token_space() -> None:
    vocab = _Vocab({"<think>": 100, "</think>": 101})
    qwen3 = get_reasoning_parser("qwen3")(vocab)
    assert not qwen3.is_reasoning_end([1, 2], [100, 5, 6])
    assert qwen3.is_reasoning_end([1, 2], [100, 5, 101])
    assert qwen3.is_reasoning_end([1, 100, 101, 2], [])  # thinking disabled: the template closed the block
    assert qwen3.is_reasoning_end([1, 2], [])  # no block: the answer starts now
    deepseek = get_reasoning_parser("deepseek_r1")(vocab)
    assert not deepseek.is_reasoning_end([1, 100], [5])
    assert not deepseek.is_reasoning_end([1, 2], [5])
    assert deepseek.is_reasoning_end([1, 100], [5, 101, 7])
    # a tokenizer without single-token tags (SmolLM2) has no reasoning in token space
    assert get_reasoning_parser("qwen3")(_Vocab({})).is_reasoning_end([1], [])


def test_is_reasoning_end_with_the_bundled_tokenizer(smollm2_tokenizer) -> None:
    assert get_reasoning_parser("deepseek_r1")(smollm2_tokenizer).is_reasoning_end([1], [2])


def test_unknown_parser() -> None:
    with pytest.raises(ValueError, match="unknown reasoning parser 'o1'"):
        get_reasoning_parser("o1")
