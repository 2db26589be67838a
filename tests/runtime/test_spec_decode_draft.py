"""Speculative decoding with a draft model (method draft_model): greedy output identical with and without it
(batched, preempted, n > 1, logprobs, stops inside an accepted run, structured outputs), both KV caches left empty,
the full model as its own draft accepting every guess, and the refusals (another vocabulary, a missing model)."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from spec_drafts import SMOLLM2_DRAFT_LAYERS, write_layer_subset

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.block_manager import BlockManager
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.engine.sequence import Sequence
from kubellm.runtime.llm import LLM
from kubellm.runtime.models.build import model_weight_bytes
from kubellm.runtime.models.loader import LoadedModel, load_model
from kubellm.runtime.outputs import RequestOutput
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.structured_outputs import StructuredOutputsParams

from .test_spec_decode import PASSAGE, chat, fresh, run_all
from .test_spec_decode import make_engine as make_plain_engine


def make_engine(loaded: LoadedModel, **overrides: object) -> LLMEngine:
    """Plain float weights for target and draft alike (this CPU's int4 kernel is far slower than its float GEMM)."""
    return make_plain_engine(loaded, **{"quantization": "none", **overrides})


def draft_config(model: str | Path, **overrides: object) -> dict[str, object]:
    return {"method": "draft_model", "model": str(model), "num_speculative_tokens": 3,
            "disable_by_batch_size": None, **overrides}  # fmt: skip


def run_checked(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
    """run_all, then the draft's cache is empty too."""
    out = run_all(engine, prompts, params)
    assert engine.speculator is not None and engine.speculator.draft_model is not None
    engine.speculator.draft_model.block_manager.check_all_free()
    assert engine.speculator.draft_model.num_sequences == 0
    return out


def same_tokens(got: list[RequestOutput], reference: list[RequestOutput]) -> None:
    for ref, out in zip(reference, got, strict=True):
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ref.outputs]
        assert [c.finish_reason for c in out.outputs] == [c.finish_reason for c in ref.outputs]


@pytest.fixture(scope="module")
def smollm2_state(smollm2_gguf_path: Path) -> LoadedModel:
    loaded = load_model(str(smollm2_gguf_path))
    loaded.weights = list(loaded.weights or [])  # type: ignore[assignment]
    return loaded


@pytest.fixture(scope="module")
def truncated_draft_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_state: LoadedModel) -> Path:
    """SmolLM2 with only its SMOLLM2_DRAFT_LAYERS decoder layers, as a Hugging Face directory with its tokenizer."""
    return write_layer_subset(smollm2_state, SMOLLM2_DRAFT_LAYERS, tmp_path_factory.mktemp("smollm2-draft"))


@pytest.fixture(scope="module")
def batch(smollm2_state: LoadedModel) -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [
        chat(smollm2_state, f"Repeat this passage word for word: {PASSAGE}"),
        chat(smollm2_state, "Write a short poem about the sea."),
        chat(smollm2_state, "Name three colours."),
    ]
    params = [
        SamplingParams(temperature=0, max_tokens=20, logprobs=2),
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=10, n=2),
    ]
    return prompts, params


@pytest.fixture(scope="module")
def reference(smollm2_state: LoadedModel, batch: tuple[list[list[int]], list[SamplingParams]]) -> list[RequestOutput]:
    return run_all(make_engine(fresh(smollm2_state)), *batch)


# ---- exactness --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_greedy_identical_with_a_truncated_draft(
    smollm2_state: LoadedModel, truncated_draft_dir: Path, batch: tuple, reference: list[RequestOutput]
) -> None:
    """Three prompts in one batch (n = 2, logprobs): the same tokens and logprobs as without speculation; each
    proposal (after runs accepted in part, in full, or not at all) is the draft's own greedy continuation."""
    engine = make_engine(fresh(smollm2_state), speculative_config=draft_config(truncated_draft_dir))
    oracle = LLM(str(truncated_draft_dir), device="cpu", dtype="float32", kv_cache_memory_bytes=64 << 20)
    checked = check_drafts_against(engine, oracle, {"0"})  # the passage: most of the accepted runs
    got = run_checked(engine, *batch)
    same_tokens(got, reference)
    ref_lp, spec_lp = reference[0].outputs[0].logprobs, got[0].outputs[0].logprobs
    assert ref_lp is not None and spec_lp is not None
    for a, b in zip(ref_lp, spec_lp, strict=True):
        assert (a.token_id, [t for t, _ in a.top]) == (b.token_id, [t for t, _ in b.top])
        assert b.logprob == pytest.approx(a.logprob, abs=1e-3)
    stats = engine.stats().spec_decode
    assert stats is not None
    print(stats)
    assert len(checked) > 3
    assert 0 < stats.num_accepted_tokens < stats.num_draft_tokens  # guesses both right and wrong: rollbacks
    assert stats.num_accepted_tokens_per_pos[-1] > 0  # and whole runs accepted


