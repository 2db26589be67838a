"""KV-cache write: scatter the new tokens' keys and values into their paged-cache slots.

Spec: kubellm.runtime.kernels.reference.write_kv_cache. One program per (token, tile of the
num_kv_heads * head_dim row); a token whose slot is -1 writes nothing. A quantized cache (int8 / float8 e4m3)
is written as codes of the layer's kv_scale (kernels/kv_quant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import check_launchable, next_power_of_2
from .kv_quant import quant_mode

__all__ = ["write_kv_cache"]


@triton.jit
def _round_to_e4m3(x):
    """x (float32, |x| <= 448) rounded to the nearest float8 e4m3 value (ties to even), still float32. Triton's
    interpreter converts float32 to float8 wrongly when rounding carries into the next power of two (7.99 -> 4,
    not 8); converting an already representable value is exact there."""
    bits = x.to(tl.uint32, bitcast=True)
    negative = (bits >> 31) == 1
    # normal range (|x| >= 2^-6): keep 3 of the 23 mantissa bits, ties to even
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    # subnormals: multiples of 2^-9; float32 addition at 1.5 * 2^14 rounds to exactly that spacing, ties to even.
    # Done on |x| and signed after, so a negative value that rounds to zero is -0, as a conversion gives.
    magnitude = (tl.abs(x) + 24576.0) - 24576.0
    subnormal = tl.where(negative, -magnitude, magnitude)
    return tl.where(tl.abs(x) >= 0.015625, normal, subnormal)


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    cache_ptr,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int64
    kv_scale_ptr,  # [2] float32 (k_scale, v_scale) when QUANT, else unused
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c_kv,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    block_size,
    HEAD_DIM: tl.constexpr,
    ROW: tl.constexpr,  # num_kv_heads * head_dim
    BLOCK: tl.constexpr,
    QUANT: tl.constexpr,  # 0: cast to the cache's dtype; 1: int8 codes; 2: float8 e4m3 codes (kv_quant.py)
    ROUND_E4M3: tl.constexpr,  # the interpreter: round to e4m3 in float32 before converting (_round_to_e4m3)
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    # -1 = padding token or a slot not to write: the whole row is masked off. (One comparison against a
    # scalar limit rather than `vector & scalar_bool`, which Triton's interpreter turns into an int32 mask.)
    mask = offs < tl.where(slot >= 0, ROW, 0)
    head = offs // HEAD_DIM
    dim = offs % HEAD_DIM
    token64 = token.to(tl.int64)
    k = tl.load(key_ptr + token64 * stride_kt + head * stride_kh + dim, mask=mask)
    v = tl.load(value_ptr + token64 * stride_vt + head * stride_vh + dim, mask=mask)
    block = slot // block_size
    dst = block * stride_c_block + (slot % block_size) * stride_c_slot + head * stride_c_head + dim
    if QUANT:
        # x * (1 / scale) in float32, clamped to the code range; int8 rounds half up (kv_quant.quantize)
        qmax = 127.0 if QUANT == 1 else 448.0
        k = tl.minimum(tl.maximum(k.to(tl.float32) * (1.0 / tl.load(kv_scale_ptr)), -qmax), qmax)
        v = tl.minimum(tl.maximum(v.to(tl.float32) * (1.0 / tl.load(kv_scale_ptr + 1)), -qmax), qmax)
        if QUANT == 1:
            k = tl.floor(k + 0.5)
            v = tl.floor(v + 0.5)
        elif ROUND_E4M3:
            k = _round_to_e4m3(k)
            v = _round_to_e4m3(v)
    tl.store(cache_ptr + dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptr + stride_c_kv + dst, v.to(cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_scale: torch.Tensor | None = None,
) -> None:
    """Triton version of reference.write_kv_cache (same arguments, same effect).

    key/value may be strided views (e.g. slices of a fused qkv projection) as long as head_dim is contiguous.
    """
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError(
            f"kv_cache must have shape [2, num_blocks, block_size, num_kv_heads, head_dim], got {tuple(kv_cache.shape)}"
        )
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    if key.dim() != 3 or key.shape[1:] != (num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(
            f"key and value must have shape [num_tokens, {num_kv_heads}, {head_dim}], "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    num_tokens = key.shape[0]
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must have shape [{num_tokens}], got {tuple(slot_mapping.shape)}")
    if key.stride(2) != 1 or value.stride(2) != 1 or kv_cache.stride(4) != 1 or kv_cache.stride(3) != head_dim:
        raise ValueError("head_dim must be contiguous in key, value and kv_cache (and heads packed in kv_cache)")
    quant = quant_mode(kv_cache, kv_scale)
    if num_tokens == 0:
        return
    scales = kv_scale if kv_scale is not None else slot_mapping  # the kernel reads it only when QUANT
    check_launchable(_write_kv_cache_kernel, key, value, kv_cache, slot_mapping, scales)
    row = num_kv_heads * head_dim
    block = min(next_power_of_2(row), 1024)
    grid = (num_tokens, triton.cdiv(row, block))
    _write_kv_cache_kernel[grid](
        key,
        value,
        kv_cache,
        slot_mapping,
        scales,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        kv_cache.stride(3),
        block_size,
        HEAD_DIM=head_dim,
        ROW=row,
        BLOCK=block,
        QUANT=quant,
        ROUND_E4M3=key.device.type == "cpu",
    )
