"""Fused RMSNorm (+ residual), rotary embedding and SiLU-and-mul (Triton) against the reference ops."""

from __future__ import annotations

import pytest
import torch
from kernels.kernel_testing import TOLERANCE, rel_error

from kubellm.runtime.kernels import fused, reference

# Elementwise ops round once per output: allow one ulp of the dtype (the interpreter truncates float32 -> bfloat16
# where CUDA rounds to nearest, so bfloat16 can differ by one ulp from the reference)
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _randn(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def _assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "NaN in the output"
    torch.testing.assert_close(out.cpu().float(), ref.cpu().float(), atol=ATOL[dtype], rtol=ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(device: torch.device, gen: torch.Generator, dtype: torch.dtype, with_residual: bool) -> None:
    hidden = int(torch.randint(8, 200, (1,), generator=gen)) | 1  # odd widths: the tile is masked
    x = _randn(gen, (3, 5, hidden), dtype, device)
    weight = _randn(gen, (hidden,), dtype, device)
    residual = _randn(gen, (3, 5, hidden), dtype, device) if with_residual else None
    x_before = x.clone()
    out, new_residual = fused.rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_residual = reference.rms_norm(
        x.cpu(), weight.cpu(), 1e-6, None if residual is None else residual.cpu()
    )
    _assert_close(out, ref_out, dtype)
    _assert_close(new_residual, ref_residual, dtype)
    assert torch.equal(x, x_before), "inputs must not be modified"


def test_rms_norm_on_per_head_views(device: torch.device, gen: torch.Generator) -> None:
    # Qwen3's q_norm: RMSNorm over head_dim of q, a strided view of the fused qkv projection
    qkv = _randn(gen, (7, (4 + 2 + 2) * 16), torch.float32, device)
    q = qkv[:, : 4 * 16].view(7, 4, 16)
    weight = _randn(gen, (16,), torch.float32, device)
    out, _ = fused.rms_norm(q, weight, 1e-6)
    _assert_close(out, reference.rms_norm(q.cpu(), weight.cpu(), 1e-6)[0], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [32, 16])  # 16 of 32: partial rotary, the rest passes through
def test_rotary_embedding(
    device: torch.device, gen: torch.Generator, dtype: torch.dtype, is_neox: bool, rotary_dim: int
) -> None:
    head_size, num_heads, num_kv_heads, num_tokens, max_position = 32, 3, 1, 9, 64
    cos_sin_cache = reference.rope_cos_sin_cache(rotary_dim, max_position, 500.0).to(device)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen).to(device)
    # query and key as strided views of one fused projection: rotated in place, the value part untouched
    qkv = _randn(gen, (num_tokens, (num_heads + 2 * num_kv_heads) * head_size), dtype, device)
    qkv_before = qkv.clone()
    query = qkv[:, : num_heads * head_size]
    key = qkv[:, num_heads * head_size : (num_heads + num_kv_heads) * head_size].view(num_tokens, 1, head_size)
    ref_query, ref_key = query.cpu().clone(), key.cpu().clone()
    reference.rotary_embedding(positions.cpu(), ref_query, ref_key, cos_sin_cache.cpu(), is_neox, head_size=head_size)

    returned = fused.rotary_embedding(positions, query, key, cos_sin_cache, is_neox, head_size=head_size)

    assert returned[0] is query and returned[1] is key
    _assert_close(query, ref_query, dtype)
    _assert_close(key, ref_key, dtype)
    value_start = (num_heads + num_kv_heads) * head_size
    assert torch.equal(qkv[:, value_start:], qkv_before[:, value_start:])
    assert not torch.equal(qkv[:, :value_start], qkv_before[:, :value_start])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(device: torch.device, gen: torch.Generator, dtype: torch.dtype) -> None:
    d = int(torch.randint(3, 150, (1,), generator=gen)) | 1
    x = _randn(gen, (2, 7, 2 * d), dtype, device) * 3
    out = fused.silu_and_mul(x)
    assert out.shape == (2, 7, d)
    _assert_close(out, reference.silu_and_mul(x.cpu()), dtype)


def test_large_rows_use_several_tiles(device: torch.device, gen: torch.Generator) -> None:
    # wider than one 1024-wide tile of silu_and_mul
    x = _randn(gen, (2, 2 * 1500), torch.float32, device)
    assert rel_error(fused.silu_and_mul(x), reference.silu_and_mul(x.cpu())) < TOLERANCE[torch.float32]


def test_empty_inputs(device: torch.device) -> None:
    x = torch.empty((0, 64), device=device)
    out, residual = fused.rms_norm(x, torch.ones(64, device=device), 1e-6, x)
    assert out.shape == residual.shape == (0, 64)
    assert fused.silu_and_mul(x).shape == (0, 32)
    q, k = torch.empty((0, 2, 16), device=device), torch.empty((0, 1, 16), device=device)
    cache = reference.rope_cos_sin_cache(16, 8).to(device)
    fused.rotary_embedding(torch.empty(0, dtype=torch.int64, device=device), q, k, cache)


def test_bad_inputs_name_the_argument(device: torch.device) -> None:
    x = torch.zeros((2, 8), device=device)
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm(x, torch.ones(7, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused.rms_norm(x, torch.ones(8, device=device), 1e-6, torch.zeros((2, 9), device=device))
    with pytest.raises(ValueError, match="even"):
        fused.silu_and_mul(torch.zeros((2, 7), device=device))
    with pytest.raises(ValueError, match="positions"):
        fused.rotary_embedding(torch.zeros(3, dtype=torch.int64, device=device), x, x, torch.zeros((8, 8)))
