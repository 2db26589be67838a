"""write_kv_cache (Triton) against the reference scatter: exact, -1 slots skipped, strided inputs, empty batches."""

from __future__ import annotations

import pytest
import torch

from kubellm.runtime.kernels import reference
from kubellm.runtime.kernels.kv_cache import write_kv_cache


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_matches_reference(
    device: torch.device, gen: torch.Generator, block_size: int, dtype: torch.dtype
) -> None:
    num_kv_heads, head_dim, num_blocks = 3, 24, 5
    num_slots = num_blocks * block_size
    num_tokens = int(torch.randint(1, num_slots // 2, (1,), generator=gen)) | 1  # odd
    slot_mapping = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slot_mapping[torch.rand(num_tokens, generator=gen) < 0.3] = -1  # padding tokens: not written
    # key and value as strided views of one fused projection output: [T, (Hq + 2 * Hkv) * D]
    qkv = torch.randn((num_tokens, (4 + 2 * num_kv_heads) * head_dim), generator=gen).to(dtype)
    key = qkv[:, 4 * head_dim : (4 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, (4 + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    kv_cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    expected = kv_cache.clone()
    reference.write_kv_cache(key, value, expected, slot_mapping)

    kv_cache = kv_cache.to(device)
    write_kv_cache(key.to(device), value.to(device), kv_cache, slot_mapping.to(device))

    # NaN stays exactly where nothing was to be written; every written element equals the reference
    assert torch.equal(kv_cache.cpu().isnan(), expected.isnan())
    assert torch.equal(kv_cache.cpu().nan_to_num(), expected.nan_to_num())
    written = int((slot_mapping >= 0).sum())
    assert int((~expected.isnan()).sum()) == written * 2 * num_kv_heads * head_dim


def test_write_casts_to_cache_dtype(device: torch.device, gen: torch.Generator) -> None:
    key = torch.randn((5, 2, 16), generator=gen)
    value = torch.randn((5, 2, 16), generator=gen)
    kv_cache = torch.full((2, 2, 4, 2, 16), float("nan"), dtype=torch.float16, device=device)
    slot_mapping = torch.tensor([7, 0, 3, -1, 4])
    write_kv_cache(key.to(device), value.to(device), kv_cache, slot_mapping.to(device))
    expected = torch.full((2, 2, 4, 2, 16), float("nan"), dtype=torch.float16)
    reference.write_kv_cache(key, value, expected, slot_mapping)
    assert torch.equal(kv_cache.cpu().nan_to_num(), expected.nan_to_num())


def test_empty_batch_is_a_no_op(device: torch.device) -> None:
    kv_cache = torch.full((2, 2, 8, 1, 16), float("nan"), device=device)
    empty = torch.empty((0, 1, 16), device=device)
    write_kv_cache(empty, empty, kv_cache, torch.empty(0, dtype=torch.int64, device=device))
    assert kv_cache.isnan().all()


def test_bad_shapes_name_the_argument(device: torch.device) -> None:
    kv_cache = torch.zeros((2, 2, 8, 2, 16), device=device)
    key = torch.zeros((3, 2, 16), device=device)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_cache(key, key, kv_cache, torch.zeros(4, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="key and value"):
        write_kv_cache(torch.zeros((3, 1, 16), device=device), key, kv_cache, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="kv_cache"):
        write_kv_cache(key, key, kv_cache[0], torch.zeros(3, dtype=torch.int64, device=device))
