"""GGUF's block formats decoded in numpy / torch: Q8_0, Q4_0, Q4_1 (blocks of 32) and the K-quants.

The K-quant blocks (ggml's ``block_q4_K``, ``block_q5_K``, ``block_q6_K``: 256 elements each) decoded in whole
tensors at once (torch, no per-block Python).

Each decoder gives back the block's integer codes and its per-sub-block scales (and minimums), so that an int4 layer
can take Q4_K's codes as they are (quantization/int4_groups.py); :func:`dequantize_kquant` multiplies them out in
float32 in the order of ggml's reference (``(d * sc) * q - dmin * m``), which makes it equal to
``gguf.quants.dequantize`` bit for bit.

Layouts (little-endian, ggml-common.h):

- Q4_K, 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins of 8 sub-blocks of 32, 128 bytes of nibbles.
  Sub-blocks 2i and 2i+1 are the low and high nibbles of bytes 32i .. 32i+31. ``w = d * sc * q - dmin * m``.
- Q5_K, 176 bytes: Q4_K's, with 32 bytes of fifth bits between the scales and the nibbles: bit s of byte l is the
  high bit of element l of sub-block s.
- Q6_K, 210 bytes: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales (sub-blocks of 16), f16 d;
  ``w = d * sc * (q - 32)``. Each half of 128 elements takes 64 low bytes and 32 high bytes: elements 0..31 and
  32..63 are the low nibbles of low bytes 0..31 and 32..63, 64..127 their high nibbles; the high bytes give bits
  (0,1), (2,3), (4,5), (6,7) to those four runs of 32.
"""

from __future__ import annotations

import numpy as np
import torch


class GGUFError(ValueError):
    """A GGUF file this loader cannot read; the message names the offending key or tensor."""


# Block sizes of the quantization formats we dequantize ourselves: (elements per block, bytes per block).
Q8_0_BLOCK = (32, 34)  # f16 scale d, 32 x int8 q:           x = d * q
Q4_0_BLOCK = (32, 18)  # f16 scale d, 16 bytes of nibbles:    x = d * (q - 8)
Q4_1_BLOCK = (32, 20)  # f16 scale d, f16 min m, 16 bytes:    x = d * q + m
QK_K = 256
KQUANT_BLOCKS = {"Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}  # (elements, bytes) per block


def _blocks(data: np.ndarray | torch.Tensor, type_name: str) -> torch.Tensor:
    """Raw bytes -> [n_blocks, bytes per block] uint8 (a copy: the file's map is read-only)."""
    raw = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))
    size = KQUANT_BLOCKS[type_name][1]
    if raw.numel() % size:
        raise ValueError(f"{type_name}: {raw.numel()} bytes are not whole blocks of {size}")
    return raw.reshape(-1, size)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """[n, 2] uint8 -> [n, 1] float32."""
    return raw.contiguous().view(torch.float16).to(torch.float32)


