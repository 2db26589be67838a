"""Torch reference for the quantized-weight GEMMs (kernels/quant_gemm.py), and the int4 layouts they read.

The W4A16 layout every int4 checkpoint format is repacked to at load (quantization/w4.py)::

    qweight: [K / 8, N] int32   nibble j (bits 4j .. 4j+3, low first) of word [r, n] = code of row 8r + j, column n
    scales:  [G, N]  activation dtype (or float32)
    zeros:   [G, N]  uint8 zero points (0 .. 16: GPTQ v1 checkpoints may hold 16)
    g_idx:   [K] int32 group of each input row, or None: row k is in group k // group_size

    W[k, n] = (code[k, n] - zeros[g(k), n]) * scales[g(k), n]        y = x @ W    (x: [M, K], y: [M, N])

This is GPTQ's own qweight packing (8 consecutive input rows of one output column per word): a GEMM tile of
[BLOCK_K, BLOCK_N] codes is BLOCK_K / 8 rows of words read along N, coalesced; AWQ's column-interleaved words are
unpacked once at load. The per-row group index serves act-order (``desc_act``) checkpoints without permuting the
activations.

The int8 group layout (GGUF's K-quants Q6_K and Q5_K, and Q8_0, as their files store them; the C++
``int8_group_matmul`` of kernels/cpu_quant_ops.cpp reads it)::

    codes:   [N, K] int8           (Q6_K: -32..31, Q5_K: 0..31, Q8_0: -127..127)
    scales:  [N, K / G] float32    one per group of G input columns (Q6_K: G = 16, d * sc; Q5_K / Q8_0: 32)
    offsets: [N, K / G] float32 or None  (Q5_K: -dmin * m)

    W[n, k] = codes[n, k] * scales[n, k // G] + offsets[n, k // G]      y = x @ W.T
"""

from __future__ import annotations

import torch

__all__ = [
    "dequantize_int8_groups",
    "dequantize_w4",
    "int8_group_matmul",
    "pack_int4_rows",
    "unpack_int4_cols",
    "unpack_int4_rows",
    "w4a16_matmul",
]

_SHIFTS = tuple(range(0, 32, 4))


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.tensor(_SHIFTS, dtype=torch.int32, device=device)


def unpack_int4_rows(words: torch.Tensor) -> torch.Tensor:
    """[R / 8, C] int32 -> [R, C] uint8: nibble j of word [r, c] is row 8r + j."""
    codes = (words[:, None, :] >> _shifts(words.device)[None, :, None]) & 0xF  # [R / 8, 8, C]
    return codes.reshape(-1, words.shape[1]).to(torch.uint8)


def unpack_int4_cols(words: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, C / 8] int32 -> [R, C] uint8: nibble i of word [r, c] is column 8c + order[i] (order: identity)."""
    nibbles = (words[:, :, None] >> _shifts(words.device)) & 0xF  # [R, C / 8, 8]: nibble i at index i
    if order is not None:
        inverse = [order.index(j) for j in range(8)]  # column j of a word's 8 is its nibble inverse[j]
        nibbles = nibbles[:, :, inverse]
    return nibbles.reshape(words.shape[0], -1).to(torch.uint8)


def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`unpack_int4_rows`: [R, C] codes in 0..15 -> [R / 8, C] int32."""
    r, c = codes.shape
    if r % 8:
        raise ValueError(f"rows ({r}) must be a multiple of 8 to pack int4 codes into int32 words")
    grouped = codes.to(torch.int32).reshape(r // 8, 8, c) << _shifts(codes.device)[None, :, None]
    return grouped.sum(1, dtype=torch.int32)  # disjoint bits: the sum is the OR (wrapping into the sign bit)


def dequantize_w4(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, g_idx: torch.Tensor | None
) -> torch.Tensor:
    """The layout above -> W [K, N] float32."""
    codes = unpack_int4_rows(qweight).float()  # [K, N]
    k = codes.shape[0]
    groups = g_idx.long() if g_idx is not None else torch.arange(k, device=codes.device) // group_size
    return (codes - zeros[groups].float()) * scales[groups].float()


def w4a16_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ W [K, N] -> [M, N] in x's dtype, computed in float32 from the dequantized weight."""
    w = dequantize_w4(qweight, scales, zeros, group_size, g_idx)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} columns, the weight {w.shape[0]} input rows")
    return (x.float() @ w).to(x.dtype)


def dequantize_int8_groups(
    codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """The int8 group layout above -> W [N, K] float32, in the order of ggml's reference (``scale * q``, then
    ``+ offset``), so a K-quant file's values come back bit for bit."""
    n, k = codes.shape
    w = codes.reshape(n, k // group_size, group_size).to(torch.float32) * scales[..., None]
    if offsets is not None:
        w = w + offsets[..., None]
    return w.reshape(n, k)


def int8_group_matmul(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] float32, W dequantized by :func:`dequantize_int8_groups`."""
    return x.float() @ dequantize_int8_groups(codes, scales, offsets, group_size).t()
