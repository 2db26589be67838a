"""Helpers of the quantization tests (imported as ``quantization.quant_testing``; tests/ is on sys.path).

The packers here are written from the published layouts, independently of the loader (runtime/quantization):

- AWQ (AutoAWQ ``WQLinear_GEMM.from_linear``): ``intweight`` is [K, N]; for each word column ``c`` and nibble
  ``i``, ``qweight[:, c] |= intweight[:, 8c + order_map[i]] << 4i`` with ``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``;
  the zero points [G, N] are packed the same way into qzeros [G, N / 8]; scales [G, N] float16.
- GPTQ (AutoGPTQ ``QuantLinear.pack``, v1): ``qweight[r, :] |= intweight[8r + j, :] << 4j`` ([K / 8, N]);
  ``qzeros[:, c] |= (zeros[:, 8c + i] - 1) << 4i`` ([G, N / 8], the v1 minus-one); scales [G, N] float16;
  g_idx [K] int32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def _as_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32).copy())


def pack_awq(intweight: np.ndarray) -> torch.Tensor:
    """[R, C] codes 0..15 -> [R, C / 8] int32, AWQ's interleaved nibble order."""
    rows, cols = intweight.shape
    packed = np.zeros((rows, cols // 8), dtype=np.uint32)
    for col in range(cols // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER_MAP[i]].astype(np.uint32) << (4 * i)
    return _as_int32(packed)


def pack_gptq_qweight(intweight: np.ndarray) -> torch.Tensor:
    """[K, N] codes -> [K / 8, N] int32, row 8r + j in nibble j of word row r."""
    k, n = intweight.shape
    packed = np.zeros((k // 8, n), dtype=np.uint32)
    for row in range(k // 8):
        for j in range(8):
            packed[row] |= intweight[row * 8 + j].astype(np.uint32) << (4 * j)
    return _as_int32(packed)


def pack_gptq_qzeros(zeros: np.ndarray) -> torch.Tensor:
    """[G, N] zero points 1..15 -> [G, N / 8] int32, stored minus one (GPTQ v1), column 8c + i in nibble i."""
    g, n = zeros.shape
    stored = (zeros - 1).astype(np.uint32)
    packed = np.zeros((g, n // 8), dtype=np.uint32)
    for col in range(n // 8):
        for i in range(8):
            packed[:, col] |= stored[:, col * 8 + i] << (4 * i)
    return _as_int32(packed)


@dataclass
class IntWeight:
    """A weight as integers: W[k, n] = (codes[k, n] - zeros[group(k), n]) * scales[group(k), n]."""

    codes: np.ndarray  # [K, N] 0..15
    zeros: np.ndarray  # [G, N]
    scales: torch.Tensor  # [G, N] float16
    g_idx: np.ndarray  # [K] group of each row

    def dense(self) -> torch.Tensor:
        """W as [N, K] float32 (nn.Linear's layout)."""
        z = torch.from_numpy(self.zeros[self.g_idx].astype(np.float32))
        s = self.scales.float()[torch.from_numpy(self.g_idx).long()]
        return ((torch.from_numpy(self.codes.astype(np.float32)) - z) * s).t().contiguous()


def rtn_quantize(
    weight: torch.Tensor, group_size: int, *, sym: bool, act_order: bool = False, seed: int = 0
) -> IntWeight:
    """Round-to-nearest int4 of a [N, K] float weight, per group of ``group_size`` input rows (-1: one group).
    ``act_order``: rows join groups in a random order (a permuted g_idx), as GPTQ's desc_act assigns them.
    Zero points stay in 1..15 so that GPTQ v1's minus-one storage holds them."""
    w = weight.float().t()  # [K, N]
    k, n = w.shape
    g = k if group_size == -1 else group_size
    order = np.random.default_rng(seed).permutation(k) if act_order else np.arange(k)
    g_idx = np.empty(k, dtype=np.int64)
    g_idx[order] = np.arange(k) // g
    num_groups = k // g
    codes = np.zeros((k, n), dtype=np.int64)
    zeros = np.zeros((num_groups, n), dtype=np.int64)
    scales = torch.zeros(num_groups, n, dtype=torch.float16)
    for group in range(num_groups):
        rows = torch.from_numpy(np.nonzero(g_idx == group)[0])
        block = w[rows]  # [g, N]
        if sym:
            scale = (block.abs().amax(0) / 7).clamp_min(1e-6).half()
            zero = torch.full((n,), 8)
        else:
            lo, hi = block.amin(0).clamp(max=0), block.amax(0).clamp(min=0)
            # 13 steps over the range: the zero's +1 (GPTQ v1 storage) and the float16 rounding of the scale
            # cannot push the largest value past code 15
            scale = ((hi - lo) / 13).clamp_min(1e-6).half()
            zero = torch.clamp(torch.round(-lo / scale.float()) + 1, 1, 15).long()
        q = torch.clamp(torch.round(block / scale.float()) + zero, 0, 15).long()
        codes[rows.numpy()] = q.numpy()
        zeros[group] = zero.numpy()
        scales[group] = scale
    return IntWeight(codes, zeros, scales, g_idx)


def awq_tensors(iw: IntWeight) -> dict[str, torch.Tensor]:
    return {"qweight": pack_awq(iw.codes), "qzeros": pack_awq(iw.zeros), "scales": iw.scales}


def gptq_tensors(iw: IntWeight, *, with_bias: int | None = None) -> dict[str, torch.Tensor]:
    tensors = {
        "qweight": pack_gptq_qweight(iw.codes),
        "qzeros": pack_gptq_qzeros(iw.zeros),
        "scales": iw.scales,
        "g_idx": torch.from_numpy(iw.g_idx.astype(np.int32)),
    }
    if with_bias is not None:  # AutoGPTQ saves a (zero) bias for every linear
        tensors["bias"] = torch.zeros(with_bias, dtype=torch.float16)
    return tensors
