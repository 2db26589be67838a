"""Online quantization at load: ``--quantization int8`` and ``fp8`` turn a float checkpoint's decoder linears into
8-bit weights with one scale per output channel (symmetric), as vLLM's online fp8 does. The layer loads the float
weight, quantizes it once (:meth:`process_weights_after_loading`) and keeps only the 8-bit copy.

int8 (W8A16): ``codes [N, K] int8``, ``scale [N]``, ``W[n, k] = codes[n, k] * scale[n]`` with
``scale = max |W[n, :]| / 127``. Rounding error at most half a step, scale / 2, per weight: llama.cpp's Q8_0 has
the same step per 32 columns instead of per row. Compute: torch's int8-weight matmul
(``_weight_int8pack_mm``) for bf16/fp16 activations; for float32 on the CPU the C++ ``int8_matmul``
(kernels/cpu_ops.cpp) up to ``INT4_MAX_ROWS`` rows; otherwise the codes are widened to the activation dtype for
one F.linear and the output rows scaled (``y = (x @ codes.T) * scale``: a per-output-channel scale commutes).

fp8 (e4m3): ``weight [N, K] float8_e4m3fn``, ``scale [N] float32`` with ``scale = max |W[n, :]| / 448``.
On a GPU of compute capability 8.9+ (Ada, Hopper) with bf16 activations: ``torch._scaled_mm`` over the fp8
weight and the activations quantized per token (dynamic scales: ``max |x[m, :]| / 448``), float32 accumulation;
elsewhere the weight is widened to the activation dtype for one F.linear, then scaled (the dequant path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..kernels import cpu
from .base import LinearMethod, QuantConfig
from .cpu_int4 import INT4_MAX_ROWS
from .dense import DENSE

if TYPE_CHECKING:
    from ..layers.linear import Linear

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def quantize_per_channel(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (codes [N, K] in ``dtype`` (int8 or float8_e4m3fn), scale [N] float32), symmetric per row.

    Done in blocks of rows (about a megabyte of float32 each): a load quantizes layer after layer, and whole-layer
    float32 temporaries (several per step) would add tens of MiB to its peak, more than the layer itself."""
    n, k = weight.shape
    top = 127.0 if dtype == torch.int8 else FP8_MAX
    codes = torch.empty((n, k), dtype=dtype, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    rows = max(1, (1 << 18) // max(k, 1))
    for start in range(0, n, rows):
        w = weight[start : start + rows].to(torch.float32, copy=True)  # divided in place below
        s = w.abs().amax(dim=1) / top
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: codes 0
        q = w.div_(s[:, None])
        if dtype == torch.int8:
            q = q.round_().clamp_(-127, 127)
        codes[start : start + rows] = q.clamp_(-top, top).to(dtype)
        scale[start : start + rows] = s
    return codes, scale


def scaled_mm_supported(device: torch.device) -> bool:
    """fp8 tensor-core matmuls: CUDA compute capability 8.9 and up."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) and hasattr(torch, "_scaled_mm")


def fp8_scaled_mm(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] bf16 @ (weight [N, K] fp8 * scale [N]).T with per-token dynamic activation scales (GPU), or a
    checkpoint's static per-tensor ``input_scale`` (float32 scalar), repeated per row: the row-wise kernel takes
    row-wise scales on both sides."""
    if input_scale is None:
        x_scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp_min(1e-12)  # [M, 1]
    else:
        x_scale = input_scale.reshape(1, 1).expand(x.shape[0], 1).contiguous()
    x_q = (x.float() / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
    return torch._scaled_mm(
        x_q, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), out_dtype=x.dtype, use_fast_accum=False
    )


class _PerChannelMethod(LinearMethod):
    """Loads the dense float weight, quantizes it as soon as all its shards are in, then holds (codes, scale) only.

    The float weight is allocated on its first shard, not with the model: the model is built with an empty
    placeholder (which carries the device and dtype), so a load's peak is the 8-bit model plus one float layer
    in flight, not the float model."""

    code_dtype: torch.dtype

    def __init__(self) -> None:
        self.codes: torch.Tensor | None = None  # [N, K]
        self.scale: torch.Tensor | None = None  # [N] float32

    def create_weights(self, layer: Linear) -> None:
        layer.add_weight("weight", torch.empty(0), DENSE)  # a placeholder: see prepare_load

    def prepare_load(self, layer: Linear, param: str) -> None:
        weight = layer.weight
        if param == "weight" and weight is not None and weight.numel() == 0:
            full = torch.empty(layer.out_features, layer.in_features, dtype=weight.dtype, device=weight.device)
            layer.weight = torch.nn.Parameter(full, requires_grad=False)
        if param == "weight" and self.codes is not None:
            raise ValueError("weight: loaded twice (the layer is quantized already)")

    def after_load(self, layer: Linear) -> None:
        if self.codes is None and not [m for m in layer.missing() if m.endswith("weight")]:
            self.process_weights_after_loading(layer)

    def process_weights_after_loading(self, layer: Linear) -> None:
        if self.codes is not None:
            return  # quantized when its last shard came in
        weight = layer.weight
        assert weight is not None and weight.numel() > 0, "every shard of the weight is loaded before quantizing"
        self.codes, self.scale = quantize_per_channel(weight.data, self.code_dtype)
        layer.weight = None  # held once

    def dequant_apply(self, x: torch.Tensor) -> torch.Tensor:
        assert self.codes is not None and self.scale is not None
        return F.linear(x, self.codes.to(x.dtype)) * self.scale.to(x.dtype)


class Int8Method(_PerChannelMethod):
    code_dtype = torch.int8

    def __init__(self) -> None:
        super().__init__()
        self.group_scales: torch.Tensor | None = None  # [N, K / 32] float32: the C++ kernel's layout

    def process_weights_after_loading(self, layer: Linear) -> None:
        super().process_weights_after_loading(layer)
        self.prepare_kernels(layer)

    def prepare_kernels(self, layer: Linear) -> None:
        """Once :attr:`codes` and :attr:`scale` are set: the C++ kernel's group scales where it serves."""
        assert self.codes is not None and self.scale is not None
        fits = self.codes.device.type == "cpu" and layer.in_features % 32 == 0
        if self.group_scales is None and fits and cpu.load() is not None:
            self.group_scales = self.scale[:, None].expand(-1, layer.in_features // 32).contiguous()

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        assert self.codes is not None and self.scale is not None
        if x.dtype == torch.float32:
            if self.group_scales is not None and x.shape[0] <= INT4_MAX_ROWS:
                kernels = cpu.load()
                assert kernels is not None
                return kernels.int8_matmul(x, self.codes, self.group_scales)
            return self.dequant_apply(x)
        if x.device.type == "cpu":
            return torch._weight_int8pack_mm(x, self.codes, self.scale.to(x.dtype))
        return self.dequant_apply(x)

    def describe(self) -> str:
        return "int8 per-channel" if self.codes is not None else ""


class Fp8Method(_PerChannelMethod):
    code_dtype = FP8

    def __init__(self) -> None:
        super().__init__()
        self.use_scaled_mm = False
        self.input_scale: torch.Tensor | None = None  # a checkpoint's static activation scale (float32 scalar)

    def process_weights_after_loading(self, layer: Linear) -> None:
        super().process_weights_after_loading(layer)
        self.prepare_kernels(layer)

    def prepare_kernels(self, layer: Linear) -> None:
        """Once :attr:`codes` and :attr:`scale` are set: whether the fp8 tensor cores serve this layer."""
        assert self.codes is not None
        n, k = self.codes.shape
        self.use_scaled_mm = scaled_mm_supported(self.codes.device) and n % 16 == 0 and k % 16 == 0

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        assert self.codes is not None and self.scale is not None
        if self.use_scaled_mm and x.dtype == torch.bfloat16:
            return fp8_scaled_mm(x, self.codes, self.scale, self.input_scale)
        # the dequant path computes in x's dtype: a static input_scale (activations rounded to fp8 on the tensor
        # cores) does not apply here, as vLLM's W8A16 fp8 fallback ignores it
        return self.dequant_apply(x)

    def describe(self) -> str:
        return ("fp8 e4m3 per-channel" + (" scaled_mm" if self.use_scaled_mm else "")) if self.codes is not None else ""


class Int8Config(QuantConfig):
    name = "int8"

    def linear_method(self) -> LinearMethod:
        return Int8Method()


class Fp8Config(QuantConfig):
    name = "fp8"

    def linear_method(self) -> LinearMethod:
        return Fp8Method()
