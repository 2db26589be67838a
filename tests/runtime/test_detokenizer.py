"""Streaming detokenization with SmolLM2's byte-level BPE: partial UTF-8 characters are never emitted, stop
strings are held back, found across tokens and cut, and the deltas add up to ``decode``."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubellm.runtime.detokenizer import IncrementalDetokenizer
from kubellm.runtime.tokenizer import Tokenizer

SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], print_blob=True
)


def stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], chunks: Sequence[int] | None = None
) -> tuple[list[str], str | None]:
    """Feed ``ids`` (in chunks of the given sizes, default one by one); return the deltas (flush last) and the
    stop string."""
    deltas: list[str] = []
    sizes = list(chunks or [1] * len(ids))
    start = 0
    while start < len(ids):
        size = sizes.pop(0) if sizes else 1
        delta, stop = detok.step(ids[start : start + size])
        start += size
        deltas.append(delta)
        if stop is not None:
            return deltas, stop
    deltas.append(detok.flush())
    return deltas, None


def test_multibyte_characters_split_across_tokens(smollm2_tokenizer: Tokenizer) -> None:
    text = "Emoji 😀 then 世界, 🎉👩‍👩‍👧 and ñ."
    ids = smollm2_tokenizer.encode(text)
    # the premise: some single tokens are only part of a character
    partial = [i for i in ids if "\ufffd" in smollm2_tokenizer.decode([i])]
    assert len(partial) >= 4
    deltas, stop = stream(IncrementalDetokenizer(smollm2_tokenizer, []), ids)
    assert stop is None
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[:-1]  # a step that completed no character emitted nothing
    assert "".join(deltas) == text


def test_prompt_context_is_not_repeated(smollm2_tokenizer: Tokenizer) -> None:
    prompt = smollm2_tokenizer.encode("The capital of France is")
    generated = smollm2_tokenizer.encode(" Paris. 🗼 It has")
    deltas, _ = stream(IncrementalDetokenizer(smollm2_tokenizer, prompt), generated)
    assert "".join(deltas) == " Paris. 🗼 It has"


def test_stop_string_spanning_tokens(smollm2_tokenizer: Tokenizer) -> None:
    text = "The answer is forty-two. Then more text."
    ids = smollm2_tokenizer.encode(text)
    stop_ids = smollm2_tokenizer.encode(" forty-two")
    assert len(stop_ids) > 2  # the premise: the stop string spans several tokens
    detok = IncrementalDetokenizer(smollm2_tokenizer, [], stop=["forty-two"])
    deltas, stop = stream(detok, ids)
    assert stop == "forty-two"
    assert "".join(deltas) == "The answer is "
    assert detok.output_text == "The answer is "
    assert detok.step(smollm2_tokenizer.encode(" ignored")) == ("", "forty-two")  # finished: nothing more

    detok = IncrementalDetokenizer(smollm2_tokenizer, [], stop=["forty-two"], include_stop_str_in_output=True)
    deltas, stop = stream(detok, ids)
    assert (stop, "".join(deltas)) == ("forty-two", "The answer is forty-two")


def test_text_after_the_stop_string_is_cut(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("alpha STOP beta gamma")
    detok = IncrementalDetokenizer(smollm2_tokenizer, [], stop=["STOP"])
    assert detok.step(ids) == ("alpha ", "STOP")  # all tokens at once
    assert detok.flush() == ""


def test_possible_stop_prefix_is_held_back(smollm2_tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(smollm2_tokenizer, [], stop=["<END>", "###"])
    assert detok.step(smollm2_tokenizer.encode("value <")) == ("value ", None)  # "<" may start "<END>"
    assert detok.step(smollm2_tokenizer.encode("EN")) == ("", None)
    assert detok.step(smollm2_tokenizer.encode("D")) == ("", None)  # "<END" still may
    assert detok.step(smollm2_tokenizer.encode("!")) == ("<END!", None)  # "<END!" cannot
    assert detok.step(smollm2_tokenizer.encode(" ##")) == (" ", None)
    assert detok.flush() == "##"  # finishing for another reason releases what was held


def test_earliest_completed_stop_wins(smollm2_tokenizer: Tokenizer) -> None:
    detok = IncrementalDetokenizer(smollm2_tokenizer, [], stop=["c d e f", "d"])
    assert detok.step(smollm2_tokenizer.encode("a b c d e f")) == ("a b c ", "d")
    detok = IncrementalDetokenizer(smollm2_tokenizer, [], stop=["b", "a b"])
    assert detok.step(smollm2_tokenizer.encode("a b c")) == ("", "a b")  # same end: the longer one


def test_special_tokens(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode("Hi<|im_end|> there")
    assert 2 in ids
    assert "".join(stream(IncrementalDetokenizer(smollm2_tokenizer, []), ids)[0]) == "Hi there"
    kept = IncrementalDetokenizer(smollm2_tokenizer, [], skip_special_tokens=False)
    assert "".join(stream(kept, ids)[0]) == "Hi<|im_end|> there"


def test_bad_stop_strings(smollm2_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="stop strings"):
        IncrementalDetokenizer(smollm2_tokenizer, [], stop=[""])


def test_window_stays_small(smollm2_tokenizer: Tokenizer) -> None:
    """Each step decodes only a short window of ids, however long the output grows: O(new tokens)."""
    calls: list[int] = []

    class Counting:
        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            calls.append(len(ids))
            return smollm2_tokenizer.decode(ids, skip_special_tokens)

    ids = smollm2_tokenizer.encode("Streaming text, token by token, for a long time. 😀 " * 60)
    assert len(ids) > 600
    detok = IncrementalDetokenizer(Counting(), [], stop=["never appears"])
    deltas, _ = stream(detok, ids)
    assert "".join(deltas) == smollm2_tokenizer.decode(ids)
    assert max(calls) <= 8


# ----------------------------------------------------------------------------------------- properties


def _random_ids() -> st.SearchStrategy[list[int]]:
    # mostly single-byte tokens and multi-byte fragments (ids 17..272 hold the 256 byte tokens and their
    # neighbours), plus any token, plus special tokens
    any_token = st.integers(min_value=0, max_value=49151)
    byte_tokens = st.integers(min_value=17, max_value=300)
    return st.lists(st.one_of(any_token, byte_tokens, byte_tokens, st.integers(0, 16)), max_size=40)


@SETTINGS
@given(
    ids=_random_ids(),
    chunks=st.lists(st.integers(1, 4), max_size=40),
    skip=st.booleans(),
    prompt=st.sampled_from(["", "Hello world", "<|im_start|>assistant\n", "数字 42 😀"]),
)
def test_deltas_add_up_to_decode(
    smollm2_tokenizer: Tokenizer, ids: list[int], chunks: list[int], skip: bool, prompt: str
) -> None:
    prompt_ids = smollm2_tokenizer.encode(prompt)
    detok = IncrementalDetokenizer(smollm2_tokenizer, prompt_ids, skip_special_tokens=skip)
    deltas, stop = stream(detok, ids, chunks)
    assert stop is None
    # Emission is append-only, so this equality also says no delta held a partial character: a U+FFFD emitted
    # for bytes that a later token completed would not be in the full decode.
    assert "".join(deltas) == smollm2_tokenizer.decode(ids, skip_special_tokens=skip)


@SETTINGS
@given(
    words=st.lists(st.sampled_from(["ab", " cd", "e", "f ", "\n", "é", "世", "😀", "ab cd"]), max_size=25),
    stop=st.lists(st.sampled_from(["cd", "b c", "e\n", "😀f", "世世", "zz"]), min_size=1, max_size=3),
    chunks=st.lists(st.integers(1, 3), max_size=30),
    include=st.booleans(),
)
def test_stop_strings_match_a_reference(
    smollm2_tokenizer: Tokenizer, words: list[str], stop: list[str], chunks: list[int], include: bool
) -> None:
    text = "".join(words)
    ids = smollm2_tokenizer.encode(text)
    detok = IncrementalDetokenizer(smollm2_tokenizer, [], stop=stop, include_stop_str_in_output=include)
    deltas, found = stream(detok, ids, chunks)
    # reference: the stop string that completes first in the full text (ties: the one starting first)
    matches = [(text.find(s) + len(s), text.find(s), s) for s in stop if s in text]
    if not matches:
        assert found is None and "".join(deltas) == text
        return
    end, start, expected_stop = min(matches, key=lambda m: (m[0], m[1]))
    assert found == expected_stop
    assert "".join(deltas) == text[: end if include else start]


def test_sentencepiece_style_leading_space_survives() -> None:
    """Metaspace decoders (Llama 2, Mistral) drop the leading space of the first token decoded; the prompt's last
    tokens give the first generated token its context, so " world" keeps its space."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁and": 4, "▁more": 5}
    backend = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = Tokenizer(backend)
    assert tok.decode([2]) == "world"  # alone, the space is gone
    deltas, _ = stream(IncrementalDetokenizer(tok, [1]), [2, 3, 4, 5])
    assert deltas == [" world", "!", " and", " more", ""]
    assert "".join(deltas) == tok.decode([1, 2, 3, 4, 5])[len(tok.decode([1])) :]


