"""Prompt logprobs (``SamplingParams.prompt_logprobs``, ``max_tokens=0``): the log-probability of every prompt token
under the model, as lm-evaluation-harness' loglikelihood requests need. transformers is the oracle; chunked
prefill, the prefix cache, preemption and a batch shared with plain requests must not change a value."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.llm import merge_delta
from kubellm.runtime.models.loader import load_model
from kubellm.runtime.outputs import FinishReason, RequestOutput, TokenLogprob
from kubellm.runtime.sampling_params import SamplingParams

TOP = 3
TOL = 1e-4


def engine_for(directory: Path, **overrides: object) -> LLMEngine:
    fields: dict[str, object] = {"dtype": "float32", "device": "cpu", "kv_cache_memory_bytes": 16 << 20}
    fields.update(overrides)
    return LLMEngine(EngineConfig(model=str(directory), **fields), loaded=load_model(str(directory)))


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
    """Every request to the end; asserts prompt logprobs come exactly once, and that no KV block leaks."""
    results: dict[str, RequestOutput] = {}
    seen: dict[str, int] = {}
    for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
        request = engine.add_request(str(i), prompt, sp)
        results[str(i)] = RequestOutput(str(i), request.prompt_token_ids, [], False, request.metrics)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if delta.prompt_logprobs is not None:
                seen[delta.request_id] = seen.get(delta.request_id, 0) + 1
            merge_delta(results[delta.request_id], delta)
    engine.block_manager.check_all_free()
    for i, sp in enumerate(params):
        assert seen.get(str(i), 0) == (sp.prompt_logprobs is not None), f"request {i}: prompt logprobs {seen}"
    return [results[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(seed := random.randrange(2**31))
    print(f"seed={seed}")
    shared = [rng.randrange(3, 49152) for _ in range(40)]  # longer than two 16-token blocks: a cacheable prefix
    return [shared + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 30))] for _ in range(4)] + [[7, 8]]


def reference(directory: Path, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each position, [len(prompt) - 1, vocab]: row j scores prompt token j + 1."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def check_against(ref: torch.Tensor, prompt: list[int], scored: list[TokenLogprob | None] | None) -> None:
    """Each token's logprob, rank and top alternatives as transformers has them, up to float noise: a rank or a
    top-k order may differ only among tokens whose logprobs are within TOL of each other."""
    assert scored is not None and len(scored) == len(prompt)
    assert scored[0] is None
    for j, lp in enumerate(scored[1:]):
        assert lp is not None and lp.token_id == prompt[j + 1]
        row, target = ref[j], ref[j, prompt[j + 1]].item()
        assert lp.logprob == pytest.approx(target, abs=TOL)
        assert lp.rank is not None and int((row > target + TOL).sum()) < lp.rank <= int((row > target - TOL).sum()) + 1
        assert [v for _, v in lp.top] == pytest.approx(row.topk(TOP).values.tolist(), abs=TOL)
        assert [v for _, v in lp.top] == pytest.approx([row[t].item() for t, _ in lp.top], abs=TOL)


def test_prompt_logprobs_match_transformers_in_one_batch_with_plain_requests(
    tiny_llama: Path, prompts: list[list[int]]
) -> None:
    engine = engine_for(tiny_llama)
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=TOP)
    plain = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    alone = run(engine, [prompts[1]], [plain])[0].outputs[0].token_ids
    engine = engine_for(tiny_llama, enable_prefix_caching=False)
    outs = run(engine, prompts[:3], [scoring, plain, SamplingParams(temperature=0.0, max_tokens=5, prompt_logprobs=0)])
    # scored only: nothing generated, finished for length
    assert outs[0].outputs[0].token_ids == [] and outs[0].outputs[0].finish_reason is FinishReason.LENGTH
    check_against(reference(tiny_llama, prompts[0]), prompts[0], outs[0].prompt_logprobs)
    # the plain request beside them is the same as alone, and has no prompt logprobs
    assert outs[1].outputs[0].token_ids == alone and outs[1].prompt_logprobs is None
    # scored and generated: the prompt's own logprob per token (no alternatives), then 5 tokens
    scored = outs[2].prompt_logprobs
    assert scored is not None and all(lp is None or lp.top == [] for lp in scored)
    assert len(outs[2].outputs[0].token_ids) == 5


def test_chunked_prefill_prefix_cache_and_preemption_leave_prompt_logprobs_unchanged(
    tiny_llama: Path, prompts: list[list[int]]
) -> None:
    scoring = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, prompt_logprobs=TOP)
    whole = run(engine_for(tiny_llama, enable_prefix_caching=False), prompts, [scoring] * len(prompts))

    # chunks of 8 tokens, and the shared prefix already in the cache: a scored prompt is still computed in full
    chunked = engine_for(tiny_llama, max_num_batched_tokens=8)
    run(chunked, [prompts[0]], [SamplingParams(max_tokens=1)])
    outs = run(chunked, prompts, [scoring] * len(prompts))
    assert all(o.metrics.num_cached_tokens == 0 for o in outs)
    # a cache 4 sequences cannot share: preempted, recomputed, and the prompt scored once
    longest = max(len(p) for p in prompts) + scoring.max_tokens
    tiny = engine_for(tiny_llama, num_gpu_blocks=2 * -(-longest // 16), enable_prefix_caching=False)
    preempted = run(tiny, prompts, [scoring] * len(prompts))
    assert tiny.stats().num_preemptions > 0
    for variant in (outs, preempted):
        for a, b in zip(whole, variant, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
    for prompt, out in zip(prompts, preempted, strict=True):
        check_against(reference(tiny_llama, prompt), prompt, out.prompt_logprobs)
    for prompt, out in zip(prompts[:2], outs, strict=False):
        check_against(reference(tiny_llama, prompt), prompt, out.prompt_logprobs)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(max_tokens=0), "max_tokens 0 scores the prompt only"),
        (dict(max_tokens=0, prompt_logprobs=1, n=2), "n must be 1 when max_tokens is 0"),
        (dict(prompt_logprobs=21), "prompt_logprobs must be in [0, 20]"),
        (dict(max_tokens=-1), "max_tokens must be non-negative"),
    ],
)
def test_bad_values_name_the_field(fields: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**fields)
