"""Helpers shared by the kernel tests (imported as `kernels.kernel_testing`: tests/ is on sys.path)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kubellm.runtime.kernels import reference

HAS_CUDA = torch.cuda.is_available()

# Relative error ||out - ref|| / ||ref|| against a float64 reference (METHOD: float32 far under 1e-3; bf16
# operands between 1e-3 and 1e-2). Float32 attention uses ieee (not tf32) dots, on CUDA as in the interpreter.
TOLERANCE = {
    torch.float32: 1e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 1e-2,
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives NaN (which fails any `<` check)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


def poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel forgets to write shows."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@dataclass
class PagedBatch:
    """A step's attention inputs over a randomly paged cache: blocks scattered, unowned slots NaN."""

    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    q_lens: list[int]
    seq_lens_list: list[int]

    def reference(self, scale: float) -> torch.Tensor:
        return reference.paged_attention(
            self.query.double().cpu(),
            self.kv_cache.double().cpu(),
            self.block_tables.cpu(),
            self.seq_lens.cpu(),
            self.query_start_loc.cpu(),
            scale,
        )


def make_paged_batch(
    gen: torch.Generator,
    device: torch.device,
    *,
    seq_lens: list[int],
    q_lens: list[int],
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
) -> PagedBatch:
    """Random keys/values in every slot a sequence owns; slots past a sequence's end hold NaN (never to be read)."""
    assert len(seq_lens) == len(q_lens) and all(0 <= q <= s for q, s in zip(q_lens, seq_lens, strict=True))
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2  # two blocks nobody owns
    kv_cache = torch.randn((2, num_blocks, block_size, num_kv_heads, head_dim), generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    max_blocks = max(blocks_per_seq, default=0) + 1
    # table entries past a sequence's blocks point at an unowned block: a kernel reading past seq_len reads NaN
    block_tables = torch.full((len(seq_lens), max_blocks), int(perm[-1]), dtype=torch.int32)
    used = 0
    for i, (n, s) in enumerate(zip(blocks_per_seq, seq_lens, strict=True)):
        block_tables[i, :n] = perm[used : used + n]
        used += n
        if n:
            # the tail of the last block is past the sequence's end
            tail = s - (n - 1) * block_size
            kv_cache[:, int(block_tables[i, n - 1]), tail:] = float("nan")
    kv_cache[:, int(perm[-1])] = float("nan")
    num_heads = num_kv_heads * group
    num_tokens = sum(q_lens)
    query = torch.randn((num_tokens, num_heads, head_dim), generator=gen).to(dtype)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    return PagedBatch(
        query=query.to(device),
        kv_cache=kv_cache.to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        q_lens=list(q_lens),
        seq_lens_list=list(seq_lens),
    )