@pytest.mark.slow
def test_greedy_identical_with_preemption(
    smollm2_state: LoadedModel, truncated_draft_dir: Path, batch: tuple, reference: list[RequestOutput]
) -> None:
    """A cache so small that sequences are preempted (and recomputed): the same tokens, neither cache leaks."""
    prompts, params = batch
    # the passage (5 blocks of 16 by its end) and the n = 2 request (2 blocks per choice) in 6 blocks
    engine = make_engine(fresh(smollm2_state), speculative_config=draft_config(truncated_draft_dir), num_gpu_blocks=6)
    assert engine.speculator is not None and engine.speculator.draft_model is not None
    assert engine.speculator.draft_model.block_manager.num_blocks == 6  # as many as the target's
    same_tokens(run_checked(engine, [prompts[0], prompts[2]], [params[0], params[2]]), [reference[0], reference[2]])
    print(engine.stats())
    assert engine.stats().num_preemptions > 0
    assert engine.stats().spec_decode.num_draft_tokens > 0  # type: ignore[union-attr]


@pytest.mark.slow
def test_the_model_as_its_own_draft_accepts_every_guess(smollm2_state: LoadedModel, smollm2_gguf_path: Path) -> None:
    """The draft's greedy guesses are the target's own argmax, so every one is accepted; with a stop string inside
    an accepted run the output still stops exactly where it does without speculation."""
    prompt = chat(smollm2_state, f"Repeat this passage word for word: {PASSAGE}")
    params = [SamplingParams(temperature=0, max_tokens=40, stop=["stone bridge"])]
    ref = run_all(make_engine(fresh(smollm2_state)), [prompt], params)[0].outputs[0]
    engine = make_engine(fresh(smollm2_state), speculative_config=draft_config(smollm2_gguf_path))
    out = run_checked(engine, [prompt], params)[0].outputs[0]
    assert (out.text, out.token_ids, out.stop_reason) == (ref.text, ref.token_ids, "stone bridge")
    stats = engine.stats().spec_decode
    assert stats is not None and stats.num_drafts > 0
    assert stats.num_accepted_tokens == stats.num_draft_tokens, stats


# ---- the tiny random model: its own draft, cheap enough for the non-slow tests ----------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Callable[..., Path]) -> tuple[Path, Callable[..., LLMEngine]]:
    directory = tiny_model_dir("llama")
    loaded = load_model(str(directory))
    state = list(loaded.weights or [])

    def engine(**kw: object) -> LLMEngine:
        return make_engine(LoadedModel(loaded.name, loaded.config, iter(state), loaded.tokenizer), max_model_len=512,
                           **kw)  # fmt: skip

    return directory, engine


