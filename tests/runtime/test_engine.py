"""The whole engine on real weights: batch invariance (batching, prefix caching, chunked prefill, preemption),
a 200-request stress run on a small KV cache, n > 1, stops, aborts, prompt validation, and the LLM API."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.llm import LLM, merge_delta
from kubellm.runtime.models.loader import LoadedModel, load_model
from kubellm.runtime.outputs import FinishReason, RequestOutput
from kubellm.runtime.sampling_params import SamplingParams

SYSTEM = "You are a helpful assistant. Answer briefly and precisely, in plain English. "  # a shared prefix


def make_engine(loaded: LoadedModel, **overrides: object) -> LLMEngine:
    fields: dict[str, object] = {"dtype": "float32", "device": "cpu", "kv_cache_memory_bytes": 64 << 20}
    fields.update(overrides)
    return LLMEngine(EngineConfig(model=loaded.name, **fields), loaded=loaded)


def run_all(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
) -> list[RequestOutput]:
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    results = {}
    for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
        request = engine.add_request(str(i), prompt, p)
        results[str(i)] = RequestOutput(str(i), request.prompt_token_ids, [], False, request.metrics)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            merge_delta(results[delta.request_id], delta)
    engine.block_manager.check_all_free()
    return [results[str(i)] for i in range(len(prompts))]


@pytest.fixture
def mixed_prompts(smollm2: LoadedModel) -> list[list[int]]:
    tokenizer = smollm2.tokenizer
    assert tokenizer is not None
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    rng = random.Random(seed)
    words = [
        "river",
        "mountain",
        "quantum",
        "bread",
        "violin",
        "desert",
        "orbit",
        "lantern",
        "garden",
        "copper",
        "whisper",
        "harbor",
    ]
    prompts = []
    for i in range(32):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(1, 24)))
        text = (SYSTEM if i % 2 == 0 else "") + f"Item {i}: {body}"
        prompts.append(tokenizer.encode(text))
    return prompts


@pytest.mark.slow
def test_greedy_tokens_are_batch_invariant(smollm2: LoadedModel, mixed_prompts: list[list[int]]) -> None:
    """The same greedy tokens alone and inside a batch of 32 mixed-length requests, with prefix caching on or
    off, with chunked prefills, and under forced preemption. (8 of the 32 run alone, to keep CI time down; the
    batched variants are compared on all 32.)"""
    # 20 tokens > one 16-slot block: every sequence must take a new block while it decodes (see `tiny` below)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    state = list(smollm2.weights or [])

    def fresh(**overrides: object) -> LLMEngine:
        loaded = LoadedModel(smollm2.name, smollm2.config, iter(state), smollm2.tokenizer)
        return make_engine(loaded, **overrides)

    alone_engine = fresh(enable_prefix_caching=False)
    alone = [run_all(alone_engine, [p], params)[0].outputs[0].token_ids for p in mixed_prompts[:8]]

    batched = fresh()
    run_all(batched, [mixed_prompts[0]], params)  # puts the shared system prompt in the prefix cache
    reference = [o.outputs[0].token_ids for o in run_all(batched, mixed_prompts, params)]
    assert reference[:8] == alone
    assert batched.stats().prefix_cache_hits > 0  # the shared system prompt was served from the cache

    no_cache = fresh(enable_prefix_caching=False, max_num_batched_tokens=64)  # + chunked prefills
    assert [o.outputs[0].token_ids for o in run_all(no_cache, mixed_prompts, params)] == reference
    assert no_cache.stats().prefix_cache_hits == 0

    # Room for at least 8 of the 32 prompts at once, without prefix sharing. Admission fills the cache but for less
    # than one prompt's blocks, and each of the >= 8 running sequences needs one more block before any finishes:
    # some must be preempted (and later recompute), whatever the random prompts.
    longest = max(len(p) for p in mixed_prompts) + params.max_tokens
    tiny = fresh(num_gpu_blocks=8 * -(-longest // 16), enable_prefix_caching=False)
    assert [o.outputs[0].token_ids for o in run_all(tiny, mixed_prompts, params)] == reference
    assert tiny.stats().num_preemptions > 0


@pytest.mark.slow
def test_stress_200_requests_on_a_sixteenth_sized_cache(tiny_model_dir: Callable[..., Path]) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 49152) for _ in range(rng.choice([16, 32, 48]))] for _ in range(5)]
    prompts, params = [], []
    for _ in range(200):
        prompt = rng.choice(prefixes) + [rng.randrange(3, 49152) for _ in range(rng.randint(1, 40))]
        prompts.append(prompt)
        params.append(
            SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 24), ignore_eos=True)
        )
    blocks_needed = sum(-(-(len(p) + sp.max_tokens) // 16) for p, sp in zip(prompts, params, strict=True))
    # a sixteenth of what the requests need without sharing: decoding sequences outgrow it, so some are preempted
    engine = make_engine(loaded, num_gpu_blocks=blocks_needed // 16, max_num_seqs=64, max_num_batched_tokens=512)
    outs = run_all(engine, prompts, params)  # asserts every block is free at the end
    for out, sp in zip(outs, params, strict=True):
        assert out.finished
        assert len(out.outputs[0].token_ids) == sp.max_tokens
        assert out.outputs[0].finish_reason is FinishReason.LENGTH
    stats = engine.stats()
    print(stats)
    assert stats.prefix_cache_hits > 0
    assert stats.num_preemptions > 0  # the point of the small cache: preempted, recomputed, nothing lost
    assert stats.num_requests_running == stats.num_requests_waiting == 0
    assert stats.kv_cache_usage == 0.0


def test_n_choices_share_the_prompt_and_choice_zero_is_the_seeded_single_run(smollm2: LoadedModel) -> None:
    engine = make_engine(smollm2)
    prompt = engine.tokenizer.encode(SYSTEM + "Tell me a story about a dragon.")
    single = run_all(engine, [prompt], SamplingParams(temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True))[0]
    multi = run_all(engine, [prompt], SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in multi.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason is FinishReason.LENGTH for c in multi.outputs)
    assert multi.outputs[0].token_ids == single.outputs[0].token_ids
    assert len({tuple(c.token_ids) for c in multi.outputs}) > 1
    assert multi.metrics.num_generation_tokens == 24


def test_stops_and_limits(smollm2: LoadedModel) -> None:
    llm_engine = make_engine(smollm2)
    tokenizer = llm_engine.tokenizer
    assert tokenizer is not None
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    prompt = tokenizer.encode(chat, add_special_tokens=False)
    free = run_all(llm_engine, [prompt], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0]
    assert "Paris" in free.text and free.finish_reason is FinishReason.STOP and free.stop_reason is None
    assert free.token_ids[-1] in llm_engine.eos_token_ids

    stopped = run_all(llm_engine, [prompt], SamplingParams(temperature=0, max_tokens=12, stop=["Paris"]))[0].outputs[0]
    assert stopped.finish_reason is FinishReason.STOP and stopped.stop_reason == "Paris"
    assert stopped.text == free.text[: free.text.index("Paris")]

    stop_id = free.token_ids[2]
    by_id = run_all(llm_engine, [prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]))
    assert by_id[0].outputs[0].token_ids == free.token_ids[:3] and by_id[0].outputs[0].stop_reason == stop_id

    short = run_all(llm_engine, [prompt], SamplingParams(temperature=0, max_tokens=2))[0].outputs[0]
    assert short.token_ids == free.token_ids[:2] and short.finish_reason is FinishReason.LENGTH

    n = len(free.token_ids)
    longer = run_all(llm_engine, [prompt], SamplingParams(temperature=0, max_tokens=n + 3, min_tokens=n + 3))
    assert len(longer[0].outputs[0].token_ids) == n + 3  # EOS suppressed until min_tokens
    ignore = run_all(llm_engine, [prompt], SamplingParams(temperature=0, max_tokens=n + 3, ignore_eos=True))
    assert len(ignore[0].outputs[0].token_ids) == n + 3
    assert ignore[0].outputs[0].token_ids[:n] == free.token_ids


def test_max_model_len_ends_generation(smollm2: LoadedModel) -> None:
    engine = make_engine(smollm2, max_model_len=20)
    out = run_all(engine, [list(range(100, 115))], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5 and out[0].outputs[0].finish_reason is FinishReason.LENGTH


def test_abort_frees_blocks_at_once(smollm2: LoadedModel) -> None:
    engine = make_engine(smollm2)
    engine.add_request("a", list(range(100, 140)), SamplingParams(max_tokens=50))
    engine.add_request("b", list(range(200, 240)), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    final = engine.abort_request("a")
    assert final is not None and final.finished and final.outputs[0].finish_reason is FinishReason.ABORT
    assert engine.abort_request("a") is None  # idempotent
    engine.abort_request("b")
    engine.block_manager.check_all_free()
    assert not engine.has_unfinished_requests()
    assert engine.step() == []


def test_bad_prompts_are_rejected_with_the_numbers(smollm2: LoadedModel) -> None:
    engine = make_engine(smollm2, max_model_len=64, num_gpu_blocks=2, block_size=16)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match=r"70 tokens.*max_model_len is 64"):
        engine.add_request("l", list(range(70)), SamplingParams())
    with pytest.raises(ValueError, match=r"40 tokens.*holds only 32 tokens"):
        engine.add_request("k", list(range(40)), SamplingParams())
    with pytest.raises(ValueError, match="token ids must be in"):
        engine.add_request("v", [10**7], SamplingParams())
    assert not engine.has_unfinished_requests()


def test_llm_generate_and_chat(smollm2: LoadedModel) -> None:
    llm = LLM.__new__(LLM)
    llm.engine = make_engine(smollm2)
    llm.tokenizer = llm.engine.tokenizer
    llm._next_id = 0
    outs = llm.generate(["Hello, my name is", "The sky is"], SamplingParams(temperature=0, max_tokens=5, logprobs=2))
    assert [o.request_id for o in outs] == ["llm-0", "llm-1"]
    for o in outs:
        choice = o.outputs[0]
        assert o.finished and len(choice.token_ids) == 5 and choice.text
        assert choice.logprobs is not None and len(choice.logprobs) == 5
        assert all(len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1] for lp in choice.logprobs)
        assert [lp.token_id for lp in choice.logprobs] == choice.token_ids
    chats = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=8))
    assert len(chats) == 1 and chats[0].outputs[0].text
