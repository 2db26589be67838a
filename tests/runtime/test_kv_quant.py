"""The quantized KV cache's numerics on the CPU (kernels/kv_quant.py): dequantize(quantize(x)) within the formats'
error bounds, and both CPU attention backends (the C++ decode kernel reading int8 / float8 codes in place, and the
torch ops) writing and reading a quantized cache as the reference does."""

from __future__ import annotations

import random

import pytest
import torch
from runtime.test_attention import make_batch

from kubellm.runtime.kernels import cpu, kv_quant, reference
from kubellm.runtime.kernels.cpu_backend import CpuAttentionBackend
from kubellm.runtime.kernels.interface import AttentionBackend
from kubellm.runtime.kernels.torch_backend import TorchAttentionBackend

QUANT_DTYPES = [pytest.param(torch.int8, id="int8"), pytest.param(torch.float8_e4m3fn, id="fp8")]


@pytest.fixture
def gen() -> torch.Generator:
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def test_int8_round_trip_is_within_half_a_step_and_saturates(gen: torch.Generator) -> None:
    x = torch.randn(4096, generator=gen) * 3
    scale = torch.tensor(float(x.abs().amax()) / 127)
    codes = kv_quant.quantize(x, scale, torch.int8)
    assert codes.dtype == torch.int8
    error = (kv_quant.dequantize(codes, scale) - x).abs()
    assert float(error.max()) <= float(scale) * (0.5 + 1e-4)  # round to nearest: half a step at most
    # past the range: saturated at +-127 steps, never wrapped around
    big = kv_quant.quantize(torch.tensor([1e6, -1e6, 200 * float(scale)]), scale, torch.int8)
    assert big.tolist() == [127, -127, 127]


def test_fp8_round_trip_keeps_relative_precision_and_saturates(gen: torch.Generator) -> None:
    # e4m3: 3 mantissa bits, so a normal value (|x / scale| >= 2^-6) is off by at most 2^-4 of itself (half of
    # the 2^-3 spacing); below that, subnormals are spaced 2^-9 apart: off by at most 2^-10 * scale
    x = torch.randn(4096, generator=gen) * torch.exp(torch.randn(4096, generator=gen) * 2)
    scale = torch.tensor(float(x.abs().amax()) / 448)
    codes = kv_quant.quantize(x, scale, torch.float8_e4m3fn)
    assert codes.dtype == torch.float8_e4m3fn
    back = kv_quant.dequantize(codes, scale)
    normal = (x / scale).abs() >= 2**-6
    assert bool(((back - x).abs()[normal] <= x.abs()[normal] * 2**-4 * (1 + 1e-5)).all())
    assert bool(((back - x).abs()[~normal] <= float(scale) * 2**-10 * (1 + 1e-5)).all())
    assert kv_quant.dequantize(
        kv_quant.quantize(torch.tensor([1e9, -1e9]), scale, torch.float8_e4m3fn), scale
    ).tolist() == [
        pytest.approx(448 * float(scale)),
        pytest.approx(-448 * float(scale)),
    ]


def test_scales_come_from_each_layers_k_and_v_amax() -> None:
    cache = torch.zeros(2, 3, 4, 2, 8)
    cache[0, 1, 2, 1, 3] = -5.0  # K's amax
    cache[1, 0, 0, 0, 0] = 0.5  # V's
    (int8,) = kv_quant.scales_from_caches([cache], torch.int8)
    assert int8.tolist() == pytest.approx([5.0 * 1.25 / 127, 0.5 * 1.25 / 127])
    (fp8,) = kv_quant.scales_from_caches([cache], torch.float8_e4m3fn)
    assert fp8.tolist() == pytest.approx([5.0 * 2 / 448, 0.5 * 2 / 448])
    (empty,) = kv_quant.scales_from_caches([torch.zeros(2, 1, 1, 1, 1)], torch.int8)
    assert bool((empty > 0).all())  # never a zero scale (1 / scale is taken on write)


def test_the_reference_refuses_a_quantized_cache_without_scales() -> None:
    cache = torch.zeros(2, 1, 4, 1, 8, dtype=torch.int8)
    key = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="needs kv_scale"):
        reference.write_kv_cache(key, key, cache, torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="needs kv_scale"):
        reference.write_kv_cache(key, key, torch.zeros(2, 1, 4, 1, 8), torch.zeros(1, dtype=torch.int64), torch.ones(2))
    with pytest.raises(ValueError, match="float32"):
        reference.write_kv_cache(key, key, cache, torch.zeros(1, dtype=torch.int64), torch.ones(3))


@pytest.mark.parametrize("kernels", ["cpu-kernels", "torch-ops"])
@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_kv_heads", "group", "head_dim", "block_size"), [(2, 3, 16, 4), (1, 4, 40, 8), (3, 1, 24, 16)]
)
def test_cpu_backends_read_a_quantized_cache_as_the_reference(
    gen: torch.Generator,
    kernels: str,
    cache_dtype: torch.dtype,
    dtype: torch.dtype,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
) -> None:
    """Decodes (the C++ kernel, or gather + SDPA), a full prefill and a chunked prefill over a cached prefix, with
    the cache holding codes: the backend writes the same codes as the reference and attends over them as the
    reference dequantizes them (the quantization error is the same on both sides, so float tolerances apply)."""
    backend: AttentionBackend
    if kernels == "torch-ops":
        backend = TorchAttentionBackend()
    else:
        loaded = cpu.load()
        assert loaded is not None, "the CPU kernels did not build"
        backend = CpuAttentionBackend(loaded)
    num_blocks = 64
    q_lens = [1, 1, 1, 9, 5]
    seq_lens = [7, 1, 23, 9, 17]
    md, _ = make_batch(q_lens, seq_lens, block_size, num_blocks, gen)
    num_tokens = sum(q_lens)
    values = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    kv_scale = torch.tensor([0.031, 0.017])  # amax of randn is about 4: int8 codes up to ~130 saturate a few
    kv_cache = torch.stack([kv_quant.quantize(values[i], kv_scale[i], cache_dtype) for i in range(2)])
    query = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen).to(dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)

    ref_cache = kv_cache.clone()
    reference.write_kv_cache(key, value, ref_cache, md.slot_mapping, kv_scale)
    ref = reference.paged_attention(
        query.double(), ref_cache, md.block_tables, md.seq_lens, md.query_start_loc, 0.25, kv_scale=kv_scale
    )
    out = backend.forward(query, key, value, kv_cache, backend.build_metadata(md), 0.25, kv_scale)
    assert torch.equal(kv_cache.view(torch.uint8), ref_cache.view(torch.uint8))  # the same codes, bit for bit
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref.to(dtype), atol=tol, rtol=tol)


def test_the_reference_reads_codes_times_scales() -> None:
    """A one-position context: attention returns its value, so the output is exactly code * v_scale."""
    cache = torch.zeros(2, 1, 4, 1, 8, dtype=torch.int8)
    kv_scale = torch.tensor([0.5, 0.25])
    cache[1, 0, 0, 0] = torch.arange(-4, 4, dtype=torch.int8)
    query = torch.randn(1, 2, 8)
    out = reference.paged_attention(
        query, cache, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([1]), torch.tensor([0, 1]), 1.0,
        kv_scale=kv_scale,
    )  # fmt: skip
    assert out[0, 0].tolist() == [0.25 * v for v in range(-4, 4)]