def test_structured_outputs_and_sampling_with_a_draft_model(tiny: tuple[Path, Callable[..., LLMEngine]]) -> None:
    """Under a grammar greedy output is the same with drafts; sampled output stays in the grammar; stop strings
    cut an accepted run where one-token steps stop."""
    directory, engine = tiny
    loaded = load_model(str(directory), load_format="dummy")
    assert loaded.tokenizer is not None
    regex = StructuredOutputsParams(regex=r"(ab|abc|b){3,12}c")
    prompt = loaded.tokenizer.encode("ab ab abc ab abc abc b ab") * 3
    greedy = SamplingParams(temperature=0, max_tokens=40, structured_outputs=regex)
    sampled = SamplingParams(temperature=1.0, seed=7, max_tokens=40, structured_outputs=regex)
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = run_all(engine(), [prompt, prompt], [greedy, free])
    stop = ref[1].outputs[0].text[10:14]  # a few characters from the middle of the free run
    stopped = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    ref_stop = run_all(engine(), [prompt], [stopped])[0].outputs[0]
    spec = engine(speculative_config=draft_config(directory))
    out = run_checked(spec, [prompt, prompt, prompt, prompt], [greedy, sampled, free, stopped])
    assert out[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    assert out[2].outputs[0].token_ids == ref[1].outputs[0].token_ids
    assert (out[3].outputs[0].text, out[3].outputs[0].stop_reason) == (ref_stop.text, stop)
    for o in out[:2]:
        assert re.fullmatch(r"(ab|abc|b){3,12}c", o.outputs[0].text), o.outputs[0].text
    stats = spec.stats().spec_decode
    assert stats is not None and stats.num_accepted_tokens > 0


def check_drafts_against(engine: LLMEngine, oracle: LLM, request_ids: set[str] | None = None) -> list[int]:
    """Make every proposal of ``engine``'s draft model (for ``request_ids``; None: all) be compared with the draft
    model's greedy continuation of the same tokens computed from scratch by ``oracle`` (no speculation): a draft
    cache that kept a rolled-back slot, or lost an accepted one, guesses differently. Returns the list that counts
    the checked proposals."""
    assert engine.speculator is not None and engine.speculator.draft_model is not None
    draft = engine.speculator.draft_model
    propose = draft.propose
    checked: list[int] = []

    def propose_and_check(wanted: list[tuple[Sequence, int]]) -> None:
        propose(wanted)
        for seq, k in wanted:
            if seq.draft_token_ids and (request_ids is None or seq.request.request_id in request_ids):
                greedy = SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
                expected = oracle.generate(list(seq.token_ids), greedy)[0].outputs[0].token_ids
                assert seq.draft_token_ids == expected, (seq, len(checked))
                checked.append(k)

    draft.propose = propose_and_check  # type: ignore[method-assign]
    return checked


def test_every_proposal_is_the_drafts_own_greedy_continuation(
    tiny: tuple[Path, Callable[..., LLMEngine]], tiny_model_dir: Callable[..., Path]
) -> None:
    """A random draft of another architecture (Qwen3, same tokenizer) for the tiny Llama: nearly every guess is
    rejected and rolled back, and each next proposal is still what the draft computes from scratch."""
    _, engine = tiny
    draft_dir = tiny_model_dir("qwen3")
    prompts = [[11 + i, 12, 13, 14, 15, 16, 17, 18] * (1 + i) for i in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, n=1 + (i == 1)) for i in range(3)]
    ref = run_all(engine(), prompts, params)
    spec = engine(speculative_config=draft_config(draft_dir, disable_by_batch_size=None))
    oracle = LLM(str(draft_dir), device="cpu", dtype="float32", max_model_len=512, kv_cache_memory_bytes=16 << 20)
    checked = check_drafts_against(spec, oracle)
    same_tokens(run_checked(spec, prompts, params), ref)
    stats = spec.stats().spec_decode
    print(stats)
    assert stats is not None and len(checked) == stats.num_drafts > 10, (len(checked), stats)
    assert stats.num_accepted_tokens < stats.num_draft_tokens  # rollbacks happened


def test_a_full_draft_cache_means_no_drafts(tiny: tuple[Path, Callable[..., LLMEngine]]) -> None:
    """When the draft's own blocks run out a sequence just decodes without drafts: no error, the same output."""
    directory, engine = tiny
    prompts = [[11 + i, 12, 13, 14, 15, 16, 17, 18] * (2 + 4 * i) for i in range(3)]  # 16, 48 and 80 tokens
    params = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)] * 3
    ref = run_all(engine(), prompts, params)
    roomy = engine(speculative_config=draft_config(directory))
    same_tokens(run_checked(roomy, prompts, params), ref)
    spec = engine(speculative_config=draft_config(directory))
    assert spec.speculator is not None and spec.speculator.draft_model is not None
    # the draft keeps 4 blocks of 16 to itself: room for the first sequence, never for the third one
    spec.speculator.draft_model.block_manager = BlockManager(4, 16, enable_prefix_caching=False)
    same_tokens(run_checked(spec, prompts, params), ref)
    full, room = spec.stats().spec_decode, roomy.stats().spec_decode
    assert full is not None and room is not None
    assert 0 < full.num_drafts < room.num_drafts, (full, room)


