"""K-quant writers for tests and benchmarks (``gguf.quants.quantize`` has no Q4_K / Q5_K / Q6_K): round-to-nearest
with 6-bit (Q4_K, Q5_K) or 8-bit (Q6_K) sub-block scales, vectorized over all blocks, producing valid ggml blocks;
and a Q4_K_M- or Q5_K_M-style copy of the bundled SmolLM2 GGUF written with ``gguf.GGUFWriter``.

Not llama.cpp's quantizer (no importance search): only its block layouts matter here, the loader and the oracle
(transformers, through ``gguf.quants.dequantize``) read the same bytes. Used by tests/runtime/test_gguf_kquants.py
and bench/load_memory.py; the runtime itself never imports it.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import quants

QK_K = 256


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """[n] float -> [n, 2] uint8 little-endian f16."""
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _asymmetric_sub_blocks(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """float [..., K] -> (d, dmin [blocks], 12 packed bytes of 6-bit scales and mins [blocks, 12], codes [blocks, 8,
    32] in 0..levels): Q4_K's and Q5_K's shared sub-block quantization, ``w ~ d * sc * q - dmin * m``."""
    x = values.astype(np.float32).reshape(-1, 8, 32)  # [blocks, sub-blocks, 32]
    low = np.minimum(x.min(-1), 0)  # the minimum is -dmin * m <= 0
    sub_scale = (x.max(-1) - low) / levels
    d = np.maximum(sub_scale.max(-1), 1e-8) / 63  # [blocks]
    dmin = np.maximum((-low).max(-1), 1e-8) / 63
    d16, dmin16 = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(sub_scale / d16[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.round(-low / dmin16[:, None]), 0, 63).astype(np.uint8)
    step = d16[:, None] * sc
    offset = dmin16[:, None] * m
    q = np.clip(np.round((x + offset[..., None]) / np.where(step > 0, step, 1)[..., None]), 0, levels)
    scales = np.empty((x.shape[0], 12), dtype=np.uint8)
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return d, dmin, scales, q.astype(np.uint8)


def _nibble_bytes(q: np.ndarray) -> np.ndarray:
    """codes [blocks, 8, 32] (low 4 bits used) -> [blocks, 128]: sub-blocks 2i (low nibbles) and 2i+1 (high
    nibbles) share 32 bytes."""
    pairs = (q & 15).reshape(-1, 4, 2, 32)
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """float [..., K] (K a multiple of 256) -> Q4_K bytes [..., K / 256 * 144]: per sub-block of 32,
    ``w ~ d * sc * q - dmin * m`` with sc, m in 0..63 and q in 0..15."""
    shape = values.shape
    d, dmin, scales, q = _asymmetric_sub_blocks(values, 15)
    blocks = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, _nibble_bytes(q)], axis=1)
    return blocks.reshape(*shape[:-1], shape[-1] // QK_K * 144)


def quantize_q5_k(values: np.ndarray) -> np.ndarray:
    """float [..., K] (K a multiple of 256) -> Q5_K bytes [..., K / 256 * 176]: Q4_K's with q in 0..31, the fifth
    bits in 32 bytes (bit s of byte l: element l of sub-block s)."""
    shape = values.shape
    d, dmin, scales, q = _asymmetric_sub_blocks(values, 31)
    fifth = (q >> 4).astype(np.uint8)  # [blocks, 8, 32]
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for s in range(8):
        qh |= fifth[:, s] << s
    blocks = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qh, _nibble_bytes(q)], axis=1)
    return blocks.reshape(*shape[:-1], shape[-1] // QK_K * 176)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """float [..., K] (K a multiple of 256) -> Q6_K bytes [..., K / 256 * 210]: per sub-block of 16,
    ``w ~ d * sc * (q - 32)`` with sc in -128..127 and q in 0..63."""
    shape = values.shape
    x = values.astype(np.float32).reshape(-1, 16, 16)
    sub_scale = np.abs(x).max(-1) / 31
    d = np.maximum(sub_scale.max(-1), 1e-8) / 127
    d16 = d.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(sub_scale / d16[:, None]), 0, 127).astype(np.int8)
    step = d16[:, None] * sc
    q16 = np.clip(np.round(x / np.where(step > 0, step, 1)[..., None]), -32, 31).astype(np.int16) + 32
    q = q16.astype(np.uint8).reshape(-1, 2, 4, 32)  # halves of 128, runs of 32
    low = q & 15
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)  # [n, 2, 64]
    high = q >> 4  # [n, 2, 4, 32]: 2 bits per run
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # [n, 2, 32]
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1)
    return blocks.reshape(*shape[:-1], shape[-1] // QK_K * 210)


def use_more_bits(layer: int, num_layers: int) -> bool:
    """llama.cpp's Q4_K_M rule for the layers whose ffn_down (and attn_v) get Q6_K: the first and last eighth,
    and every third in between."""
    eighth = num_layers // 8
    return layer < eighth or layer >= 7 * num_layers // 8 or (layer - eighth) % 3 == 2


_QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def write_q4_k_m_copy(source: Path, out: Path, base: tuple[str, ...] = ("Q4_K",)) -> dict[str, str]:
    """The bundled SmolLM2 (Q4_1) re-quantized Q4_K_M style: its metadata and tokenizer as they are; ffn_down
    (in_features 1536: whole 256-blocks) in ``base``'s types (taken in turn over the layers: Q4_K for Q4_K_M, Q5_K
    for Q5_K_M, both for a test mix), or Q6_K where llama.cpp's _M mix gives more bits; the embedding (tied: also
    the head) Q8_0; the other matrices (in_features 576, not whole 256-blocks, where llama.cpp falls back to a
    32-block format too) and the norms as the source has them. Returns GGUF tensor name -> type name."""
    reader = gguf.GGUFReader(str(source), "r")
    arch = str(reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)
    num_layers = int(reader.fields[f"{arch}.block_count"].contents())
    types: dict[str, str] = {}
    turn = 0
    for t in reader.tensors:
        shape = [int(d) for d in reversed([int(x) for x in t.shape])]  # numpy order: [out, in]
        layer = int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1
        if t.name.endswith("ffn_down.weight") or t.name == "token_embd.weight":
            values = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
            if t.name == "token_embd.weight":
                kind, data = "Q8_0", quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            else:
                kind = "Q6_K" if use_more_bits(layer, num_layers) else base[turn % len(base)]
                turn += kind != "Q6_K"
                data = _QUANTIZERS[kind](values)
            writer.add_tensor(t.name, data, raw_dtype=gguf.GGMLQuantizationType[kind])  # bytes [out, ...]
        else:
            kind = t.tensor_type.name
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        types[t.name] = kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types
