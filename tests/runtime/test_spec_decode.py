"""Speculative decoding (ngram): greedy output identical with and without it (batched, preempted, n > 1, logprobs,
stops inside an accepted run, structured outputs), the KV cache left empty, the prompt-lookup proposer, the
configuration, and a chi-square test that rejection sampling keeps the target distribution."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.engine.sequence import Request, Sequence
from kubellm.runtime.layers.sampler import Sampler, SamplingRow
from kubellm.runtime.llm import merge_delta
from kubellm.runtime.models.loader import LoadedModel, load_model
from kubellm.runtime.outputs import FinishReason, RequestMetrics, RequestOutput
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.spec_decode.config import SpeculativeConfig
from kubellm.runtime.spec_decode.ngram import propose_ngram
from kubellm.runtime.spec_decode.speculator import Speculator
from kubellm.runtime.spec_decode.suffix import SuffixCache
from kubellm.runtime.spec_decode.verify import accepted_length, verification_rows
from kubellm.runtime.structured_outputs import StructuredOutputsParams

PASSAGE = (
    "The river runs through the valley, past the old mill and the stone bridge, until it reaches the sea. "
    "Fishermen gather at dawn on its banks, mending nets and telling stories of storms long past."
)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
NO_CUTOFF = {**NGRAM, "disable_by_batch_size": None}


def make_engine(loaded: LoadedModel, **overrides: object) -> LLMEngine:
    fields: dict[str, object] = {"dtype": "float32", "device": "cpu", "kv_cache_memory_bytes": 64 << 20}
    fields.update(overrides)
    return LLMEngine(EngineConfig(model=loaded.name, **fields), loaded=loaded)


def run_all(
    engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams], deltas: dict | None = None
) -> list[RequestOutput]:
    results = {}
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        request = engine.add_request(str(i), prompt, p)
        results[str(i)] = RequestOutput(str(i), request.prompt_token_ids, [], False, request.metrics)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            if deltas is not None:
                deltas.setdefault(delta.request_id, []).append(delta)
            merge_delta(results[delta.request_id], delta)
    engine.block_manager.check_all_free()
    return [results[str(i)] for i in range(len(prompts))]


def chat(loaded: LoadedModel, text: str) -> list[int]:
    tokenizer = loaded.tokenizer
    assert tokenizer is not None
    return tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)


@pytest.fixture(scope="module")
def smollm2_state(smollm2_gguf_path: Path) -> LoadedModel:
    loaded = load_model(str(smollm2_gguf_path))
    loaded.weights = list(loaded.weights or [])  # type: ignore[assignment]
    return loaded


def fresh(state: LoadedModel) -> LoadedModel:
    return LoadedModel(state.name, state.config, iter(state.weights or []), state.tokenizer)  # type: ignore[arg-type]


# ---- the proposer and the configuration -------------------------------------------------------------------------
def test_prompt_lookup_proposes_what_followed_the_latest_match() -> None:
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 8, 2, 3]
    assert propose_ngram(tokens, 3, 2, 4) == [4, 6, 7]  # "2 3" last seen before "4 6 7"
    assert propose_ngram([*tokens, 4], 2, 2, 4) == [6, 7]  # the longer "2 3 4" wins
    assert propose_ngram([1, 2, 3, 4], 3, 2, 4) == []  # no earlier occurrence
    assert propose_ngram([5, 5, 5], 4, 2, 2) == [5]  # an overlapping match proposes the last token


def test_speculative_config_names_the_bad_key() -> None:
    with pytest.raises(ValueError, match=r"speculative_config: unknown key.*num_spec_tokens"):
        EngineConfig(speculative_config={"method": "ngram", "num_spec_tokens": 3})
    with pytest.raises(ValueError, match=r"speculative_config\.method"):
        EngineConfig(speculative_config={"method": "eagle"})
    with pytest.raises(ValueError, match=r"speculative_config\.prompt_lookup_min"):
        EngineConfig(speculative_config={"prompt_lookup_min": 5, "prompt_lookup_max": 3})
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(speculative_config={"num_speculative_tokens": 0})
    assert SpeculativeConfig.from_dict(NGRAM).num_speculative_tokens == 4


def test_the_flag_parses_json() -> None:
    import argparse

    from kubellm.runtime import config

    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert config.given(args) == {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3}}
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", "[1, 2]"])


# ---- rejection sampling keeps the target distribution -----------------------------------------------------------
def chi_square_p(observed: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's chi-square (cells with expectation > 0), through the regularized gamma function."""
    keep = expected > 0
    assert observed[~keep].sum() == 0, "a token of probability 0 was drawn"
    o, e = observed[keep].double(), expected[keep].double()
    stat = ((o - e) ** 2 / e).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


