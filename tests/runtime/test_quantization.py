"""int4 weight-only linears (CPU): the quantizer, the Linear that holds only the int4 codes, when the engine
turns it on, and that the bundled model computes the same thing through it."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.engine.model_runner import resolve_quantization
from kubellm.runtime.layers.linear import (
    INT4_GROUP_SIZE,
    INT4_MAX_ROWS,
    Linear,
    MergedLinear,
    dequantize_int4,
    pack_weight,
    quantize_int4,
    quantize_int8_groups,
)
from kubellm.runtime.models.loader import LoadedModel
from kubellm.runtime.quantization.cpu_int4 import Int4CpuConfig, Int4CpuMethod
from kubellm.runtime.quantization.dense import DenseMethod
from kubellm.runtime.sampling_params import SamplingParams

CPU = torch.device("cpu")


@pytest.fixture
def gen() -> torch.Generator:
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def q4_1_weight(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A weight the way a GGUF Q4_1 block stores it: per 32 columns, d * q + m with q in 0..15, both ends used."""
    groups = k // 32
    d = torch.rand(n, groups, 1, generator=gen) * 0.01 + 1e-4
    m = torch.randn(n, groups, 1, generator=gen) * 0.05
    q = torch.randint(0, 16, (n, groups, 32), generator=gen)
    q[..., 0], q[..., 1] = 0, 15
    return (d * q + m).reshape(n, k).float()


