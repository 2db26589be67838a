"""Torch reference ops: the specification every kernel in this package is tested against.

Pure torch, readable before fast. Arithmetic is done in float32 and the result cast back to the input dtype
once at the end, so a kernel that keeps float32 accumulators should land within rounding of these.

Paged KV-cache layout (shared with the engine and the Triton kernels)::

    kv_cache:        [2, num_blocks, block_size, num_kv_heads, head_dim]   k = kv_cache[0], v = kv_cache[1]
    slot:            block_id * block_size + offset_in_block
    slot_mapping:    [num_tokens] int64, -1 = do not write this token
    block_tables:    [num_seqs, max_blocks_per_seq] int32
    query_start_loc: [num_seqs + 1] int32, cumulative count of new (query) tokens
    seq_lens:        [num_seqs] int32, context length INCLUDING the new tokens

A sequence with ``q_len`` new tokens and ``seq_len`` context::

    positions   0 ........................ seq_len - q_len - 1 | seq_len - q_len ...... seq_len - 1
                cached prefix (attended fully by every query)   new tokens (attend causally to each other)

Grouped-query attention: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.

A quantized cache (int8 / float8_e4m3fn codes) comes with ``kv_scale``: float32 [2] = (k_scale, v_scale) of the
layer; writes quantize and reads dequantize as kernels/kv_quant.py specifies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kv_quant

__all__ = [
    "paged_attention",
    "rms_norm",
    "rope_cos_sin_cache",
    "rotary_embedding",
    "silu_and_mul",
    "write_kv_cache",
]


def _check_kv_cache(kv_cache: torch.Tensor) -> None:
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache must have shape [2, num_blocks, block_size, num_kv_heads, head_dim], got {tuple(kv_cache.shape)}"
        )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Scatter each token's key and value into its cache slot, in place; tokens with slot -1 are skipped.

    key, value: [num_tokens, num_kv_heads, head_dim]; kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim];
    slot_mapping: [num_tokens] int64; kv_scale: [2] float32, for a quantized cache (codes = quantize(x, scale)).
    """
    _check_kv_cache(kv_cache)
    kv_quant.check_kv_scale(kv_cache, kv_scale)
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    if key.dim() != 3 or key.shape[1:] != kv_cache.shape[3:]:
        raise ValueError(
            f"key must have shape [num_tokens, {kv_cache.shape[3]}, {kv_cache.shape[4]}], got {tuple(key.shape)}"
        )
    if slot_mapping.shape != (key.shape[0],):
        raise ValueError(f"slot_mapping must have shape [{key.shape[0]}], got {tuple(slot_mapping.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous (it is written through a flat view)")
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    num_slots = num_blocks * block_size
    # k_slots, v_slots: [num_blocks * block_size, num_kv_heads, head_dim], views sharing kv_cache's storage
    k_slots = kv_cache[0].view(num_slots, num_kv_heads, head_dim)
    v_slots = kv_cache[1].view(num_slots, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    if slots.numel() and int(slots.max()) >= num_slots:
        raise ValueError(f"slot_mapping holds slot {int(slots.max())}, but the cache has only {num_slots} slots")
    k_slots[slots] = _to_cache(key[valid], kv_cache.dtype, kv_scale, 0)
    v_slots[slots] = _to_cache(value[valid], kv_cache.dtype, kv_scale, 1)


def _to_cache(x: torch.Tensor, dtype: torch.dtype, kv_scale: torch.Tensor | None, which: int) -> torch.Tensor:
    """x in the cache's dtype: quantized with kv_scale[which] (0: K, 1: V), or cast."""
    if kv_scale is None:
        return x.to(dtype)
    return kv_quant.quantize(x, kv_scale[which], dtype)


def _from_cache(x: torch.Tensor, kv_scale: torch.Tensor | None, which: int) -> torch.Tensor:
    """Cache contents as float32."""
    if kv_scale is None:
        return x.float()
    return kv_quant.dequantize(x, kv_scale[which])


def paged_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each sequence's new tokens over its paged context (cached prefix + the new tokens themselves).

    query: [num_tokens, num_heads, head_dim] (num_tokens = query_start_loc[-1]); returns out with query's shape
    and dtype. The new tokens' own keys and values must already be in the cache (call write_kv_cache first).
    Covers decode (q_len 1), prefill (q_len = seq_len) and extend/chunked prefill (0 < q_len < seq_len) alike.
    """
    _check_kv_cache(kv_cache)
    kv_quant.check_kv_scale(kv_cache, kv_scale)
    if query.dim() != 3 or query.shape[2] != kv_cache.shape[4]:
        raise ValueError(
            f"query must have shape [num_tokens, num_heads, {kv_cache.shape[4]}], got {tuple(query.shape)}"
        )
    num_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"query_start_loc must have shape [{num_seqs + 1}], got {tuple(query_start_loc.shape)}")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(
            f"block_tables must have shape [{num_seqs}, max_blocks_per_seq], got {tuple(block_tables.shape)}"
        )
    if out is None:
        out = torch.empty_like(query)
    block_size = kv_cache.shape[2]
    group_size = num_heads // num_kv_heads
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    if starts and starts[-1] != query.shape[0]:
        raise ValueError(f"query_start_loc[-1] ({starts[-1]}) must equal the number of query tokens ({query.shape[0]})")
    for i in range(num_seqs):
        q_start, q_end, seq_len = starts[i], starts[i + 1], lens[i]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        if not 0 < q_len <= seq_len:
            raise ValueError(f"sequence {i}: {q_len} new tokens but seq_len {seq_len} (must be >= the new tokens)")
        num_blocks = -(-seq_len // block_size)
        if num_blocks > block_tables.shape[1]:
            raise ValueError(
                f"sequence {i}: seq_len {seq_len} needs {num_blocks} blocks, block_tables has room for "
                f"{block_tables.shape[1]}"
            )
        blocks = block_tables[i, :num_blocks].long()
        # k, v: [seq_len, num_kv_heads, head_dim] -> [num_heads, seq_len, head_dim] (each KV head repeated per group)
        k = _from_cache(kv_cache[0, blocks].flatten(0, 1)[:seq_len], kv_scale, 0)
        v = _from_cache(kv_cache[1, blocks].flatten(0, 1)[:seq_len], kv_scale, 1)
        k = k.repeat_interleave(group_size, dim=1).transpose(0, 1)
        v = v.repeat_interleave(group_size, dim=1).transpose(0, 1)
        # q: [num_heads, q_len, head_dim]
        q = query[q_start:q_end].float().transpose(0, 1)
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [num_heads, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        causal = k_pos[None, :] <= q_pos[:, None]  # [q_len, seq_len]
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.matmul(probs, v).transpose(0, 1).to(out.dtype)
    return out


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension, optionally after adding the residual stream.

    x, residual: [..., hidden]; weight: [hidden]. Returns (out, new_residual) where new_residual = x + residual
    (rounded to x's dtype; just x when residual is None) is the residual stream the next layer adds to, and
    out = new_residual / rms(new_residual) * weight.
    """
    if x.shape[-1] != weight.shape[-1] or weight.dim() != 1:
        raise ValueError(f"weight must have shape [{x.shape[-1]}], got {tuple(weight.shape)}")
    if residual is None:
        new_residual = x
    else:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        new_residual = (x.float() + residual.float()).to(x.dtype)
    h = new_residual.float()
    h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = (h * weight.float()).to(x.dtype)
    return out, new_residual


def rope_cos_sin_cache(
    rotary_dim: int, max_position: int, base: float = 10000.0, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Plain (unscaled) rotary table: [max_position, rotary_dim], cos in the first half, sin in the second."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)  # [max_position, rotary_dim/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    # x: [num_tokens, num_heads, rotary_dim] float32; cos, sin: [num_tokens, 1, rotary_dim / 2]
    if is_neox:
        # pairs are (i, i + rotary_dim/2): the halves
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    # GPT-J style: pairs are (2i, 2i + 1), interleaved
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    *,
    head_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query and key by their tokens' positions, IN PLACE, and return them (query, key).

    positions: [num_tokens] int; query: [num_tokens, num_heads * head_dim] or [num_tokens, num_heads, head_dim];
    key likewise with num_kv_heads; cos_sin_cache: [max_position, rotary_dim] (cos half then sin half, see
    rope_cos_sin_cache). Only the first rotary_dim channels of each head rotate (rotary_dim <= head_dim: partial
    rotary); the rest pass through. head_size is needed only for flat (2-D) inputs with partial rotary; it
    defaults to rotary_dim.
    """
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] % 2:
        raise ValueError(f"cos_sin_cache must have shape [max_position, rotary_dim], got {tuple(cos_sin_cache.shape)}")
    if positions.dim() != 1 or positions.shape[0] != query.shape[0] or key.shape[0] != query.shape[0]:
        raise ValueError(
            f"positions must have shape [num_tokens] matching query and key, got positions {tuple(positions.shape)}, "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}"
        )
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (query, key):
        if x.dim() == 2:
            heads = x.view(x.shape[0], -1, head_size or rotary_dim)
        elif x.dim() == 3:
            heads = x
        else:
            raise ValueError(f"query/key must be 2-D or 3-D, got {tuple(x.shape)}")
        if heads.shape[-1] < rotary_dim:
            raise ValueError(f"head_dim {heads.shape[-1]} is smaller than the cache's rotary_dim {rotary_dim}")
        rot = heads[..., :rotary_dim]
        rot.copy_(_rotate(rot.float(), cos, sin, is_neox).to(x.dtype))
    return query, key


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation of a fused gate/up projection: x [..., 2 * d] -> silu(x[..., :d]) * x[..., d:] [..., d]."""
    if x.shape[-1] % 2:
        raise ValueError(f"the last dimension of x must be even (gate and up halves), got {x.shape[-1]}")
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)
