"""Structured outputs in the engine, on a tiny random Llama with SmolLM2's tokenizer (fast, no server): each choice
its own matcher, constrained and free rows in one batch, the grammar waiting for the reasoning to end, and no KV
block leaked. A random model follows a grammar only if the bitmask is applied: any other output fails the oracle."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.llm import merge_delta
from kubellm.runtime.models.loader import load_model
from kubellm.runtime.outputs import RequestOutput
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.structured_outputs import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
    "required": ["n", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[..., Path]) -> LLMEngine:
    loaded = load_model(str(tiny_model_dir("llama")))
    config = EngineConfig(model=loaded.name, dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20)
    return LLMEngine(config, loaded=loaded)


def run_all(engine: LLMEngine, requests: dict[str, tuple[SamplingParams, Callable | None]]) -> dict[str, RequestOutput]:
    results = {}
    for rid, (params, reasoning_end) in requests.items():
        req = engine.add_request(rid, "Say something:", params, reasoning_end=reasoning_end)
        results[rid] = RequestOutput(rid, req.prompt_token_ids, [], False, req.metrics)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            merge_delta(results[delta.request_id], delta)
    engine.block_manager.check_all_free()
    return results


def test_choices_and_free_rows_in_one_batch(engine: LLMEngine) -> None:
    json_params = SamplingParams(
        n=3, temperature=1.0, seed=11, max_tokens=60, structured_outputs=StructuredOutputsParams(json=SCHEMA)
    )
    regex_params = SamplingParams(
        temperature=1.0, seed=12, max_tokens=20, structured_outputs=StructuredOutputsParams(regex=r"[a-c]{3}-[0-9]")
    )
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = run_all(engine, {"free": (free, None)})["free"].outputs[0].token_ids
    out = run_all(engine, {"json": (json_params, None), "regex": (regex_params, None), "free": (free, None)})
    assert len(out["json"].outputs) == 3
    for c in out["json"].outputs:
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert c.finish_reason is not None and c.finish_reason.value == "stop"
    assert re.fullmatch(r"[a-c]{3}-[0-9]", out["regex"].outputs[0].text)
    assert out["free"].outputs[0].token_ids == alone  # the grammars of the other rows did not touch this one


def test_grammar_applies_after_the_reasoning(engine: LLMEngine) -> None:
    free_tokens = 5  # a stand-in reasoning parser: the reasoning ends after 5 output tokens

    def reasoning_end(prompt: list[int], output: list[int]) -> bool:
        return len(output) >= free_tokens

    params = SamplingParams(
        temperature=1.0, seed=5, max_tokens=40, structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"])
    )
    out = run_all(engine, {"r": (params, reasoning_end)})["r"].outputs[0]
    tokenizer = engine.tokenizer
    assert tokenizer is not None
    answer = tokenizer.decode(out.token_ids[free_tokens:])
    assert answer in ("alpha", "beta"), (out.text, answer)
