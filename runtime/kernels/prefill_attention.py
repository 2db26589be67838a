"""Paged prefill / extend attention: variable numbers of new tokens per sequence over their paged context.

Spec: kubellm.runtime.kernels.reference.paged_attention (any q_len, including 1). The new tokens of a sequence
are its last q_len positions: they see the whole cached prefix (prefix-cache hits, earlier chunks of a chunked
prefill) and each other causally. Their own keys and values are already in the cache.

Work split::

    grid = (num_seqs, cdiv(max_query_len, TOKENS_PER_TILE), num_kv_heads)
    program (seq, tile, kv_head): a BLOCK_M-row query tile packing TOKENS_PER_TILE tokens x GROUP query heads,
        row r = token (r // GROUP), head kv_head * GROUP + r % GROUP: the group's heads share every K/V tile (GQA)
        for each BLOCK_N tile of context positions up to the tile's last query position:
            K, V gathered through the block table; causal mask; online softmax in float32
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import check_launchable, dot_in_float32, dot_precision, next_power_of_2
from .kv_quant import quant_mode

__all__ = ["paged_prefill_attention"]

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    cache_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    kv_scale_ptr,  # [2] float32 (k_scale, v_scale) when QUANT, else unused
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    out_ptr,  # [num_tokens, num_heads, head_dim]
    scale_log2,  # softmax scale * log2(e): the kernel works with exp2
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt,
    block_size,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TOKENS_PER_TILE: tl.constexpr,  # BLOCK_M // GROUP
    BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,  # the interpreter's tl.dot multiplies bfloat16's raw bits: upcast there
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 operands (exact, not tf32), else "tf32" (unused)
    QUANT: tl.constexpr,  # the cache holds int8 / float8 codes: k_scale folds into the scores, v_scale the output
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    seq64 = seq.to(tl.int64)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix_len = seq_len - q_len  # cached positions before the new tokens

    first_token = tile * TOKENS_PER_TILE
    offs_m = tl.arange(0, BLOCK_M)
    token = first_token + offs_m // GROUP  # new-token index within the sequence, per row
    heads = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < TOKENS_PER_TILE * GROUP) & (token < q_len)
    q_pos = prefix_len + token  # [BLOCK_M] context position of each row's token
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_d = offs_d < HEAD_DIM
    mask_md = row_valid[:, None] & mask_d[None, :]
    q_rows = (q_start + token).to(tl.int64) * stride_qt + heads * stride_qh  # [BLOCK_M]
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=mask_md, other=0.0)  # [BLOCK_M, HEAD_DIM_PAD]
    if QUANT:
        scale_log2 = scale_log2 * tl.load(kv_scale_ptr)  # q . (s_k k) = s_k (q . k)
    if DOT_F32:
        q = q.to(tl.float32)

    # keys this tile can see: positions 0 .. its last token's position (none when the tile is past q_len)
    last_token = tl.minimum(first_token + TOKENS_PER_TILE, q_len) - 1
    kv_end = tl.where(first_token < q_len, prefix_len + last_token + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for tile_start in range(0, kv_end, BLOCK_N):
        pos = tile_start + offs_n
        mask_n = pos < kv_end
        block = tl.load(block_tables_ptr + seq64 * stride_bt + pos // block_size, mask=mask_n, other=0).to(tl.int64)
        kv_off = block * stride_c_block + (pos % block_size) * stride_c_slot + kv_head * stride_c_head
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(cache_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_nd, other=0.0)  # [BLOCK_N, HEAD_DIM_PAD]
        s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        # causal: a row sees positions up to its own; padded rows (q_pos past the end) see all loaded ones, which
        # keeps their softmax finite (they are never stored)
        s = tl.where((pos[None, :] <= q_pos[:, None]) & mask_n[None, :], s, float("-inf"))
        # finite for valid rows: position 0 (first tile) is visible to every token
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(cache_ptr + stride_c_kv + kv_off[:, None] + offs_d[None, :], mask=mask_nd, other=0.0)
        if QUANT:  # codes widened as they are: v_scale is applied to the output
            v = v.to(tl.float32) if DOT_F32 else v.to(q_ptr.dtype.element_ty)
        if DOT_F32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if QUANT:
        out = out * tl.load(kv_scale_ptr + 1)  # sum p (s_v v) = s_v sum p v
    out_rows = (q_start + token).to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(out_ptr + out_rows[:, None] + offs_d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask_md)


def paged_prefill_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_query_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of reference.paged_attention (same arguments, same result), for any mix of q_len.

    max_query_len (a host int, to avoid a device sync) sizes the grid; block_m / block_n are the query-row and
    context tiles (defaults 64 / 64 on CUDA, 32 / 32 for float32 there, 16 / 16 on the
    interpreter). block_m must be >= num_heads/num_kv_heads.
    """
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache must have shape [2, num_blocks, block_size, num_kv_heads, head_dim], got {tuple(kv_cache.shape)}"
        )
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    if query.dim() != 3 or query.shape[2] != head_dim:
        raise ValueError(f"query must have shape [num_tokens, num_heads, {head_dim}], got {tuple(query.shape)}")
    num_tokens, num_heads, _ = query.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    num_seqs = seq_lens.shape[0]
    if seq_lens.dim() != 1 or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(
            f"seq_lens must be [num_seqs] and query_start_loc [num_seqs + 1], got {tuple(seq_lens.shape)} and "
            f"{tuple(query_start_loc.shape)}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must have shape [{num_seqs}, max_blocks_per_seq], got {tuple(block_tables.shape)}"
        )
    if query.stride(2) != 1 or kv_cache.stride(4) != 1 or block_tables.stride(1) != 1:
        raise ValueError("head_dim must be contiguous in query and kv_cache, and block_tables rows contiguous")
    quant = quant_mode(kv_cache, kv_scale)
    scales = kv_scale if kv_scale is not None else seq_lens  # read by the kernel only when QUANT
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape or out.stride(2) != 1:
        raise ValueError(f"out must have query's shape {tuple(query.shape)} with head_dim contiguous")
    if num_seqs == 0 or num_tokens == 0:
        return out
    check_launchable(_prefill_attention_kernel, query, kv_cache, scales, block_tables, seq_lens, query_start_loc, out)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    if max_query_len == 0:
        return out
    group = num_heads // num_kv_heads
    # CUDA: 64 x 64 tiles on the tensor cores; float32 takes exact (non-tf32) dots on CUDA cores, where a 64 x 64
    # tile spills registers, so 32 x 32. The interpreter: 16 x 16, to cross tile boundaries in small tests.
    exact = torch.float32 in (query.dtype, kv_cache.dtype)
    tile = (32 if exact else 64) if query.device.type == "cuda" else 16
    if block_m is None:
        block_m = max(tile, next_power_of_2(group))
    if block_n is None:
        block_n = tile
    if block_m < group or block_m < 16 or block_n < 16:
        raise ValueError(f"block_m must be >= 16 and >= the GQA group ({group}), block_n >= 16")
    tokens_per_tile = block_m // group
    grid = (num_seqs, triton.cdiv(max_query_len, tokens_per_tile), num_kv_heads)
    _prefill_attention_kernel[grid](
        query,
        kv_cache,
        scales,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        scale * _LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_tables.stride(0),
        block_size,
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(next_power_of_2(head_dim), 16),
        BLOCK_M=block_m,
        TOKENS_PER_TILE=tokens_per_tile,
        BLOCK_N=block_n,
        DOT_F32=dot_in_float32(query.device, query.dtype, kv_cache.dtype),
        DOT_PRECISION=dot_precision(query.dtype, kv_cache.dtype),
        QUANT=quant,
        num_warps=8 if exact else 4,  # 4 warps spill registers on float32 FMA dots (tests/kernels/aot_compile.py)
        num_stages=2,
    )
    return out
