"""The int4 weight-only method that AWQ and GPTQ checkpoints are repacked into at load (the layout of
kernels/quant_reference.py: qweight [K / 8, N] int32 packed along K, scales and uint8 zeros [G, N], an optional
per-row g_idx), and its compute path, chosen once when the weights are on their device: the Triton W4A16 GEMM
on a GPU; on an AVX-512 CPU torch's int4 kernel (the codes repacked once more into its layout, with
``zero' = (8 - zero) * scale`` since it computes ``(q - 8) * scale + zero'``), where the layout fits it (no act
order, N a multiple of 16, groups of 32..256); the torch reference (dequantize, then matmul) elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..kernels import quant_reference
from .base import LinearMethod
from .cpu_int4 import cpu_int4_is_fast, int4pack_fits

if TYPE_CHECKING:
    from ..layers.linear import Linear

W4Kernel = Callable[..., torch.Tensor]


@dataclass
class W4Weights:
    """One layer's weight in the W4A16 layout (shapes in kernels/quant_reference.py)."""

    qweight: torch.Tensor  # [K / 8, N] int32
    scales: torch.Tensor  # [G, N]
    zeros: torch.Tensor  # [G, N] uint8
    group_size: int
    g_idx: torch.Tensor | None  # [K] int32, None: row k in group k // group_size

    def dequantize(self) -> torch.Tensor:
        """W [K, N] float32 (tests, oracles)."""
        return quant_reference.dequantize_w4(self.qweight, self.scales, self.zeros, self.group_size, self.g_idx)


@dataclass
class Int4Pack:
    """torch's CPU int4 layout of a W4 weight: the codes [N, K / 2] uint8 (opaque blocking), scales_and_zeros
    [G, N, 2] in the activation dtype."""

    weight: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int

    @classmethod
    def of(cls, w4: W4Weights) -> Int4Pack:
        codes = quant_reference.unpack_int4_rows(w4.qweight).t().to(torch.int32).contiguous()  # [N, K]
        scale = w4.scales.float()
        zero = (8 - w4.zeros.float()) * scale  # [G, N]
        scales_and_zeros = torch.stack([scale, zero], dim=-1).to(w4.scales.dtype).contiguous()
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        return cls(packed, scales_and_zeros, w4.group_size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)


def w4_kernel(device: torch.device) -> W4Kernel:
    """The device's W4A16 GEMM: Triton on CUDA, the torch reference elsewhere."""
    if device.type == "cuda":
        from ..kernels.quant_gemm import w4a16_matmul

        return w4a16_matmul
    return quant_reference.w4a16_matmul


def check_bits(qc: dict[str, Any], method: str) -> None:
    bits = qc.get("bits", qc.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"config field 'quantization_config.bits' is {bits!r}: {method} is supported with 4 bits only")


def check_unconverted(qc: dict[str, Any], method: str) -> None:
    """Refuse settings that leave decoder linears unquantized or quantize the head: every decoder linear here is
    in the checkpoint's format, the embedding and head in float."""
    skipped = qc.get("modules_to_not_convert") or []
    if not isinstance(skipped, list) or any(name not in ("lm_head", "embed_tokens") for name in skipped):
        raise ValueError(
            f"config field 'quantization_config.modules_to_not_convert' is {skipped!r}: {method} is supported with "
            "every decoder linear quantized (only lm_head / embed_tokens may be left out)"
        )
    if qc.get("lm_head"):
        raise ValueError(
            f"config field 'quantization_config.lm_head' is true: a {method}-quantized head is not supported"
        )


def read_group_size(qc: dict[str, Any], *keys: str, allow_whole: bool = False) -> int:
    """The group size from the first of ``keys`` present; -1 (one group over all of K) where allowed."""
    key = next((k for k in keys if k in qc), keys[0])
    value = qc.get(key, 128)
    if isinstance(value, bool) or not isinstance(value, int) or not (value > 0 or (allow_whole and value == -1)):
        raise ValueError(f"config field 'quantization_config.{key}' must be a positive integer, got {value!r}")
    if value > 0 and value % 8:
        raise ValueError(f"config field 'quantization_config.{key}' ({value}) must be a multiple of 8")
    return value


class W4Method(LinearMethod):
    """Base of the int4 checkpoint formats: a subclass registers its checkpoint tensors and implements
    :meth:`repack`; the layer then holds :attr:`w4` only (the checkpoint tensors are dropped)."""

    def __init__(self) -> None:
        self.w4: W4Weights | None = None
        self.int4pack: Int4Pack | None = None  # replaces w4 on an AVX-512 CPU
        self.kernel: W4Kernel = quant_reference.w4a16_matmul

    def repack(self, layer: Linear) -> W4Weights:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: Linear) -> None:
        self.w4 = self.repack(layer)
        for name in layer.layouts:
            if name != "bias":
                setattr(layer, name, None)  # held once: the repacked copy is the weight now
        self.kernel = w4_kernel(self.w4.qweight.device)
        n, k = layer.out_features, layer.in_features
        on_cpu = self.w4.qweight.device.type == "cpu"
        if on_cpu and self.w4.g_idx is None and int4pack_fits(n, k, self.w4.group_size) and cpu_int4_is_fast():
            self.int4pack, self.w4 = Int4Pack.of(self.w4), None  # held once, in the CPU kernel's layout

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.int4pack is not None:
            return self.int4pack.matmul(x)
        w4 = self.w4
        assert w4 is not None, "process_weights_after_loading() repacks the weights before the first forward"
        return self.kernel(x, w4.qweight, w4.scales, w4.zeros, w4.group_size, w4.g_idx)

    def describe(self) -> str:
        if self.int4pack is not None:
            return f"w4a16 g{self.int4pack.group_size} cpu-int4pack"
        return f"w4a16 g{self.w4.group_size}" if self.w4 is not None else ""
