"""Fused elementwise kernels of a decoder layer: RMSNorm (+ residual add), rotary embedding, SiLU-and-mul.

Each is memory bound; fusing saves a round trip of the activations through device memory per fused step.
Specs (same signatures, same results within rounding): kubellm.runtime.kernels.reference.{rms_norm,
rotary_embedding, silu_and_mul}.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import check_launchable, next_power_of_2

__all__ = ["rms_norm", "rotary_embedding", "silu_and_mul"]


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_rows, hidden]
    residual_ptr,  # [num_rows, hidden], read when HAS_RESIDUAL
    weight_ptr,  # [hidden]
    out_ptr,  # [num_rows, hidden]
    new_residual_ptr,  # [num_rows, hidden], written when HAS_RESIDUAL
    stride_x,
    stride_r,
    stride_o,
    stride_nr,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # >= hidden: one program normalizes one whole row
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        # the residual stream is kept in the activations' dtype: round the sum once, then normalize that
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_nr + offs, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, 0) / hidden + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (h * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [num_rows, hidden] without copying when its rows are evenly strided (e.g. per-head views)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])  # copies: fine for a read-only input


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of reference.rms_norm: returns (out, new_residual), new tensors (inputs are not modified).

    x, residual: [..., hidden] with the last dimension contiguous; weight: [hidden]. Rows up to 65,536 wide.
    """
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight must have shape [{hidden}], got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if hidden > 65536:
        raise ValueError(f"rms_norm handles rows up to 65536 wide, got hidden {hidden}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    new_residual = x if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out, new_residual
    weight = weight if weight.is_contiguous() else weight.contiguous()
    check_launchable(_rms_norm_kernel, x, weight)
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    out2 = out.view(-1, hidden)
    nr2 = new_residual.view(-1, hidden) if residual is not None else out2
    block = next_power_of_2(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        r2,
        weight,
        out2,
        nr2,
        x2.stride(0),
        r2.stride(0),
        out2.stride(0),
        nr2.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 256, 1), 16),
    )
    return out, new_residual


@triton.jit
def _rotary_kernel(
    positions_ptr,  # [num_tokens]
    x_ptr,  # [num_tokens, num_heads, head_size] (strided), rotated in place
    cos_sin_ptr,  # [max_position, rotary_dim]: cos half, sin half
    stride_xt,
    stride_xh,
    stride_cs,
    num_heads,
    HALF: tl.constexpr,  # rotary_dim // 2
    HALF_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_i = tl.arange(0, HALF_PAD)
    offs_h = tl.arange(0, HEADS_PAD)
    mask_i = offs_i < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_i, mask=mask_i, other=0.0).to(tl.float32)
    if IS_NEOX:
        # pair i is (i, i + rotary_dim / 2)
        first = offs_i
        second = offs_i + HALF
    else:
        # GPT-J: pair i is (2i, 2i + 1)
        first = 2 * offs_i
        second = 2 * offs_i + 1
    mask = (offs_h[:, None] < num_heads) & mask_i[None, :]
    base = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh  # [HEADS_PAD, 1]
    x1 = tl.load(base + first[None, :], mask=mask, other=0.0).to(tl.float32)  # [HEADS_PAD, HALF_PAD]
    x2 = tl.load(base + second[None, :], mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    tl.store(base + first[None, :], (x1 * cos[None, :] - x2 * sin[None, :]).to(dtype), mask=mask)
    tl.store(base + second[None, :], (x2 * cos[None, :] + x1 * sin[None, :]).to(dtype), mask=mask)


def _heads(x: torch.Tensor, head_size: int, name: str) -> torch.Tensor:
    """x as a [num_tokens, num_heads, head_size] view of the same storage (rotation happens in place)."""
    if x.dim() == 2:
        if x.shape[1] % head_size:
            raise ValueError(f"{name} width {x.shape[1]} is not a multiple of head_size {head_size}")
        if x.stride(1) != 1:
            raise ValueError(f"{name} must have its last dimension contiguous")
        return x.unflatten(1, (-1, head_size))
    if x.dim() == 3:
        if x.stride(2) != 1:
            raise ValueError(f"{name} must have its last dimension contiguous")
        return x
    raise ValueError(f"{name} must be 2-D or 3-D, got {tuple(x.shape)}")


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    *,
    head_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of reference.rotary_embedding: rotates query and key IN PLACE and returns them."""
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] % 2:
        raise ValueError(f"cos_sin_cache must have shape [max_position, rotary_dim], got {tuple(cos_sin_cache.shape)}")
    num_tokens = query.shape[0]
    if positions.shape != (num_tokens,) or key.shape[0] != num_tokens:
        raise ValueError(
            f"positions must have shape [num_tokens] matching query and key, got positions {tuple(positions.shape)}, "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}"
        )
    rotary_dim = cos_sin_cache.shape[1]
    size = head_size or rotary_dim
    q3, k3 = _heads(query, size, "query"), _heads(key, size, "key")
    for x in (q3, k3):
        if x.shape[2] < rotary_dim:
            raise ValueError(f"head_size {x.shape[2]} is smaller than the cache's rotary_dim {rotary_dim}")
    if num_tokens == 0:
        return query, key
    cos_sin_cache = cos_sin_cache if cos_sin_cache.stride(1) == 1 else cos_sin_cache.contiguous()
    check_launchable(_rotary_kernel, positions, query, key, cos_sin_cache)
    half = rotary_dim // 2
    for x in (q3, k3):
        _rotary_kernel[(num_tokens,)](
            positions,
            x,
            cos_sin_cache,
            x.stride(0),
            x.stride(1),
            cos_sin_cache.stride(0),
            x.shape[1],
            HALF=half,
            HALF_PAD=next_power_of_2(half),
            HEADS_PAD=next_power_of_2(x.shape[1]),
            IS_NEOX=is_neox,
            num_warps=4,
        )
    return query, key


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_rows, 2 * d]: gate then up
    out_ptr,  # [num_rows, d]
    stride_x,
    stride_o,
    d,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of reference.silu_and_mul: x [..., 2 * d] -> [..., d]."""
    if x.shape[-1] % 2:
        raise ValueError(f"the last dimension of x must be even (gate and up halves), got {x.shape[-1]}")
    d = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    check_launchable(_silu_and_mul_kernel, x)
    x2 = _rows(x)
    out2 = out.view(-1, d)
    block = min(next_power_of_2(d), 1024)
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
        x2, out2, x2.stride(0), out2.stride(0), d, BLOCK=block, num_warps=4
    )
    return out
