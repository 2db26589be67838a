"""Split-K paged decode attention (Triton) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from kernels.kernel_testing import TOLERANCE, PagedBatch, make_paged_batch, poisoned, rel_error

from kubellm.runtime.kernels.paged_attention import choose_num_splits, paged_decode_attention, splits_for


def _random_seq_lens(gen: torch.Generator, num_seqs: int, max_len: int) -> list[int]:
    lens = [int(n) | 1 for n in torch.randint(1, max_len, (num_seqs,), generator=gen)]  # odd lengths
    lens[0] = 1  # a sequence whose only context is its new token
    return lens


def _check_decode(batch: PagedBatch, *, num_splits: int | None, dtype: torch.dtype) -> None:
    scale = batch.query.shape[-1] ** -0.5
    out = poisoned(tuple(batch.query.shape), dtype, batch.query.device)
    result = paged_decode_attention(
        batch.query, batch.kv_cache, batch.block_tables, batch.seq_lens, scale, out=out, num_splits=num_splits
    )
    assert result is out
    error = rel_error(out, batch.reference(scale))
    assert error < TOLERANCE[dtype], f"relative error {error} (seq_lens {batch.seq_lens_list})"


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_matches_reference(
    device: torch.device,
    gen: torch.Generator,
    group: int,
    block_size: int,
) -> None:
    seq_lens = _random_seq_lens(gen, 3, 70)
    batch = make_paged_batch(
        gen, device, seq_lens=seq_lens, q_lens=[1] * len(seq_lens), num_kv_heads=2, group=group,
        head_dim=32, block_size=block_size, dtype=torch.float32,
    )  # fmt: skip
    _check_decode(batch, num_splits=None, dtype=torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_counts(device: torch.device, gen: torch.Generator, num_splits: int) -> None:
    # 8 splits of a 40-position context leave some splits empty: the merge must weigh them 0, not NaN
    seq_lens = [1, 40, int(torch.randint(17, 60, (1,), generator=gen)) | 1]
    batch = make_paged_batch(
        gen, device, seq_lens=seq_lens, q_lens=[1, 1, 1], num_kv_heads=1, group=4, head_dim=24,
        block_size=16, dtype=torch.float32,
    )  # fmt: skip
    _check_decode(batch, num_splits=num_splits, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_precision(device: torch.device, gen: torch.Generator, dtype: torch.dtype) -> None:
    seq_lens = _random_seq_lens(gen, 2, 60)
    batch = make_paged_batch(
        gen, device, seq_lens=seq_lens, q_lens=[1, 1], num_kv_heads=3, group=3, head_dim=64,
        block_size=16, dtype=dtype,
    )  # fmt: skip
    _check_decode(batch, num_splits=None, dtype=dtype)


def test_decode_no_sequences(device: torch.device) -> None:
    kv_cache = torch.zeros((2, 1, 16, 2, 32), device=device)
    query = torch.empty((0, 4, 32), device=device)
    out = paged_decode_attention(
        query, kv_cache, torch.empty((0, 1), dtype=torch.int32, device=device),
        torch.empty(0, dtype=torch.int32, device=device), 0.1,
    )  # fmt: skip
    assert out.shape == (0, 4, 32)


def test_decode_rejects_bad_shapes(device: torch.device) -> None:
    kv_cache = torch.zeros((2, 1, 16, 2, 32), device=device)
    block_tables = torch.zeros((1, 1), dtype=torch.int32, device=device)
    seq_lens = torch.ones(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(torch.zeros((1, 3, 32), device=device), kv_cache, block_tables, seq_lens, 0.1)
    with pytest.raises(ValueError, match="query"):
        paged_decode_attention(torch.zeros((1, 4, 16), device=device), kv_cache, block_tables, seq_lens, 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(torch.zeros((2, 4, 32), device=device), kv_cache, block_tables, seq_lens, 0.1)


def test_splits_fill_the_device_and_keep_splits_long() -> None:
    # 132 SMs (H100 SXM): 64 sequences x 8 KV heads already give 512 programs, about 4 per SM
    assert splits_for(num_programs=64 * 8, max_seq_len=4096, sms=132) == 2
    # one long sequence: split until the SMs are busy, capped so each split keeps >= 256 positions
    assert splits_for(num_programs=8, max_seq_len=4096, sms=132) == 16
    assert splits_for(num_programs=8, max_seq_len=600, sms=132) == 2
    assert splits_for(num_programs=8, max_seq_len=100, sms=132) == 1
    assert splits_for(num_programs=1, max_seq_len=1 << 20, sms=132) == 32
    # a power of two, at least 1, for any input
    for programs in (1, 7, 100, 10_000):
        for length in (1, 255, 257, 5000):
            splits = splits_for(num_programs=programs, max_seq_len=length, sms=108)
            assert splits >= 1 and splits & (splits - 1) == 0
    assert choose_num_splits(4, 2, 100, torch.device("cpu")) == 2
    assert choose_num_splits(4, 2, 16, torch.device("cpu")) == 1