# A correct sampler fails a check at this p-value once in a million runs; a biased one (say, a residual that keeps the
# draft) fails it at any seed. 1e-4 failed one CI run in about twenty-five (seed 1436674696: p = 2.8e-5).
P_FLOOR = 1e-6


def test_rejection_sampling_keeps_the_target_distribution() -> None:
    """A chain of two drafts over a vocabulary of 6: the first emitted token is distributed as p0 (whatever the
    draft), and the second, given that the first draft was accepted, as p1."""
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    vocab, draws = 6, 50000
    logits = torch.randn(3, vocab, generator=gen) * 1.5  # rows: verify d0, verify d1, sample after both
    drafts = [int(torch.randint(vocab, (1,), generator=gen)), int(torch.randint(vocab, (1,), generator=gen))]
    params = SamplingParams(temperature=0.8, top_k=5)
    sampler = Sampler(seed)
    base = SamplingRow(params, [0], [])
    rows = verification_rows(base, drafts) * draws
    out = sampler(logits.repeat(draws, 1), rows)
    first = torch.zeros(vocab)
    second = torch.zeros(vocab)
    for d in range(draws):
        lo = 3 * d
        n = accepted_length(out.accepted[lo : lo + 2])
        run = out.token_ids[lo : lo + n + 1]
        first[run[0]] += 1
        if n >= 1:
            second[run[1]] += 1

    def target(row: torch.Tensor) -> torch.Tensor:
        scaled = row / params.temperature
        kth = scaled.topk(params.top_k).values[-1]
        return scaled.masked_fill(scaled < kth, float("-inf")).softmax(-1)

    p0, p1 = target(logits[0]), target(logits[1])
    assert chi_square_p(first, p0 * draws) > P_FLOOR, (first, p0 * draws)
    num_second = int(second.sum())
    assert num_second == int(first[drafts[0]])  # the second token exists exactly when the first draft was taken
    if num_second >= 500:
        assert chi_square_p(second, p1 * num_second) > P_FLOOR, (second, p1 * num_second)
    # the acceptance rate of the first draft is its probability
    assert abs(first[drafts[0]] / draws - p0[drafts[0]]) < 0.02


def test_greedy_verification_accepts_exactly_the_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    rows = verification_rows(SamplingRow(SamplingParams(temperature=0), [0], []), [1, 2])
    out = Sampler()(logits.clone(), rows)
    assert out.accepted[:2] == [True, False]
    assert out.token_ids[:2] == [1, 0]  # draft 1 accepted; in place of draft 2 the argmax 0


