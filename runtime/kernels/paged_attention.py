"""Paged decode attention: one new token per sequence against its whole cached context (flash-decoding).

Spec: kubellm.runtime.kernels.reference.paged_attention with every q_len == 1.

Work split::

    grid = (num_seqs, num_kv_heads, num_splits)
    program (seq, kv_head, split):
        Q  = the group's query heads  [GROUP_PAD, head_dim]  (GQA: they share every K/V tile loaded)
        for each tile of BLOCK_N context positions in [split_start, split_end):
            K, V tiles gathered through the block table        [BLOCK_N, head_dim]
            online softmax (running max m, running sum l, accumulator acc), float32
        num_splits == 1: out = acc / l
        otherwise:        partial out = acc / l and lse = m + log2(l) per split, merged by the second kernel

A few long sequences give only num_seqs * num_kv_heads programs, too few to fill the GPU; splitting the context
(split-K) multiplies the programs, and the merge weighs each split's partial output by exp(lse - max lse).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import check_launchable, dot_in_float32, dot_precision, next_power_of_2, num_sms
from .kv_quant import quant_mode

__all__ = ["choose_num_splits", "paged_decode_attention", "splits_for"]

_LOG2E = 1.4426950408889634
# Each split should stream at least this many context positions: below it the merge costs more than it saves.
_MIN_TOKENS_PER_SPLIT = 256
_MAX_SPLITS = 32


@triton.jit
def _decode_attention_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    cache_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    kv_scale_ptr,  # [2] float32 (k_scale, v_scale) when QUANT, else unused
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_heads, head_dim], written when NUM_SPLITS == 1
    part_out_ptr,  # [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM] float32, written when NUM_SPLITS > 1
    part_lse_ptr,  # [num_seqs, num_heads, NUM_SPLITS] float32 (log2 units)
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
    num_heads,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_F32: tl.constexpr,  # the interpreter's tl.dot multiplies bfloat16's raw bits: upcast there
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 operands (exact, not tf32), else "tf32" (unused)
    QUANT: tl.constexpr,  # the cache holds int8 / float8 codes: k_scale folds into the scores, v_scale the output
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq64 = seq.to(tl.int64)

    seq_len = tl.load(seq_lens_ptr + seq)
    # this split's context range, a whole number of tiles long
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g  # the query heads reading this KV head
    mask_gd = (offs_g[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
    # q: [GROUP_PAD, HEAD_DIM_PAD]
    q = tl.load(q_ptr + seq64 * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_gd, other=0.0)
    if QUANT:
        scale_log2 = scale_log2 * tl.load(kv_scale_ptr)  # q . (s_k k) = s_k (q . k)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + offs_n  # context positions of this tile
        mask_n = pos < end
        block = tl.load(block_tables_ptr + seq64 * stride_bt + pos // block_size, mask=mask_n, other=0).to(tl.int64)
        # kv_off: [BLOCK_N] offset of each position's (block, slot, kv_head) row in the cache
        kv_off = block * stride_c_block + (pos % block_size) * stride_c_slot + kv_head * stride_c_head
        mask_nd = mask_n[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(cache_ptr + kv_off[:, None] + offs_d[None, :], mask=mask_nd, other=0.0)  # [BLOCK_N, HEAD_DIM_PAD]
        s = tl.dot(q, tl.trans(k).to(q.dtype), input_precision=DOT_PRECISION) * scale_log2  # [GROUP_PAD, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one position < end
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

    # an empty split (or an empty sequence) has l_i == 0: its output is 0 and its lse -inf (weight 0 in the merge)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if QUANT:
        out = out * tl.load(kv_scale_ptr + 1)  # sum p (s_v v) = s_v sum p v
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + seq64 * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_gd,
        )
    else:
        row = (seq64 * num_heads + heads) * NUM_SPLITS + split  # [GROUP_PAD] index into part_lse
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_gd)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=offs_g < GROUP)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr,  # [num_seqs, num_heads, NUM_SPLITS, HEAD_DIM] float32
    part_lse_ptr,  # [num_seqs, num_heads, NUM_SPLITS] float32 (log2 units)
    out_ptr,  # [num_seqs, num_heads, head_dim]
    stride_ot,
    stride_oh,
    num_heads,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row = (seq * num_heads + head) * NUM_SPLITS + offs_s  # [SPLITS_PAD]
    lse = tl.load(part_lse_ptr + row, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # empty sequence: every weight is 0
    weight = tl.exp2(lse - lse_max)  # [SPLITS_PAD]
    total = tl.sum(weight, 0)
    mask_sd = (offs_s[:, None] < NUM_SPLITS) & (offs_d[None, :] < HEAD_DIM)
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=mask_sd, other=0.0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)  # [HEAD_DIM_PAD]
    tl.store(
        out_ptr + seq * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM
    )


def splits_for(*, num_programs: int, max_seq_len: int, sms: int) -> int:
    """Context splits for num_programs (sequences x KV heads) on sms SMs: about four programs per SM, each split
    at least 256 positions long, at most 32; rounded down to a power of two (each value is a compiled kernel)."""
    wanted = triton.cdiv(4 * sms, max(num_programs, 1))
    affordable = max(max_seq_len // _MIN_TOKENS_PER_SPLIT, 1)
    splits = max(min(wanted, affordable, _MAX_SPLITS), 1)
    return 1 << (splits.bit_length() - 1)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """splits_for on this device; on the CPU interpreter a fixed 2 for contexts longer than one 16-position tile,
    so that the merge path runs there too."""
    if device.type != "cuda":
        return 2 if max_seq_len > 16 else 1
    return splits_for(num_programs=num_seqs * num_kv_heads, max_seq_len=max_seq_len, sms=num_sms(device))


def paged_decode_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: query [num_seqs, num_heads, head_dim], one new token per sequence, whose key and value
    are already in the cache; seq_lens counts that token. Returns out [num_seqs, num_heads, head_dim].

    max_seq_len (a host int, to avoid a device sync) and num_splits (default: choose_num_splits) only steer the
    work split; block_n is the tile of context positions per step (default 64 on CUDA, 16 on the interpreter);
    num_warps / num_stages (software-pipelining depth of the K/V loads) are exposed for the benchmark's variants.
    """
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache must have shape [2, num_blocks, block_size, num_kv_heads, head_dim], got {tuple(kv_cache.shape)}"
        )
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    if query.dim() != 3 or query.shape[2] != head_dim:
        raise ValueError(f"query must have shape [num_seqs, num_heads, {head_dim}], got {tuple(query.shape)}")
    num_seqs, num_heads, _ = query.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if seq_lens.shape != (num_seqs,):
        raise ValueError(f"seq_lens must have shape [{num_seqs}], got {tuple(seq_lens.shape)}")
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
    if num_seqs == 0:
        return out
    check_launchable(_decode_attention_kernel, query, kv_cache, scales, block_tables, seq_lens, out)
    on_cuda = query.device.type == "cuda"
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len, query.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if block_n is None:
        block_n = 64 if on_cuda else 16
    group = num_heads // num_kv_heads
    head_dim_pad = max(next_power_of_2(head_dim), 16)
    if num_splits > 1:
        part_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused by the kernel
    _decode_attention_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        kv_cache,
        scales,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
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
        num_heads,
        GROUP=group,
        GROUP_PAD=max(next_power_of_2(group), 16),  # tl.dot needs at least 16 rows
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        DOT_F32=dot_in_float32(query.device, query.dtype, kv_cache.dtype),
        DOT_PRECISION=dot_precision(query.dtype, kv_cache.dtype),
        QUANT=quant,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            num_heads,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            NUM_SPLITS=num_splits,
            SPLITS_PAD=next_power_of_2(num_splits),
            num_warps=1 if head_dim_pad <= 64 else 2,
        )
    return out
