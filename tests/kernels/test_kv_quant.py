"""The Triton kernels on a quantized KV cache (int8 / float8 e4m3 codes with per-layer scales, kernels/kv_quant.py)
against the torch reference: the write kernel quantizes as the reference does, and the decode and prefill kernels
attend over the codes as the reference dequantizes them. Odd head sizes, block sizes and GQA groups."""

from __future__ import annotations

import pytest
import torch
from kernels.kernel_testing import TOLERANCE, PagedBatch, make_paged_batch, poisoned, rel_error

from kubellm.runtime.kernels import kv_quant, reference
from kubellm.runtime.kernels.kv_cache import write_kv_cache
from kubellm.runtime.kernels.paged_attention import paged_decode_attention
from kubellm.runtime.kernels.prefill_attention import paged_prefill_attention

QUANT_DTYPES = [pytest.param(torch.int8, id="int8"), pytest.param(torch.float8_e4m3fn, id="fp8")]
# randn values: amax about 4, so these scales use most of int8's range and saturate a few values
KV_SCALE = (0.031, 0.023)


def quantized(batch: PagedBatch, cache_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes of the batch's cache, kv_scale) on the batch's device."""
    kv_scale = torch.tensor(KV_SCALE, device=batch.kv_cache.device)
    codes = torch.stack([kv_quant.quantize(batch.kv_cache[i], kv_scale[i], cache_dtype) for i in range(2)])
    return codes, kv_scale


def reference_out(batch: PagedBatch, codes: torch.Tensor, kv_scale: torch.Tensor, scale: float) -> torch.Tensor:
    return reference.paged_attention(
        batch.query.double().cpu(), codes.cpu(), batch.block_tables.cpu(), batch.seq_lens.cpu(),
        batch.query_start_loc.cpu(), scale, kv_scale=kv_scale.cpu(),
    )  # fmt: skip


@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_kv_heads", "head_dim"), [(2, 40), (3, 64)])
def test_write_quantizes_as_the_reference(
    device: torch.device, gen: torch.Generator, cache_dtype: torch.dtype, dtype: torch.dtype, num_kv_heads: int,
    head_dim: int,
) -> None:  # fmt: skip
    num_tokens, num_blocks, block_size = 11, 5, 8
    key = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen) * 2).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1  # not written
    kv_scale = torch.tensor(KV_SCALE)
    ref = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=cache_dtype)
    reference.write_kv_cache(key, value, ref, slots, kv_scale)
    cache = torch.zeros_like(ref).to(device)
    write_kv_cache(key.to(device), value.to(device), cache, slots.to(device), kv_scale.to(device))
    if device.type == "cpu":  # the interpreter does the reference's float32 arithmetic: the same codes
        assert torch.equal(cache.view(torch.uint8), ref.view(torch.uint8))
    # on any device: within one step of the reference (int8: one code; fp8: one spacing of 2^-3 of the value)
    got, want = (kv_quant.dequantize(c.cpu().flatten(1), kv_scale[:, None]) for c in (cache, ref))
    step = kv_scale[:, None] if cache_dtype == torch.int8 else want.abs() * 2**-3 + kv_scale[:, None] * 2**-9
    assert bool(((got - want).abs() <= step * (1 + 1e-5)).all())
    assert int((ref.view(torch.uint8) != 0).sum()) > 0


@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize(
    ("group", "head_dim", "block_size", "dtype"),
    [(1, 24, 8, torch.float32), (4, 40, 16, torch.float32), (3, 64, 32, torch.bfloat16), (8, 32, 16, torch.float16)],
)
def test_decode_reads_codes_as_the_reference(
    device: torch.device, gen: torch.Generator, cache_dtype: torch.dtype, group: int, head_dim: int, block_size: int,
    dtype: torch.dtype,
) -> None:  # fmt: skip
    seq_lens = [1] + [int(n) | 1 for n in torch.randint(2, 70, (2,), generator=gen)]
    batch = make_paged_batch(
        gen, device, seq_lens=seq_lens, q_lens=[1] * 3, num_kv_heads=2, group=group, head_dim=head_dim,
        block_size=block_size, dtype=dtype,
    )  # fmt: skip
    codes, kv_scale = quantized(batch, cache_dtype)
    scale = head_dim**-0.5
    for num_splits in (1, 2):  # one pass, and split-K with the merge
        out = poisoned(tuple(batch.query.shape), dtype, device)
        paged_decode_attention(
            batch.query, codes, batch.block_tables, batch.seq_lens, scale, out=out, num_splits=num_splits,
            kv_scale=kv_scale,
        )  # fmt: skip
        error = rel_error(out, reference_out(batch, codes, kv_scale, scale))
        assert error < TOLERANCE[dtype], f"relative error {error} (seq_lens {seq_lens}, {num_splits} splits)"


@pytest.mark.parametrize("cache_dtype", QUANT_DTYPES)
@pytest.mark.parametrize(
    ("group", "head_dim", "block_size", "dtype"),
    [(1, 24, 8, torch.float32), (4, 40, 16, torch.bfloat16), (2, 64, 32, torch.float32)],
)
def test_prefill_reads_codes_as_the_reference(
    device: torch.device, gen: torch.Generator, cache_dtype: torch.dtype, group: int, head_dim: int, block_size: int,
    dtype: torch.dtype,
) -> None:  # fmt: skip
    # a full prefill, a chunk over a cached prefix, a one-token extend
    seq_lens = [int(torch.randint(5, 40, (1,), generator=gen)), 37, 21]
    q_lens = [seq_lens[0], 13, 1]
    batch = make_paged_batch(
        gen, device, seq_lens=seq_lens, q_lens=q_lens, num_kv_heads=2, group=group, head_dim=head_dim,
        block_size=block_size, dtype=dtype,
    )  # fmt: skip
    codes, kv_scale = quantized(batch, cache_dtype)
    scale = head_dim**-0.5
    out = poisoned(tuple(batch.query.shape), dtype, device)
    paged_prefill_attention(
        batch.query, codes, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale, out=out,
        kv_scale=kv_scale,
    )  # fmt: skip
    error = rel_error(out, reference_out(batch, codes, kv_scale, scale))
    assert error < TOLERANCE[dtype], f"relative error {error} (seq_lens {seq_lens}, q_lens {q_lens})"


def test_kernels_refuse_codes_without_scales(device: torch.device) -> None:
    codes = torch.zeros((2, 1, 16, 1, 32), dtype=torch.int8, device=device)
    query = torch.zeros((1, 1, 32), device=device)
    tables = torch.zeros((1, 1), dtype=torch.int32, device=device)
    lens = torch.ones(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="needs kv_scale"):
        paged_decode_attention(query, codes, tables, lens, 1.0)
    with pytest.raises(ValueError, match="needs kv_scale"):
        write_kv_cache(query, query, codes, torch.zeros(1, dtype=torch.int64, device=device))
