"""The CPU attention backends (batched decodes, per-sequence prefills) equal the reference paged attention: the
C++ one (decodes through the paged kernel) and the torch one (gather + SDPA)."""

from __future__ import annotations

import pytest
import torch

from kubellm.runtime.kernels import cpu
from kubellm.runtime.kernels.cpu_backend import CpuAttentionBackend
from kubellm.runtime.kernels.interface import AttentionBackend, AttentionMetadata
from kubellm.runtime.kernels.reference import paged_attention, write_kv_cache
from kubellm.runtime.kernels.torch_backend import TorchAttentionBackend, TorchAttentionMetadata


def make_batch(
    q_lens: list[int], seq_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator
) -> tuple[AttentionMetadata, list[list[int]]]:
    """Random disjoint block tables; decodes (q_len 1) must come first, as the model runner orders them."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for q_len, seq_len in zip(q_lens, seq_lens, strict=True):
        n = -(-seq_len // block_size)
        table, perm = perm[:n], perm[n:]
        tables.append(table)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(seq_len - q_len, seq_len)]
    width = max(len(t) for t in tables)
    starts = [0]
    for q_len in q_lens:
        starts.append(starts[-1] + q_len)
    md = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        num_decode_tokens=sum(1 for q in q_lens if q == 1),
        seq_lens_cpu=seq_lens,
        query_start_loc_cpu=starts,
    )
    return md, tables


# (q_lens, seq_lens); decodes first. Extends of at most SHORT_EXTEND_MAX tokens run as one-token decodes per row.
BATCHES = {
    # 3 decodes, a full prefill, a chunked prefill over a cached prefix (verifying drafts looks the same): all short
    "short": ([1, 1, 1, 9, 5], [7, 1, 20, 9, 17]),
    # the same beside prefills longer than SHORT_EXTEND_MAX: the short rows in one call, the long ones each on their own
    "mixed": ([1, 1, 4, 23, 3, 18], [7, 30, 12, 23, 40, 50]),
    # decodes and long prefills only: nothing to expand
    "long": ([1, 1, 20], [9, 3, 45]),
}


@pytest.mark.parametrize("batch", sorted(BATCHES))
@pytest.mark.parametrize("kernels", ["cpu-kernels", "torch-ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backends_match_reference(dtype: torch.dtype, kernels: str, batch: str) -> None:
    """Both decode paths: the C++ kernel (reads the cache in place) and, without it, gather + SDPA."""
    backend: AttentionBackend
    if kernels == "torch-ops":
        backend = TorchAttentionBackend()
    else:
        loaded = cpu.load()
        assert loaded is not None
        backend = CpuAttentionBackend(loaded)
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed={seed}")
    gen = torch.Generator().manual_seed(seed)
    block_size, num_blocks, num_kv_heads, num_heads, head_dim = 4, 64, 2, 6, 16
    q_lens, seq_lens = BATCHES[batch]
    md, _ = make_batch(q_lens, seq_lens, block_size, num_blocks, gen)
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    num_tokens = sum(q_lens)
    query = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)

    ref_cache = kv_cache.clone()
    write_kv_cache(key, value, ref_cache, md.slot_mapping)
    ref = paged_attention(query, ref_cache, md.block_tables, md.seq_lens, md.query_start_loc, 0.25)

    built = backend.build_metadata(md)
    assert isinstance(built, TorchAttentionMetadata)
    assert (built.short_rows is not None) == (batch != "long")
    assert (built.short_index is not None) == (batch == "mixed")
    out = backend.forward(query, key, value, kv_cache, built, 0.25)
    assert torch.equal(kv_cache, ref_cache)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_slot_minus_one_is_not_written() -> None:
    gen = torch.Generator().manual_seed(0)
    md, _ = make_batch([2], [2], 4, 4, gen)
    md.slot_mapping[1] = -1
    kv_cache = torch.zeros(2, 4, 4, 1, 8)
    key = torch.ones(2, 1, 8)
    backend = TorchAttentionBackend()
    backend._write_kv_cache(key, key, kv_cache, backend.build_metadata(md))
    assert int((kv_cache != 0).sum()) == 2 * 8  # one token's key and value
