"""Tensor parallelism with real torch.distributed processes on gloo: greedy tokens at TP > 1 equal TP 1 in float32.

Tiny random models that transformers builds from a config (one Llama whose heads divide by the ranks, one Qwen3
with fewer KV heads than ranks, so each KV head is replicated) and the bundled SmolLM2 (9 heads, 3 KV heads) at
TP 3. Prompts are token ids drawn from a printed seed; few tokens each, to keep the wall time modest on 2 cores.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.llm import LLM
from kubellm.runtime.sampling_params import SamplingParams

TINY = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "head_dim": 16,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}  # fmt: skip


def save_tiny(kind: str, path: Path, *, tied: bool = False, **heads: int) -> Path:
    import transformers

    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**TINY, "tie_word_embeddings": tied}, **heads, torch_dtype="float32"))
    model.save_pretrained(path, safe_serialization=True)
    return path


def greedy_tokens(model: str, tp: int, prompts: list[list[int]], **overrides: Any) -> list[list[int]]:
    fields: dict[str, Any] = {"device": "cpu", "dtype": "float32", "max_model_len": 128, "block_size": 8,
                              "kv_cache_memory_bytes": 1 << 22, "tensor_parallel_size": tp, **overrides}  # fmt: skip
    llm = LLM(model, **fields)
    try:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
    finally:
        llm.engine.runner.shutdown()


def draw_prompts(vocab: int, count: int = 3) -> list[list[int]]:
    seed = random.randrange(2**31)
    print(f"prompt seed={seed}")
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 20))] for _ in range(count)]


@pytest.mark.parametrize(
    ("kind", "heads"),
    [
        pytest.param("llama", {"num_attention_heads": 4, "num_key_value_heads": 2}, id="llama-heads-divide"),
        pytest.param("qwen3", {"num_attention_heads": 4, "num_key_value_heads": 1}, id="qwen3-kv-replicated"),
    ],
)
def test_tp2_greedy_tokens_equal_tp1(tmp_path: Path, kind: str, heads: dict[str, int]) -> None:
    model = str(save_tiny(kind, tmp_path / kind, **heads))
    prompts = draw_prompts(TINY["vocab_size"])
    expected = greedy_tokens(model, 1, prompts)
    assert greedy_tokens(model, 2, prompts) == expected


@pytest.mark.parametrize(
    ("tp", "pp", "tied"),
    [
        pytest.param(1, 2, False, id="pp2"),
        pytest.param(1, 2, True, id="pp2-tied"),
        pytest.param(2, 2, False, id="tp2xpp2"),
    ],
)
def test_pipeline_greedy_tokens_equal_tp1(tmp_path: Path, tp: int, pp: int, tied: bool) -> None:
    """Stages of contiguous layers (one each here); micro-batches of a step passed on with send/recv. Tied: the last
    stage holds the embedding as its head."""
    model = str(save_tiny("llama", tmp_path / "llama", num_attention_heads=4, num_key_value_heads=2, tied=tied))
    prompts = draw_prompts(TINY["vocab_size"], count=5)
    expected = greedy_tokens(model, 1, prompts)
    assert greedy_tokens(model, tp, prompts, pipeline_parallel_size=pp) == expected


def test_more_stages_than_layers_are_refused(tmp_path: Path) -> None:
    model = str(save_tiny("llama", tmp_path / "llama", num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="pipeline_parallel_size 3 exceeds the model's 2 layers"):
        LLM(model, device="cpu", pipeline_parallel_size=3)


@pytest.mark.slow
def test_tp3_smollm2_greedy_tokens_equal_tp1() -> None:
    """The bundled model: 9 heads and 3 KV heads over 3 ranks (one KV head each), vocabulary 49152 split in 3."""
    prompts = draw_prompts(49152, count=2)
    model = "builtin:smollm2-135m-instruct"
    expected = greedy_tokens(model, 1, prompts, quantization="none")
    assert greedy_tokens(model, 3, prompts, quantization="none") == expected


def test_a_rank_count_that_does_not_split_the_heads_is_refused(tmp_path: Path) -> None:
    model = str(save_tiny("llama", tmp_path / "llama", num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's 4 attention heads"):
        LLM(model, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be at least 1, got 0"):
        EngineConfig(tensor_parallel_size=0)


def test_each_rank_holds_only_its_shard(tmp_path: Path) -> None:
    """The rank-0 model of TP 2: half the heads, half the intermediate size, half the vocabulary, half the KV."""
    model = str(save_tiny("llama", tmp_path / "llama", num_attention_heads=4, num_key_value_heads=2))
    llm = LLM(model, device="cpu", dtype="float32", tensor_parallel_size=2, kv_cache_memory_bytes=1 << 20)
    try:
        m = llm.engine.model
        attn = m.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
        # the layers' shapes (on the CPU oneDNN's packed copy replaces the plain weight, held once)
        assert (attn.qkv_proj.out_features, attn.qkv_proj.in_features) == ((2 + 1 + 1) * 16, 64)
        assert (attn.o_proj.out_features, attn.o_proj.in_features) == (64, 2 * 16)
        gate_up = m.layers[0].mlp.gate_up_proj
        assert (gate_up.out_features, gate_up.in_features) == (96, 64)
        assert tuple(m.embed_tokens.weight.shape) == (150, 64)
        assert llm.engine.runner.kv_caches[0].shape[3] == 1
    finally:
        llm.engine.runner.shutdown()


def test_prompt_logprobs_under_tp2_x_pp2_equal_tp1(tmp_path: Path) -> None:
    """Scored prompt rows leave the model beside the sampled ones, through chunked prefills split into
    micro-batches across the stages."""
    model = str(save_tiny("llama", tmp_path / "llama", num_attention_heads=4, num_key_value_heads=2))
    prompts = draw_prompts(TINY["vocab_size"], count=4)
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=2)

    def scored(tp: int, pp: int) -> list[list[tuple[int, float, list[int]] | None]]:
        llm = LLM(model, device="cpu", dtype="float32", max_model_len=128, block_size=8, kv_cache_memory_bytes=1 << 22,
                  max_num_batched_tokens=8, tensor_parallel_size=tp, pipeline_parallel_size=pp)  # fmt: skip
        try:
            outs = llm.generate(prompts, params)
        finally:
            llm.engine.runner.shutdown()
        return [
            [
                None if lp is None else (lp.token_id, lp.logprob, [t for t, _ in lp.top])
                for lp in out.prompt_logprobs or []
            ]
            for out in outs
        ]

    expected = scored(1, 1)
    assert [len(s) for s in expected] == [len(p) for p in prompts]
    got = scored(2, 2)
    for want, have in zip(expected, got, strict=True):
        assert [w is None for w in want] == [h is None for h in have]
        for w, h in zip(want, have, strict=True):
            if w is not None and h is not None:
                assert (w[0], w[2]) == (h[0], h[2])
                assert w[1] == pytest.approx(h[1], abs=1e-4)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(tensor_parallel_size=3, nnodes=2, master_addr="n0"), "nnodes (2) must divide"),
        (dict(tensor_parallel_size=2, nnodes=2, node_rank=2, master_addr="n0"), "node_rank must be in [0, nnodes = 2)"),
        (dict(tensor_parallel_size=2, nnodes=2), "master_addr is needed when nnodes > 1"),
        (dict(tensor_parallel_size=2, nnodes=2, master_addr="n0", master_port=0), "master_port must be in"),
    ],
)
def test_bad_node_layouts_are_refused_naming_the_field(fields: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        EngineConfig(**fields)


def test_each_node_runs_its_share_of_the_ranks() -> None:
    config = EngineConfig(tensor_parallel_size=2, pipeline_parallel_size=2, nnodes=2, node_rank=1, master_addr="n0")
    assert (config.ranks_per_node, list(config.node_ranks)) == (2, [2, 3])


def test_speculation_under_tp2_x_pp2_equals_tp1(tmp_path: Path) -> None:
    """Drafts travel in the broadcast step (extra query tokens, their logits rows) to every rank and stage: greedy
    tokens with method suffix at TP 2 x PP 2 equal TP 1 without; the second pass drafts from the first."""
    model = str(save_tiny("llama", tmp_path / "llama", num_attention_heads=4, num_key_value_heads=2))
    prompts = draw_prompts(TINY["vocab_size"], count=3)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    fields: dict[str, Any] = {"device": "cpu", "dtype": "float32", "max_model_len": 128, "block_size": 8,
                              "kv_cache_memory_bytes": 1 << 22}  # fmt: skip
    plain = LLM(model, **fields)
    expected = [out.outputs[0].token_ids for out in plain.generate(prompts, params)]
    spec = {"method": "suffix", "num_speculative_tokens": 3, "disable_by_batch_size": None}
    llm = LLM(model, **fields, tensor_parallel_size=2, pipeline_parallel_size=2, speculative_config=spec)
    try:
        for _ in range(2):
            assert [out.outputs[0].token_ids for out in llm.generate(prompts, params)] == expected
        stats = llm.engine.stats().spec_decode
        assert stats is not None and stats.num_accepted_tokens > 0, stats
        llm.engine.block_manager.check_all_free()
    finally:
        llm.engine.runner.shutdown()