def test_llm_takes_a_draft_model(tiny: tuple[Path, Callable[..., LLMEngine]]) -> None:
    """``LLM(..., speculative_config=...)``: the draft is loaded from its path like the target."""
    directory, _ = tiny
    common: dict[str, object] = {"device": "cpu", "dtype": "float32", "max_model_len": 512,
                                 "kv_cache_memory_bytes": 16 << 20}  # fmt: skip
    prompts: list[list[int]] = [[11, 12, 13, 14] * 3, [20, 21, 22]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = LLM(str(directory), **common).generate(prompts, params)
    llm = LLM(str(directory), **common, speculative_config=draft_config(directory))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == [o.outputs[0].token_ids for o in plain]
    stats = llm.engine.stats().spec_decode
    assert stats is not None and stats.num_accepted_tokens > 0


def test_the_gpu_budget_counts_the_drafts_weights(tiny_model_dir: Callable[..., Path]) -> None:
    """model_weight_bytes (what a GPU's KV budget leaves for the draft's weights) is the checkpoint's size."""
    from safetensors import safe_open

    directory = tiny_model_dir("qwen3")
    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        size = sum(math.prod(f.get_slice(name).get_shape()) * 4 for name in f.keys())  # noqa: SIM118
    config = load_model(str(directory), load_format="dummy").config
    assert model_weight_bytes(config, torch.float32) == size
    assert model_weight_bytes(config, torch.bfloat16) == size // 2


def test_a_target_with_a_larger_head_than_the_drafts(
    tiny: tuple[Path, Callable[..., LLMEngine]], tmp_path: Path
) -> None:
    """The same tokenizer, the target's head padded by 64 rows: a sequence holding a padding id (no token of the
    tokenizer, so the draft has no row for it) gets no drafts; the others do, and nothing fails."""
    import transformers

    directory, _ = tiny
    config = transformers.AutoConfig.from_pretrained(directory)
    config.vocab_size += 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(directory / name, tmp_path / name)
    loaded = load_model(str(tmp_path))
    assert loaded.config.vocab_size == 49152 + 64
    prompts = [[11, 12, 13, 14] * 3, [11, 12, 13, 49152 + 5]]  # the second ends in a padding id
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 2
    state = list(loaded.weights or [])

    def target(**kw: object) -> LLMEngine:
        return make_engine(LoadedModel(loaded.name, loaded.config, iter(state), loaded.tokenizer), max_model_len=512,
                           **kw)  # fmt: skip

    ref = run_all(target(), prompts, params)
    spec = target(speculative_config=draft_config(directory))
    same_tokens(run_checked(spec, prompts, params), ref)
    stats = spec.stats().spec_decode
    assert stats is not None and stats.num_drafts > 0


# ---- refusals ---------------------------------------------------------------------------------------------------
def test_a_draft_with_another_vocabulary_is_refused(
    tiny: tuple[Path, Callable[..., LLMEngine]], tmp_path: Path
) -> None:
    directory, engine = tiny
    other = tmp_path / "other-vocab"
    shutil.copytree(directory, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[100]], vocab[by_id[101]] = 101, 100  # two tokens swap ids
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=r"speculative_config\.model .*other-vocab.* is 100 in the target, 101 in"):
        engine(speculative_config=draft_config(other))


def test_draft_model_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"speculative_config\.model is required with method draft_model"):
        EngineConfig(speculative_config={"method": "draft_model"})
    with pytest.raises(ValueError, match=r"speculative_config\.model applies to method draft_model only"):
        EngineConfig(speculative_config={"method": "ngram", "model": "x"})
    with pytest.raises(ValueError, match=r"draft_model does not support tensor_parallel_size"):
        EngineConfig(speculative_config={"method": "draft_model", "model": "x"}, tensor_parallel_size=2)


def test_a_draft_that_cannot_be_loaded_is_refused(smollm2_state: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"speculative_config\.model '.*nowhere' cannot be loaded: .*no such file"):
        make_engine(fresh(smollm2_state), speculative_config=draft_config(tmp_path / "nowhere"))


def test_a_draft_with_a_shorter_context_is_refused(
    tiny: tuple[Path, Callable[..., LLMEngine]], smollm2_state: LoadedModel
) -> None:
    directory, _ = tiny  # 512 positions; SmolLM2's 8192
    with pytest.raises(ValueError, match=r"speculative_config\.model .* max_position_embeddings 512"):
        make_engine(fresh(smollm2_state), speculative_config=draft_config(directory), max_model_len=1024)
