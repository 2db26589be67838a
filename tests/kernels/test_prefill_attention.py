"""Paged prefill / extend attention (Triton) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from kernels.kernel_testing import TOLERANCE, PagedBatch, make_paged_batch, poisoned, rel_error

from kubellm.runtime.kernels.prefill_attention import paged_prefill_attention


def _random_mix(gen: torch.Generator, max_len: int) -> tuple[list[int], list[int]]:
    """seq_lens and q_lens covering every kind of sequence a step can hold."""

    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=gen))

    full = draw(2, max_len) | 1  # whole prompt, odd length
    prefix, chunk = draw(1, max_len), draw(2, max_len // 2)  # cached prefix + new chunk (prefix hit / chunked)
    decode_ctx = draw(2, max_len)  # one new token after a context
    idle = draw(1, max_len)  # a sequence with no new tokens this step
    seq_lens = [1, full, prefix + chunk, decode_ctx, idle]
    q_lens = [1, full, chunk, 1, 0]
    return seq_lens, q_lens


def _check_prefill(batch: PagedBatch, dtype: torch.dtype, **tiles: int) -> None:
    scale = batch.query.shape[-1] ** -0.5
    out = poisoned(tuple(batch.query.shape), dtype, batch.query.device)
    result = paged_prefill_attention(
        batch.query, batch.kv_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale, out=out, **tiles
    )
    assert result is out
    error = rel_error(out, batch.reference(scale))
    assert error < TOLERANCE[dtype], f"relative error {error} (seq_lens {batch.seq_lens_list}, q_lens {batch.q_lens})"


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_prefill_matches_reference(device: torch.device, gen: torch.Generator, group: int, block_size: int) -> None:
    seq_lens, q_lens = _random_mix(gen, 40)
    batch = make_paged_batch(
        gen, device, seq_lens=seq_lens, q_lens=q_lens, num_kv_heads=2, group=group, head_dim=32,
        block_size=block_size, dtype=torch.float32,
    )  # fmt: skip
    # group 8 packs only 2 tokens per 16-row tile, so the tiles of one sequence span many programs
    _check_prefill(batch, torch.float32, block_m=16 if group < 8 else 32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_half_precision_and_odd_head_dim(
    device: torch.device, gen: torch.Generator, dtype: torch.dtype
) -> None:
    # GQA group 3 (SmolLM2: 9 query heads over 3 KV heads) does not divide the 16-row tile; head_dim 40 is padded
    seq_lens, q_lens = _random_mix(gen, 30)
    batch = make_paged_batch(
        gen, device, seq_lens=seq_lens, q_lens=q_lens, num_kv_heads=1, group=3, head_dim=40,
        block_size=16, dtype=dtype,
    )  # fmt: skip
    _check_prefill(batch, dtype)


def test_prefill_wide_tiles(device: torch.device, gen: torch.Generator) -> None:
    # the CUDA default tiles (64 x 64) on the interpreter too: a whole short prompt in one tile
    seq_lens, q_lens = _random_mix(gen, 50)
    batch = make_paged_batch(
        gen, device, seq_lens=seq_lens, q_lens=q_lens, num_kv_heads=1, group=4, head_dim=16,
        block_size=8, dtype=torch.float32,
    )  # fmt: skip
    _check_prefill(batch, torch.float32, block_m=64, block_n=64)


def test_prefill_nothing_to_do(device: torch.device) -> None:
    kv_cache = torch.zeros((2, 2, 8, 1, 16), device=device)
    # zero sequences
    out = paged_prefill_attention(
        torch.empty((0, 2, 16), device=device), kv_cache, torch.empty((0, 1), dtype=torch.int32, device=device),
        torch.empty(0, dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32, device=device), 0.25,
    )  # fmt: skip
    assert out.shape == (0, 2, 16)
    # sequences with no new tokens
    out = paged_prefill_attention(
        torch.empty((0, 2, 16), device=device), kv_cache, torch.zeros((2, 1), dtype=torch.int32, device=device),
        torch.tensor([3, 5], dtype=torch.int32, device=device), torch.zeros(3, dtype=torch.int32, device=device), 0.25,
    )  # fmt: skip
    assert out.shape == (0, 2, 16)


def test_prefill_rejects_bad_shapes(device: torch.device) -> None:
    kv_cache = torch.zeros((2, 2, 8, 2, 16), device=device)
    query = torch.zeros((3, 4, 16), device=device)
    block_tables = torch.zeros((1, 2), dtype=torch.int32, device=device)
    seq_lens = torch.tensor([3], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill_attention(query, kv_cache, block_tables, seq_lens, torch.zeros(3, dtype=torch.int32), 0.25)
    with pytest.raises(ValueError, match="block_m"):
        qsl = torch.tensor([0, 3], dtype=torch.int32, device=device)
        query = torch.zeros((3, 64, 16), device=device)  # GQA group 32 does not fit a 16-row tile
        paged_prefill_attention(query, kv_cache, block_tables, seq_lens, qsl, 0.25, block_m=16)