def test_window_stays_small_through_invalid_bytes_and_skipped_tokens(smollm2_tokenizer: Tokenizer) -> None:
    """Junk a model may emit (stray UTF-8 continuation bytes, runs of special tokens) must not make the decode
    window, and so each step's cost, grow with the output."""
    calls: list[int] = []

    class Counting:
        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            calls.append(len(ids))
            return smollm2_tokenizer.decode(ids, skip_special_tokens)

    continuation = smollm2_tokenizer.token_to_id("Ģ")  # GPT-2's byte-level symbol for the byte 0x80
    assert continuation is not None and smollm2_tokenizer.decode([continuation]) == "\ufffd"
    hello = smollm2_tokenizer.encode("hello")
    ids = ([continuation] * 200 + hello + [0] * 200 + hello) * 2
    deltas, _ = stream(IncrementalDetokenizer(Counting(), []), ids)
    assert "".join(deltas) == smollm2_tokenizer.decode(ids)
    assert max(calls) <= 16


def test_stop_strings_count_only_from_min_tokens_on(smollm2_tokenizer: Tokenizer) -> None:
    ids = smollm2_tokenizer.encode(" cat dog cat dog cat", add_special_tokens=False)
    assert len(ids) == 5
    detok = IncrementalDetokenizer(smollm2_tokenizer, [], stop=[" dog"], min_tokens=3)
    deltas = [detok.step([t]) for t in ids]
    # tokens 1-2: " dog" is ignored and nothing is held back; token 4 completes the first match that counts
    assert [d for d, _ in deltas[:3]] == [" cat", " dog", " cat"]
    assert deltas[3] == ("", " dog") and detok.output_text == " cat dog cat"