# ---- the engine ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_greedy_identical_batched_preempted_n_and_logprobs(smollm2_state: LoadedModel) -> None:
    """Extractive and free-form prompts in one batch, with n = 2 and logprobs: the same tokens with speculation
    as without, on a roomy cache and on one so small that sequences are preempted; every block free after."""
    prompts = [
        chat(smollm2_state, f"Repeat this passage word for word: {PASSAGE}"),
        chat(smollm2_state, "Write a short poem about the sea."),
        chat(smollm2_state, f"Quote the second sentence of this text: {PASSAGE}"),
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=40, logprobs=2),
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=0, max_tokens=32, n=2),
    ]
    reference = run_all(make_engine(fresh(smollm2_state)), prompts, params)

    spec = make_engine(fresh(smollm2_state), speculative_config=NO_CUTOFF)
    got = run_all(spec, prompts, params)
    for ref, out in zip(reference, got, strict=True):
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs]
        assert [c.finish_reason for c in out.outputs] == [c.finish_reason for c in ref.outputs]
    ref_lp, spec_lp = reference[0].outputs[0].logprobs, got[0].outputs[0].logprobs
    assert ref_lp is not None and spec_lp is not None and len(spec_lp) == len(ref_lp)
    for a, b in zip(ref_lp, spec_lp, strict=True):
        assert a.token_id == b.token_id
        assert b.logprob == pytest.approx(a.logprob, abs=1e-3)
        assert [t for t, _ in b.top] == [t for t, _ in a.top]
    stats = spec.stats().spec_decode
    assert stats is not None
    print(stats)
    assert stats.num_accepted_tokens > 20  # the passage is copied: speculation really ran and paid
    assert stats.num_accepted_tokens_per_pos[0] >= stats.num_accepted_tokens_per_pos[-1] > 0

    # each sequence needs up to ~7 blocks of 16; 12 blocks hold fewer than two of them at once
    tiny = make_engine(fresh(smollm2_state), speculative_config=NO_CUTOFF, num_gpu_blocks=12)
    got = run_all(tiny, prompts, params)
    for ref, out in zip(reference, got, strict=True):
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs]
    assert tiny.stats().num_preemptions > 0
    assert tiny.stats().spec_decode.num_accepted_tokens > 0  # type: ignore[union-attr]


@pytest.mark.slow
def test_stop_string_and_max_tokens_inside_an_accepted_run(smollm2_state: LoadedModel) -> None:
    prompt = chat(smollm2_state, f"Repeat this passage word for word: {PASSAGE}")
    params = [
        SamplingParams(temperature=0, max_tokens=60, stop=["stone bridge"]),
        SamplingParams(temperature=0, max_tokens=27),
    ]
    reference = run_all(make_engine(fresh(smollm2_state)), [prompt, prompt], params)
    assert reference[0].outputs[0].finish_reason is FinishReason.STOP
    deltas: dict[str, list[RequestOutput]] = {}
    got = run_all(make_engine(fresh(smollm2_state), speculative_config=NO_CUTOFF), [prompt, prompt], params, deltas)
    for ref, out in zip(reference, got, strict=True):
        (r,), (o,) = ref.outputs, out.outputs
        assert (o.text, o.token_ids, o.finish_reason, o.stop_reason) == (r.text, r.token_ids, r.finish_reason,
                                                                         r.stop_reason)  # fmt: skip
    assert got[0].outputs[0].stop_reason == "stone bridge" and "stone" not in got[0].outputs[0].text
    assert len(got[1].outputs[0].token_ids) == 27
    # both ended in a step that appended several tokens: the stop rule cut an accepted run
    for rid in ("0", "1"):
        assert len(deltas[rid][-1].outputs[0].token_ids) > 1, [len(d.outputs[0].token_ids) for d in deltas[rid]]


def _decoding_seq(request_id: str, token_ids: list[int], max_tokens: int = 100) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens)
    request = Request(request_id, token_ids[:4], params, 0, 0, RequestMetrics(arrival_time=0.0))
    seq = Sequence(0, request, 0, list(token_ids), 4)
    seq.num_computed_tokens = len(token_ids) - 1  # its next step is a decode
    return seq


def test_drafts_stop_above_the_batch_size_cutoff_and_at_max_tokens() -> None:
    spec = Speculator(SpeculativeConfig.from_dict({**NGRAM, "disable_by_batch_size": 2}), max_seq_len=1000)
    tokens = [5, 6, 7, 8] * 4
    running = [_decoding_seq(str(i), tokens) for i in range(3)]
    spec.propose(running)
    assert all(s.draft_token_ids == [] for s in running)
    spec.propose(running[:2])
    assert [s.draft_token_ids for s in running[:2]] == [[5, 6, 7, 8]] * 2
    # 12 of 14 output tokens produced: one draft at most (a step emits the drafts it accepts plus one)
    near_end = _decoding_seq("x", tokens, max_tokens=14)
    spec.propose([near_end])
    assert near_end.draft_token_ids == [5]
    # a guess that failed outright: no drafts for 1 step, then after a second miss for 2
    seq = running[0]
    spec.record(seq, 4, 0)
    spec.propose([seq])
    assert seq.draft_token_ids == []
    spec.propose([seq])
    assert seq.draft_token_ids == [5, 6, 7, 8]
    spec.record(seq, 4, 0)
    assert [(spec.propose([seq]), seq.draft_token_ids)[1] for _ in range(3)] == [[], [], [5, 6, 7, 8]]
    spec.record(seq, 4, 1)  # a hit resets the back-off
    spec.record(seq, 4, 0)
    assert seq.spec_skip_steps == 1
    prefilling = _decoding_seq("y", tokens)
    prefilling.num_computed_tokens = 4
    spec.propose([prefilling])
    assert prefilling.draft_token_ids == []


