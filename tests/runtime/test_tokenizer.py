"""The tokenizer built from SmolLM2's GGUF vocabulary, checked against transformers' own GGUF tokenizer
conversion and its ``apply_chat_template``; tokenizer directories; chat template helpers and sandbox."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.runtime.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "def f(x):\n\treturn x ** 2  # square\n",
    "Emoji 😀🎉👩‍👩‍👧 and CJK 世界你好, café naïve",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "don't won't it's they're I'll we've",
    "\n\n\nmultiple\n\nnewlines\r\n",
    "",
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Japan?"},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 🐍 and 世界."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_gguf_path: Path) -> Any:
    """transformers' tokenizer converted from the same GGUF by transformers itself: the oracle."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name)


def test_special_tokens(smollm2_tokenizer: Tokenizer) -> None:
    tok = smollm2_tokenizer
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.eos_token_ids == {2} and tok.pad_token_id == 2
    assert tok.special_tokens == {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    }
    assert tok.all_special_ids == set(range(17))
    assert tok.convert_ids_to_tokens([1, 2, 19556]) == ["<|im_start|>", "<|im_end|>", "Hello"]
    assert tok.encode("<|im_start|>user") == [1, 4093]  # a special token in text is one token
    with pytest.raises(ValueError, match="out of range"):
        tok.convert_ids_to_tokens([10**6])
    with pytest.raises(TypeError, match="str"):
        not_text: Any = ["not", "text"]
        tok.encode(not_text)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(smollm2_tokenizer: Tokenizer, hf_tokenizer: Any, text: str) -> None:
    for add_special_tokens in (True, False):
        ids = smollm2_tokenizer.encode(text, add_special_tokens=add_special_tokens)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=add_special_tokens)
    for skip in (True, False):
        assert smollm2_tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(
            ids, skip_special_tokens=skip
        )
    assert smollm2_tokenizer.convert_ids_to_tokens(ids) == hf_tokenizer.convert_ids_to_tokens(ids)
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["user", "system", "multi-turn", "ends-assistant"])
def test_chat_template_matches_transformers(
    smollm2_tokenizer: Tokenizer, hf_tokenizer: Any, conversation: list[dict[str, Any]]
) -> None:
    for add_generation_prompt in (True, False):
        ours = smollm2_tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        theirs = hf_tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours == theirs
    assert ours.count("<|im_start|>") == len(conversation) + (conversation[0]["role"] != "system")


def test_chat_template_default_system_prompt(smollm2_tokenizer: Tokenizer) -> None:
    text = smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_continue_final_message(smollm2_tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]
    text = smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\n1, 2,")
    with pytest.raises(ValueError, match="cannot both be set"):
        smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, continue_final_message=True)


def test_chat_template_bad_messages(smollm2_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty list"):
        smollm2_tokenizer.apply_chat_template([])
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        smollm2_tokenizer.apply_chat_template([{"role": "user", "content": "a"}, {"content": "b"}])


def _tokenizer_with_template(base: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(base.backend, special_tokens=base.special_tokens, chat_template=template)


def test_template_helpers_and_variables(smollm2_tokenizer: Tokenizer) -> None:
    template = (
        "{% if messages[0]['role'] == 'tool' %}{{ raise_exception('tools are not allowed: ' + messages[0]['role']) }}"
        "{% endif %}{{ bos_token }}[{{ strftime_now('%Y') }}]{{ messages | tojson }}"
        "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
    )
    tok = _tokenizer_with_template(smollm2_tokenizer, template)
    text = tok.apply_chat_template([{"role": "user", "content": "<b>&"}, {"role": "user", "content": "x"}])
    assert text.startswith("<|im_start|>[20")
    assert '[{"role": "user", "content": "<b>&"}' in text  # tojson does not HTML-escape
    assert text.endswith("<b>&")  # the loop stopped at the first message (loopcontrols)
    assert "/no_think" in tok.apply_chat_template([{"role": "user", "content": "q"}], enable_thinking=False)
    with pytest.raises(jinja2.TemplateError, match="tools are not allowed: tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_template_sandbox(smollm2_tokenizer: Tokenizer) -> None:
    tok = _tokenizer_with_template(smollm2_tokenizer, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    # immutable sandbox: a template cannot modify the caller's messages
    tok = _tokenizer_with_template(smollm2_tokenizer, "{{ messages.append(1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_errors(smollm2_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        _tokenizer_with_template(smollm2_tokenizer, None).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="not valid jinja2"):
        _tokenizer_with_template(smollm2_tokenizer, "{% for %}").apply_chat_template([{"role": "user"}])


# ------------------------------------------------------------------------------------------ directories


def test_save_and_load_directory(tmp_path: Path, smollm2_tokenizer: Tokenizer) -> None:
    smollm2_tokenizer.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path, extra_eos_token_ids=[0])
    for text in TEXTS:
        assert again.encode(text) == smollm2_tokenizer.encode(text)
    assert again.chat_template == smollm2_tokenizer.chat_template
    assert again.special_tokens == smollm2_tokenizer.special_tokens
    assert again.eos_token_ids == {0, 2}


def test_directory_chat_template_sources(tmp_path: Path, smollm2_tokenizer: Tokenizer) -> None:
    smollm2_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # AddedToken dicts and the list form of chat_template
    config["eos_token"] = {"content": "<|endoftext|>", "special": True}
    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert tok.eos_token_ids == {0}
    assert tok.chat_template == "D"
    # transformers >= 4.43 writes the template to its own file, which wins
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['content'] }}")
    assert Tokenizer.from_pretrained(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "Jx"


def test_directory_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="cannot be read as a tokenizer"):
        Tokenizer.from_pretrained(tmp_path)


def test_tiny_model_dirs_carry_the_tokenizer(tiny_model_dir, smollm2_tokenizer: Tokenizer) -> None:
    tok = Tokenizer.from_pretrained(tiny_model_dir("qwen3"))
    assert tok.encode("Hello world") == smollm2_tokenizer.encode("Hello world")
    assert tok.chat_template == smollm2_tokenizer.chat_template


# SmolLM2's vocabulary has no token for a few bytes (control characters 0x04 0x06 0x13 0x14 0x16 0x1d, and the
# UTF-8 lead bytes of planes 4-11): such characters cannot be encoded and are dropped, as by transformers.
ENCODABLE = st.characters(
    max_codepoint=0x3FFFF, exclude_categories=["Cs"], exclude_characters="\x04\x06\x13\x14\x16\x1d"
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], print_blob=True)
@given(text=st.text(alphabet=ENCODABLE, max_size=60))
def test_round_trip_any_text(smollm2_tokenizer: Tokenizer, text: str) -> None:
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.decode(ids, skip_special_tokens=False) == text
