"""Online int8 / fp8 linears (quantized at load, one scale per output channel): the quantizer's error bound, every
compute path against the dequantized weight, and fp8's torch._scaled_mm path where a GPU can run it."""

from __future__ import annotations

import random

import pytest
import torch

from kubellm.runtime.kernels import cpu
from kubellm.runtime.layers.linear import INT4_MAX_ROWS, Linear, MergedLinear
from kubellm.runtime.quantization.online import (
    FP8,
    Fp8Config,
    Int8Config,
    fp8_scaled_mm,
    quantize_per_channel,
    scaled_mm_supported,
)


@pytest.fixture
def gen() -> torch.Generator:
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def test_int8_codes_are_within_half_a_step(gen: torch.Generator) -> None:
    w = torch.randn(24, 96, generator=gen)
    w[3] = 0  # an all-zero row: codes 0, scale 1
    codes, scale = quantize_per_channel(w, torch.int8)
    assert codes.dtype == torch.int8 and scale.shape == (24,)
    assert int(codes.abs().max()) == 127 and torch.equal(codes[3], torch.zeros(96, dtype=torch.int8))
    assert bool(((codes.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all())


def test_fp8_codes_are_within_e4m3_rounding(gen: torch.Generator) -> None:
    w = torch.randn(16, 64, generator=gen)
    codes, scale = quantize_per_channel(w, FP8)
    assert codes.dtype == FP8
    back = codes.float() * scale[:, None]
    # e4m3: 3 mantissa bits, a relative step of 2^-3, so rounding is within 2^-4 of the value (normal range)
    assert bool(((back - w).abs() <= w.abs() / 16 + scale[:, None] * 2**-9).all())


def quantized_layer(
    config: Int8Config | Fp8Config, gen: torch.Generator, dtype: torch.dtype
) -> tuple[Linear, torch.Tensor]:
    layer = MergedLinear(64, {"a": 40, "b": 24}, bias=True, quant=config)
    w = torch.randn(64, 64, generator=gen) * 0.1
    layer.load_shard("a", "weight", w[:40])
    layer.load_shard("b", "weight", w[40:])
    layer.load_shard("a", "bias", torch.randn(40, generator=gen))
    layer.load_shard("b", "bias", torch.randn(24, generator=gen))
    layer.to(dtype)
    layer.process_weights_after_loading()
    return layer, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [Int8Config(), Fp8Config()], ids=["int8", "fp8"])
def test_online_linear_equals_its_dequantized_weight(
    gen: torch.Generator, dtype: torch.dtype, config: Int8Config | Fp8Config
) -> None:
    layer, _ = quantized_layer(config, gen, dtype)
    assert layer.weight is None  # the 8-bit codes are the only copy
    codes, scale = layer.method.codes, layer.method.scale  # type: ignore[attr-defined]
    dequant = codes.float() * scale[:, None]
    bias = layer.bias.float()  # type: ignore[union-attr]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for rows in (1, INT4_MAX_ROWS, INT4_MAX_ROWS + 1, 33):  # the C++ int8 kernel up to 4 rows (float32), then torch
        x = torch.randn(rows, 64, generator=gen).to(dtype)
        torch.testing.assert_close(layer(x).float(), x.float() @ dequant.t() + bias, rtol=tol, atol=tol)


def test_int8_float32_small_batches_use_the_cpu_kernel(gen: torch.Generator) -> None:
    layer, _ = quantized_layer(Int8Config(), gen, torch.float32)
    assert (layer.method.group_scales is not None) == (cpu.load() is not None)  # type: ignore[attr-defined]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_scaled_mm_on_hopper_tracks_the_dequantized_weight() -> None:
    device = torch.device("cuda")
    if not scaled_mm_supported(device):
        pytest.skip("torch._scaled_mm needs compute capability 8.9+")
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(256, 512, device=device, generator=gen) * 0.05
    codes, scale = quantize_per_channel(w, FP8)
    x = torch.randn(37, 512, device=device, generator=gen).to(torch.bfloat16)
    out = fp8_scaled_mm(x, codes, scale)
    ref = x.float() @ (codes.float() * scale[:, None]).t()
    # the activations are rounded to e4m3 too (per token): a relative error of a few percent of the output norm
    assert float((out.float() - ref).norm() / ref.norm()) < 0.05
    layer = Linear(512, 256, quant=Fp8Config()).to(device=device, dtype=torch.bfloat16)
    layer.load_weight("weight", w)
    layer.process_weights_after_loading()
    assert "scaled_mm" in repr(layer)
    torch.testing.assert_close(layer(x), out)