def _scales_mins_6bit(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of Q4_K/Q5_K -> (scales, mins) [n, 8] uint8 in 0..63. Sub-blocks 0..3: the low 6 bits of
    bytes 0..3 (scales) and 4..7 (mins); 4..7: a nibble of bytes 8..11 below the top 2 bits of bytes 0..3 / 4..7."""
    low, high, extra = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([low & 63, (extra & 15) | ((low >> 6) << 4)], dim=1)
    mins = torch.cat([high & 63, (extra >> 4) | ((high >> 6) << 4)], dim=1)
    return scales, mins


def _split_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] bytes -> [n, 8, 32] codes 0..15: per 32 bytes, their low nibbles then their high nibbles."""
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat([q & 15, q >> 4], dim=2).reshape(-1, 8, 32)


def decode_q4_k(data: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K bytes -> (codes [n_blocks * 8, 32] uint8 in 0..15, scale [n_blocks * 8] f32, minimum [n_blocks * 8]
    f32) per sub-block of 32: ``w = scale * code + minimum`` (``scale = d * sc``, ``minimum = -(dmin * m)``)."""
    b = _blocks(data, "Q4_K")
    sc, m = _scales_mins_6bit(b[:, 4:16])
    scale = _f16(b[:, 0:2]) * sc.to(torch.float32)
    minimum = -(_f16(b[:, 2:4]) * m.to(torch.float32))
    return _split_nibbles(b[:, 16:144]).reshape(-1, 32), scale.reshape(-1), minimum.reshape(-1)


def decode_q5_k(data: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q5_K bytes -> (codes [n_blocks * 8, 32] uint8 in 0..31, scale, minimum), as :func:`decode_q4_k`."""
    b = _blocks(data, "Q5_K")
    sc, m = _scales_mins_6bit(b[:, 4:16])
    scale = _f16(b[:, 0:2]) * sc.to(torch.float32)
    minimum = -(_f16(b[:, 2:4]) * m.to(torch.float32))
    shifts = torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)
    fifth = (b[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1  # [n, 8, 32]: bit s of byte l
    codes = _split_nibbles(b[:, 48:176]) | (fifth << 4)
    return codes.reshape(-1, 32), scale.reshape(-1), minimum.reshape(-1)


def decode_q6_k(data: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K bytes -> (codes [n_blocks * 16, 16] int8 in -32..31, scale [n_blocks * 16] f32) per sub-block of 16:
    ``w = scale * code`` (``scale = d * sc``)."""
    b = _blocks(data, "Q6_K")
    low = b[:, 0:128].reshape(-1, 2, 1, 64)
    low = torch.cat([low & 15, low >> 4], dim=2).reshape(-1, 2, 4, 32)  # the four runs of 32 of each half
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    high = (b[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
    codes = ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    return codes, scale.reshape(-1)


def dequantize_kquant(data: np.ndarray | torch.Tensor, type_name: str) -> torch.Tensor:
    """K-quant bytes -> float32 values [n_blocks * 256], equal to ``gguf.quants.dequantize``."""
    if type_name == "Q6_K":
        codes6, scale6 = decode_q6_k(data)
        return (scale6[:, None] * codes6.to(torch.float32)).reshape(-1)
    codes, scale, minimum = decode_q4_k(data) if type_name == "Q4_K" else decode_q5_k(data)
    # scale * q - dmin * m, as the reference rounds it (minimum is that product negated: exact)
    return (scale[:, None] * codes.to(torch.float32) + minimum[:, None]).reshape(-1)


def _f16_np(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 from a ``[..., 2]`` uint8 array -> float32 ``[...]``."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """``[n_blocks, 16]`` uint8 -> ``[n_blocks, 32]`` values 0..15: low nibbles are elements 0..15, high 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)


def dequantize_q8_0(data: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(data).reshape(-1, Q8_0_BLOCK[1])  # [n_blocks, 34]
    d = _f16_np(blocks[:, 0:2].reshape(-1, 1, 2))  # [n_blocks, 1]
    q = blocks[:, 2:].view(np.int8).astype(np.float32)  # [n_blocks, 32]
    q *= d  # in place: a vocabulary-sized embedding's float32 copy is held once, not twice
    return q.reshape(-1)


def dequantize_q4_0(data: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(data).reshape(-1, Q4_0_BLOCK[1])  # [n_blocks, 18]
    d = _f16_np(blocks[:, 0:2].reshape(-1, 1, 2))
    q = _nibbles(blocks[:, 2:]) - 8.0  # [n_blocks, 32]
    return (d * q).reshape(-1)


def dequantize_q4_1(data: np.ndarray) -> np.ndarray:
    blocks = np.ascontiguousarray(data).reshape(-1, Q4_1_BLOCK[1])  # [n_blocks, 20]
    d = _f16_np(blocks[:, 0:2].reshape(-1, 1, 2))
    m = _f16_np(blocks[:, 2:4].reshape(-1, 1, 2))
    q = _nibbles(blocks[:, 4:])
    return (d * q + m).reshape(-1)


_OWN_DEQUANTIZERS = {"Q8_0": dequantize_q8_0, "Q4_0": dequantize_q4_0, "Q4_1": dequantize_q4_1}


def dequantize_tensor(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor data -> a torch tensor of ``shape`` (numpy order).

    F32/F16/BF16 keep their dtype (no copy beyond reading the map); the block formats become float32.
    Q8_0, Q4_0, Q4_1 and the K-quants Q4_K, Q5_K, Q6_K are dequantized here; other block
    formats go through ``gguf.quants`` (numpy).
    """
    raw = np.ascontiguousarray(data)
    if type_name == "F32":
        return torch.from_numpy(raw.view(np.float32).reshape(shape).copy())
    if type_name == "F16":
        return torch.from_numpy(raw.view(np.float16).reshape(shape).copy())
    if type_name == "BF16":
        # numpy has no bfloat16: reinterpret the 16-bit patterns in torch
        return torch.from_numpy(raw.view(np.int16).reshape(shape).copy()).view(torch.bfloat16)
    if type_name in _OWN_DEQUANTIZERS:
        return torch.from_numpy(_OWN_DEQUANTIZERS[type_name](raw.view(np.uint8)).reshape(shape))
    if type_name in KQUANT_BLOCKS:
        return dequantize_kquant(raw.view(np.uint8), type_name).reshape(shape)
    import gguf
    from gguf import quants

    try:
        qtype = gguf.GGMLQuantizationType[type_name]
    except KeyError as e:
        raise GGUFError(f"tensor type {type_name!r} is unknown") from e
    try:
        values = quants.dequantize(raw.view(np.uint8), qtype)
    except NotImplementedError as e:
        raise GGUFError(f"tensor type {type_name!r} cannot be dequantized") from e
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))
