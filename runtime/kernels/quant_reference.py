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
"""

from __future__ import annotations

import torch

__all__ = ["dequantize_w4", "pack_int4_rows", "unpack_int4_cols", "unpack_int4_rows", "w4a16_matmul"]

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