def test_structured_outputs_with_drafts_match_without(tiny_model_dir: Callable[..., Path]) -> None:
    """The matcher is advanced over the drafts to mask each verified row, then rolled back: greedy output under a
    grammar is the same with speculation, and sampled output stays inside the grammar."""
    loaded = load_model(str(tiny_model_dir("llama")))
    state = list(loaded.weights or [])

    def engine(**kw: object) -> LLMEngine:
        return make_engine(LoadedModel(loaded.name, loaded.config, iter(state), loaded.tokenizer), **kw)

    regex = StructuredOutputsParams(regex=r"(ab|abc|b){3,12}c")
    prompt = loaded.tokenizer.encode("ab ab abc ab abc abc b ab") * 3  # type: ignore[union-attr]
    greedy = SamplingParams(temperature=0, max_tokens=40, structured_outputs=regex)
    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=40, structured_outputs=regex)
    ref = run_all(engine(), [prompt], [greedy])[0].outputs[0]
    spec = engine(speculative_config=NO_CUTOFF)
    out = run_all(spec, [prompt, prompt], [greedy, sampled])
    assert out[0].outputs[0].token_ids == ref.token_ids
    import re

    for o in out:
        assert re.fullmatch(r"(ab|abc|b){3,12}c", o.outputs[0].text), o.outputs[0].text
    assert spec.stats().spec_decode.num_draft_tokens > 0  # type: ignore[union-attr]


# ---- method "suffix": drafts from other requests ----------------------------------------------------------------
def test_suffix_cache_proposes_from_other_requests_and_stays_bounded() -> None:
    cache = SuffixCache(max_cached_requests=2, min_n=2, max_n=3)
    cache.add([1, 2, 3, 4, 5, 6])
    assert cache.propose([9, 9, 2, 3], 3) == [4, 5, 6]
    assert cache.propose([9, 1, 2, 3], 2) == [4, 5]  # the longest suffix "1 2 3"
    cache.add([7, 8, 9, 10])
    cache.add([2, 3, 11, 12])  # evicts the first; "2 3" now continues with 11
    assert cache.propose([2, 3], 2) == [11, 12]
    assert cache.propose([4, 5], 1) == []  # only the evicted request had it
    assert len(cache._docs) == 2 and cache.num_cached_tokens == 8
    assert all(doc in cache._docs for doc, _ in cache._index.values())  # no entry outlives its request


def test_suffix_method_drafts_a_repeated_request_from_the_earlier_one(tiny_model_dir: Callable[..., Path]) -> None:
    loaded = load_model(str(tiny_model_dir("llama")))
    state = list(loaded.weights or [])

    def engine(**kw: object) -> LLMEngine:
        return make_engine(LoadedModel(loaded.name, loaded.config, iter(state), loaded.tokenizer), **kw)

    prompt = [11, 12, 13, 14, 15, 16, 17, 18]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)]
    ref = run_all(engine(), [prompt], params)[0].outputs[0].token_ids
    spec = engine(speculative_config={**NO_CUTOFF, "method": "suffix"})
    assert run_all(spec, [prompt], params)[0].outputs[0].token_ids == ref
    first = spec.stats().spec_decode
    assert first is not None
    assert run_all(spec, [prompt], params)[0].outputs[0].token_ids == ref  # the agent loop asks again
    second = spec.stats().spec_decode
    assert second is not None
    assert second.num_accepted_tokens - first.num_accepted_tokens >= 20  # nearly all of it came from the cache
