"""TritonAttentionBackend: the engine's attention interface on the kernels, for a mixed decode + prefill step."""

from __future__ import annotations

import torch
from kernels.kernel_testing import TOLERANCE, make_paged_batch, rel_error

from kubellm.runtime.kernels import reference
from kubellm.runtime.kernels.backend import TritonAttentionBackend
from kubellm.runtime.kernels.interface import AttentionMetadata
from kubellm.runtime.kernels.torch_backend import TorchAttentionBackend


def test_mixed_step_matches_reference_and_torch_backend(device: torch.device, gen: torch.Generator) -> None:
    def draw(low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=gen))

    # decodes first (q_len 1), then a whole prompt and a chunk after a cached prefix
    decode_lens = [1, draw(2, 50), draw(2, 50) | 1]
    prompt = draw(2, 30) | 1
    prefix, chunk = draw(1, 30), draw(2, 20)
    seq_lens = [*decode_lens, prompt, prefix + chunk]
    q_lens = [1, 1, 1, prompt, chunk]
    num_kv_heads, group, head_dim, block_size = 2, 4, 32, 8
    batch = make_paged_batch(
        gen, device, seq_lens=seq_lens, q_lens=q_lens, num_kv_heads=num_kv_heads, group=group,
        head_dim=head_dim, block_size=block_size, dtype=torch.float32,
    )  # fmt: skip
    # the new tokens' keys/values go to their positions' slots (the last q_len positions of each sequence)
    slots = []
    for i, (s, q) in enumerate(zip(seq_lens, q_lens, strict=True)):
        for pos in range(s - q, s):
            slots.append(int(batch.block_tables[i, pos // block_size]) * block_size + pos % block_size)
    num_tokens = len(slots)
    slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    key = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(device)
    value = torch.randn((num_tokens, num_kv_heads, head_dim), generator=gen).to(device)
    metadata = AttentionMetadata(
        slot_mapping=slot_mapping,
        block_tables=batch.block_tables,
        seq_lens=batch.seq_lens,
        query_start_loc=batch.query_start_loc,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        num_decode_tokens=len(decode_lens),
        seq_lens_cpu=seq_lens,
        query_start_loc_cpu=batch.query_start_loc.tolist(),
    )
    scale = head_dim**-0.5
    expected_cache = batch.kv_cache.double().cpu()
    reference.write_kv_cache(key.double().cpu(), value.double().cpu(), expected_cache, slot_mapping.cpu())
    expected = reference.paged_attention(
        batch.query.double().cpu(), expected_cache, batch.block_tables.cpu(), batch.seq_lens.cpu(),
        batch.query_start_loc.cpu(), scale,
    )  # fmt: skip

    kv_cache = batch.kv_cache.clone()
    triton = TritonAttentionBackend()
    out = triton.forward(batch.query, key, value, kv_cache, triton.build_metadata(metadata), scale)

    assert out.shape == batch.query.shape
    assert rel_error(out, expected) < TOLERANCE[torch.float32]
    assert torch.equal(kv_cache.cpu().double().isnan(), expected_cache.isnan())
    assert torch.equal(kv_cache.cpu().double().nan_to_num(), expected_cache.nan_to_num())

    # the engine's torch backend agrees on the same step (it reads whole blocks, so no NaN in the cache for it)
    clean_cache = batch.kv_cache.nan_to_num(0.0)
    torch_backend = TorchAttentionBackend()
    torch_out = torch_backend.forward(
        batch.query, key, value, clean_cache, torch_backend.build_metadata(metadata), scale
    )
    assert rel_error(out, torch_out) < TOLERANCE[torch.float32]
