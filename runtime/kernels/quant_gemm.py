"""Triton W4A16 GEMM: y = x @ W with W in the int4 layout of kernels/quant_reference.py (the spec:
``quant_reference.w4a16_matmul``, same signature, same result within rounding).

One program computes a [BLOCK_M, BLOCK_N] tile of y, walking K in BLOCK_K steps: it loads BLOCK_K / 8 rows of
packed words (each word read by its 8 rows' lanes from cache), shifts out each row's nibble, subtracts the zero
point and multiplies by the scale of that row's group (per row, so act-order g_idx costs nothing extra), and
feeds the dequantized tile to tl.dot with float32 accumulation. The weight moves as 4 bits per element plus the
group scales; the activations are read once per column tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import check_launchable, dot_in_float32, dot_precision

__all__ = ["w4a16_matmul"]


@triton.jit
def _w4a16_kernel(
    x_ptr,  # [M, K]
    qweight_ptr,  # [K / 8, N] int32
    scales_ptr,  # [G, N]
    zeros_ptr,  # [G, N] uint8
    g_idx_ptr,  # [K] int32, read when HAS_G_IDX
    out_ptr,  # [M, N]
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_qk,
    stride_sg,
    stride_zg,
    stride_om,
    HAS_G_IDX: tl.constexpr,
    UPCAST: tl.constexpr,  # dot in float32 (the interpreter's bf16 dot is wrong; float32 models)
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        mask_kn = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qweight_ptr + (offs_k[:, None] // 8) * stride_qk + offs_n[None, :], mask=mask_kn, other=0)
        codes = (words >> ((offs_k[:, None] % 8) * 4)) & 0xF  # [BLOCK_K, BLOCK_N]
        if HAS_G_IDX:  # noqa: SIM108 (a constexpr branch of the kernel)
            groups = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
        else:
            groups = offs_k // group_size
        scale = tl.load(scales_ptr + groups[:, None] * stride_sg + offs_n[None, :], mask=mask_kn, other=0.0)
        zero = tl.load(zeros_ptr + groups[:, None] * stride_zg + offs_n[None, :], mask=mask_kn, other=0)
        w = (codes.to(tl.float32) - zero.to(tl.float32)) * scale.to(tl.float32)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), w, input_precision=PRECISION)
        else:
            acc += tl.dot(a, w.to(a.dtype), input_precision=PRECISION)
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of quant_reference.w4a16_matmul: x [M, K] -> [M, N] in x's dtype."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {tuple(x.shape)}")
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.dtype != torch.int32 or qweight.shape[0] * 8 != k:
        raise ValueError(f"qweight must be [K / 8, N] int32 with K = {k}, got {tuple(qweight.shape)} {qweight.dtype}")
    if scales.shape != zeros.shape or scales.shape[1] != n or zeros.dtype != torch.uint8:
        raise ValueError(f"scales and zeros (uint8) must be [G, {n}], got {tuple(scales.shape)}, {tuple(zeros.shape)}")
    x = x.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    g = g_idx.to(torch.int32).contiguous() if g_idx is not None else qweight  # any tensor when unused
    check_launchable(_w4a16_kernel, x, qweight, scales, zeros, g, out)
    if m == 0 or n == 0:
        return out
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n, block_k = 64, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    upcast = dot_in_float32(x.device, x.dtype) or x.dtype == torch.float32
    _w4a16_kernel[grid](
        x, qweight, scales, zeros, g, out, m, n, k, group_size,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0),
        HAS_G_IDX=g_idx is not None, UPCAST=upcast, PRECISION=dot_precision(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out