def test_quantizing_a_q4_1_weight_recovers_it_exactly(gen: torch.Generator) -> None:
    w = q4_1_weight(24, 96, gen)
    codes, scales_and_zeros = quantize_int4(w)
    assert codes.shape == (24, 96) and int(codes.min()) == 0 and int(codes.max()) == 15
    assert scales_and_zeros.shape == (96 // INT4_GROUP_SIZE, 24, 2)
    torch.testing.assert_close(dequantize_int4(codes, scales_and_zeros), w, rtol=0, atol=1e-6)


def test_quantizing_a_q8_0_weight_recovers_it_exactly(gen: torch.Generator) -> None:
    d = torch.rand(12, 3, 1, generator=gen) * 0.01 + 1e-4
    q = torch.randint(-127, 128, (12, 3, 32), generator=gen)
    q[..., 5] = 127  # Q8_0 maps each block's largest magnitude to +-127
    w = (d * q).reshape(12, 96)
    codes, scales = quantize_int8_groups(w)
    assert codes.dtype == torch.int8 and scales.shape == (12, 3)
    assert torch.equal(codes.reshape(12, 3, 32).long(), q)
    torch.testing.assert_close((codes.reshape(12, 3, 32).float() * scales[..., None]).reshape(12, 96), w)
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_int8_groups(torch.zeros(2, 40))


def test_quantization_error_of_a_dense_weight_is_within_half_a_step(gen: torch.Generator) -> None:
    w = torch.randn(16, 64, generator=gen)
    codes, sz = quantize_int4(w)
    step = sz[..., 0].t().repeat_interleave(INT4_GROUP_SIZE, dim=1)  # [N, K]: each column's group scale
    assert bool(((dequantize_int4(codes, sz) - w).abs() <= step / 2 + 1e-6).all())
    # a constant group (zero range) comes back exactly
    flat = torch.full((2, 32), 0.25)
    torch.testing.assert_close(dequantize_int4(*quantize_int4(flat)), flat)


def test_quantize_refuses_columns_that_are_not_whole_groups() -> None:
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_int4(torch.zeros(4, 40))
    layer = Linear(40, 8, quant=Int4CpuConfig())
    layer.load_weight("weight", torch.randn(8, 40))
    layer.process_weights_after_loading()  # not whole groups: the layer stays dense
    assert layer.weight is not None and "int4" not in repr(layer)
    x = torch.randn(3, 40)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_holds_only_the_int4_codes_and_serves_every_batch_size(
    gen: torch.Generator, dtype: torch.dtype
) -> None:
    layer = MergedLinear(64, {"a": 48, "b": 16}, bias=True, quant=Int4CpuConfig())
    layer.to(dtype)  # as a model is built: in its dtype before loading (each layer is quantized once complete)
    w = q4_1_weight(64, 64, gen)
    layer.load_shard("a", "weight", w[:48])
    layer.load_shard("b", "weight", w[48:])
    layer.load_shard("a", "bias", torch.randn(48, generator=gen))
    layer.load_shard("b", "bias", torch.randn(16, generator=gen))
    assert layer.missing() == []
    layer.process_weights_after_loading()
    assert "int4" in repr(layer)
    assert layer.weight is None  # the weight is held once: as int4 codes
    assert layer.pack() is False and "packed" not in repr(layer)
    bias = layer.bias.float()  # type: ignore[union-attr]
    for rows in (1, 3, INT4_MAX_ROWS, INT4_MAX_ROWS + 1, 37):
        x = torch.randn(rows, 64, generator=gen).to(dtype)
        expected = x.float() @ w.t() + bias  # the int4 copy holds w's own codes
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(layer(x).float(), expected, rtol=tol, atol=tol)


def test_resolve_quantization() -> None:
    assert resolve_quantization("auto", CPU, frozenset({"Q4_1"}), int4_fast=True) == "int4"
    assert resolve_quantization("auto", CPU, frozenset({"Q4_0", "Q4_1"}), int4_fast=True) == "int4"
    # an AVX2-only CPU: torch's int4 kernel is slower than float32 there
    assert resolve_quantization("auto", CPU, frozenset({"Q4_1"}), int4_fast=False) == "none"
    assert resolve_quantization("auto", CPU, frozenset({"Q4_1", "Q8_0"})) == "none"  # some layers 8-bit: keep them
    assert resolve_quantization("auto", CPU, frozenset()) == "none"  # safetensors, dummy: unknown
    assert resolve_quantization("auto", torch.device("cuda"), frozenset({"Q4_1"})) == "none"
    assert resolve_quantization("int4", CPU, frozenset()) == "int4"
    assert resolve_quantization("none", CPU, frozenset({"Q4_1"})) == "none"
    with pytest.raises(ValueError, match="CPU path"):
        resolve_quantization("int4", torch.device("cuda"), frozenset())
    choices = "auto, none, int4, awq, gptq, compressed-tensors, int8, fp8"
    with pytest.raises(ValueError, match=rf"^quantization must be one of {choices}, got 'q3'"):
        EngineConfig(quantization="q3")


def test_the_bundled_model_computes_the_same_through_int4(smollm2: LoadedModel) -> None:
    """SmolLM2's layers are Q4_1 in the file and its tied head Q8_0: the int4 layers and the int8 head run the
    file's own codes, so float32 logprobs agree with the dense path to rounding."""
    state = list(smollm2.weights or [])
    results = {}
    for quantization in ("none", "int4"):
        loaded = LoadedModel(smollm2.name, smollm2.config, iter(state), smollm2.tokenizer)
        config = EngineConfig(
            model=loaded.name, dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20, quantization=quantization
        )
        engine = LLMEngine(config, loaded=loaded)
        assert engine.quantization == quantization
        linears = [m for m in engine.model.modules() if isinstance(m, Linear)]
        assert len(linears) == 4 * smollm2.config.num_hidden_layers
        int4 = [isinstance(m.method, Int4CpuMethod) and m.method.int4_weight is not None for m in linears]
        assert all(q == (quantization == "int4") for q in int4)
        assert (engine.model.int8_head is not None) == (quantization == "int4")  # the head in Q8_0's layout
        engine.add_request("r", "The capital of France is", SamplingParams(max_tokens=4, temperature=0, logprobs=5))
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
        engine.block_manager.check_all_free()
        results[quantization] = [lp for out in outputs for c in out.outputs for lp in (c.logprobs or [])]
    dense, int4 = results["none"], results["int4"]
    assert len(dense) == len(int4) == 4
    for a, b in zip(dense, int4, strict=True):
        assert a.token_id == b.token_id
        assert abs(a.logprob - b.logprob) < 0.02, (a, b)
        top_a, top_b = dict(a.top), dict(b.top)
        assert set(top_a) == set(top_b)  # the same top-5 tokens at every step
        for token_id, logprob in top_a.items():
            assert abs(logprob - top_b[token_id]) < 0.02, (token_id, logprob, top_b[token_id])


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN takes a weight of this dtype on this CPU (bf16 needs avx512_bf16/amx; an avx2-only CPU has
    neither, and then the plain path must serve)."""
    return pack_weight(torch.zeros(16, 16, dtype=dtype)) is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_the_plain_one(gen: torch.Generator, dtype: torch.dtype) -> None:
    layer = Linear(64, 48, bias=True)
    layer.load_weight("weight", torch.randn(48, 64, generator=gen))
    layer.load_weight("bias", torch.randn(48, generator=gen))
    layer.to(dtype)
    x = torch.randn(37, 64, generator=gen).to(dtype)
    plain = layer(x)
    packs = onednn_packs(dtype)
    print(f"oneDNN packs {dtype} on this CPU: {packs}")
    assert layer.pack() is packs and ("packed" in repr(layer)) is packs
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(layer(x), plain, rtol=tol, atol=tol)
    # packed, the plain weight is gone (held once); unpacked, it serves unchanged
    assert (layer.weight is None) is packs


def test_the_engine_packs_and_quantizes_on_the_cpu(smollm2: LoadedModel) -> None:
    loaded = LoadedModel(smollm2.name, smollm2.config, smollm2.weights, smollm2.tokenizer)
    config = EngineConfig(
        model=loaded.name, dtype="bfloat16", device="cpu", kv_cache_memory_bytes=16 << 20, quantization="int4"
    )
    model = LLMEngine(config, loaded=loaded).model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    packs = onednn_packs(torch.bfloat16)
    # the int4 codes are each linear's only copy of its weight: no packed dense copy beside them
    assert all(isinstance(m.method, Int4CpuMethod) and m.method.int4_weight is not None for m in linears)
    assert all(m.weight is None and "packed" not in repr(m) for m in linears)
    assert (model.packed_head is not None) is packs


def test_the_engine_packs_dense_linears_on_the_cpu_and_drops_the_plain_weight(smollm2: LoadedModel) -> None:
    loaded = LoadedModel(smollm2.name, smollm2.config, smollm2.weights, smollm2.tokenizer)
    config = EngineConfig(model=loaded.name, dtype="float32", device="cpu", kv_cache_memory_bytes=16 << 20)
    model = LLMEngine(config, loaded=loaded).model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    packs = onednn_packs(torch.float32)
    assert all(isinstance(m.method, DenseMethod) for m in linears)
    assert all((m.weight is None) is packs and ("packed" in repr(m)) is packs for m in linears)
