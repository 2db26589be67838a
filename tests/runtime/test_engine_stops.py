"""Issue 18 part 5, on a tiny random Llama with SmolLM2's tokenizer: stop strings wait for min_tokens without losing
text, a non-special stop token's text is dropped unless include_stop_str_in_output, forked n > 1 choices respect
max_num_seqs, and an abort flushes the text the detokenizer held back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.llm import merge_delta
from kubellm.runtime.models.loader import load_model
from kubellm.runtime.outputs import FinishReason, RequestOutput
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.tokenizer import Tokenizer

PROMPT = "The quick brown fox jumps over the lazy dog and then"


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[..., Path]) -> LLMEngine:
    loaded = load_model(str(tiny_model_dir("llama")))
    config = EngineConfig(model=loaded.name, dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20)
    return LLMEngine(config, loaded=loaded)


def run(engine: LLMEngine, params: SamplingParams, request_id: str = "r") -> RequestOutput:
    request = engine.add_request(request_id, PROMPT, params)
    result = RequestOutput(request_id, request.prompt_token_ids, [], False, request.metrics)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            merge_delta(result, delta)
    engine.block_manager.check_all_free()
    return result


def clean_tokens(tokenizer: Tokenizer, token_ids: list[int]) -> list[int]:
    """Indices of tokens whose text is plain (no partial characters, no special tokens, not blank)."""
    out = []
    for i, t in enumerate(token_ids):
        text = tokenizer.decode([t])
        if text.strip() and "\ufffd" not in text and t not in tokenizer.all_special_ids:
            out.append(i)
    return out


@pytest.fixture(scope="module")
def reference(engine: LLMEngine) -> list[int]:
    out = run(engine, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)).outputs[0]
    assert len(out.token_ids) == 16
    return out.token_ids


def test_a_stop_string_before_min_tokens_loses_no_text(engine: LLMEngine, reference: list[int]) -> None:
    tokenizer = engine.tokenizer
    assert tokenizer is not None
    early = next(i for i in clean_tokens(tokenizer, reference) if i < 4)
    stop = tokenizer.decode([reference[early]]).strip()
    out = run(engine, SamplingParams(temperature=0, max_tokens=16, min_tokens=10, ignore_eos=True, stop=[stop]))
    choice = out.outputs[0]
    full = tokenizer.decode(choice.token_ids)
    assert len(choice.token_ids) >= 10  # the early match did not stop it
    assert full.startswith(choice.text)
    # everything before min_tokens was emitted; a match counts only from the min_tokens-th token on
    assert len(choice.text) >= len(tokenizer.decode(choice.token_ids[:9]))
    if choice.finish_reason is FinishReason.STOP:
        assert choice.stop_reason == stop and choice.text == full[: len(choice.text)]
        assert full[len(choice.text) :].startswith(stop)  # it stopped where the stop string begins
    else:
        assert choice.finish_reason is FinishReason.LENGTH and choice.text == full


@pytest.mark.parametrize("include", [False, True])
def test_the_text_of_a_non_special_stop_token(engine: LLMEngine, reference: list[int], include: bool) -> None:
    tokenizer = engine.tokenizer
    assert tokenizer is not None
    index = next(i for i in clean_tokens(tokenizer, reference) if i >= 2)
    stop_id = reference[index]
    params = SamplingParams(
        temperature=0, max_tokens=16, ignore_eos=True, stop_token_ids=[stop_id], include_stop_str_in_output=include
    )
    choice = run(engine, params).outputs[0]
    assert choice.finish_reason is FinishReason.STOP and choice.stop_reason == stop_id
    assert choice.token_ids[-1] == stop_id  # the token is reported, its text only when asked for
    expected = choice.token_ids if include else choice.token_ids[:-1]
    assert choice.text == tokenizer.decode(expected)


def test_forked_choices_respect_max_num_seqs(tiny_model_dir: Callable[..., Path]) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    config = EngineConfig(
        model=loaded.name, dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20, max_num_seqs=2
    )
    engine = LLMEngine(config, loaded=loaded)
    request = engine.add_request(
        "n", PROMPT, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True)
    )
    result = RequestOutput("n", request.prompt_token_ids, [], False, request.metrics)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            merge_delta(result, delta)
        assert engine.scheduler.num_running <= 2
    engine.block_manager.check_all_free()
    assert [c.index for c in result.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 5 and c.finish_reason is FinishReason.LENGTH for c in result.outputs)


def test_abort_flushes_the_held_back_text(engine: LLMEngine, reference: list[int]) -> None:
    tokenizer = engine.tokenizer
    assert tokenizer is not None
    first = tokenizer.decode(reference[:1])
    # the first token's text is a prefix of the stop string, so the detokenizer holds it back
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=[first + "\u2603never"])
    request = engine.add_request("a", PROMPT, params)
    result = RequestOutput("a", request.prompt_token_ids, [], False, request.metrics)
    while not result.outputs or not result.outputs[0].token_ids:
        for delta in engine.step():
            merge_delta(result, delta)
    assert result.outputs[0].text == ""  # held
    final = engine.abort_request("a")
    assert final is not None
    merge_delta(result, final)
    choice = result.outputs[0]
    assert choice.finish_reason is FinishReason.ABORT
    assert choice.text == tokenizer.decode(choice.token_ids)
    engine.block_manager.check_all_free()
