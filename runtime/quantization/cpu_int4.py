"""``--quantization int4``: int4 weight-only linears on the CPU through torch's int4 kernel, quantized at load.

Why int4 on the CPU: a decode step at batch 1 reads every weight once, so its time is the weight bytes over
the memory bandwidth. torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) reads a quarter of bf16's
bytes. Measured on a 2-core EPYC (AVX-512 build), all 30 SmolLM2 layers streamed from memory (not from cache):

    rows (tokens)       1      4      8     16     32
    bf16 (ms)          17.0   28.8   30.3   47.7   56.8
    int4 (ms)           6.9   11.4   18.2   40.4   92.7

The layer holds the int4 copy only (the issue's "weights held once"): wider batches (prefill chunks) run the
same kernel, which costs them up to ~1.6x the dense time at 32 rows; an AVX2-only CPU is ~20x slower than
float32 at batch 1 (``cpu_int4_is_fast`` below keeps ``auto`` off there).

The format is groupwise asymmetric, the layout of GGUF's Q4_1 (and Q4_0): per group of 32 input columns,
``w = scale * q + minimum`` with ``q`` in 0..15. Quantizing the dequantized weights of a Q4_0/Q4_1 checkpoint
finds its own codes again, so for such checkpoints the int4 path computes with the file's weights, up to the
rounding of ``scale`` and ``minimum`` to the activation dtype that the kernel requires.

A GGUF K-quant mix (Q4_K_M, Q5_K_M) brings its Q6_K and Q5_K matrices as int8 groups (int8_groups.py): such a
layer keeps the file's codes and scales as they are and multiplies with the C++ ``int8_group_matmul``
(cpu_int8_groups.py), so it keeps the precision the file chose and is held in about 1.1 bytes per weight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import LinearMethod, QuantConfig
from .cpu_int8_groups import int8_groups_fit, int8_groups_matmul, unify_int8_groups
from .dense import DENSE, DenseMethod
from .int4_groups import Int4Groups, cat_rows
from .int8_groups import Int8Groups

if TYPE_CHECKING:
    from ..layers.linear import Linear

INT4_GROUP_SIZE = 32
INT4_MAX_ROWS = 4  # the int8 head (GGUF Q8_0 layout) serves up to here; oneDNN's packed head above


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (codes [N, K] int32 in 0..15, scales_and_zeros [K / group_size, N, 2] float32).

    Round-to-nearest per group of ``group_size`` columns between the group's minimum and maximum. The
    scales_and_zeros layout is torch's int4 kernels': ``w = (q - 8) * scale + zero``, so ``zero = min + 8 * scale``.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features ({k}) must be a multiple of the group size ({group_size})")
    groups = weight.float().reshape(n, k // group_size, group_size)
    minimum = groups.amin(-1)
    scale = (groups.amax(-1) - minimum) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: q = 0 everywhere
    codes = torch.round((groups - minimum[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
    zero = minimum + 8 * scale
    scales_and_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()
    return codes.reshape(n, k), scales_and_zeros


def dequantize_int4(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`quantize_int4`: [N, K] float32 weights."""
    n, k = codes.shape
    num_groups = scales_and_zeros.shape[0]
    scale = scales_and_zeros[..., 0].t().float()[..., None]  # [N, groups, 1]
    zero = scales_and_zeros[..., 1].t().float()[..., None]
    return ((codes.reshape(n, num_groups, -1).float() - 8) * scale + zero).reshape(n, k)


INT8_CHUNK_ROWS = 1024  # quantize_int8_groups works on this many rows at a time (its float32 temporaries)


def quantize_int8_groups(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (codes [N, K] int8, scales [N, K / group_size] float32), ``w = q * scale`` per group: the
    layout of GGUF's Q8_0, whose own codes come back from its dequantized weights (the largest value of a Q8_0
    block is stored as +-127). For the C++ kernels ``int8_matmul`` / ``int8_group_matmul`` (kernels/cpu_ops.cpp).
    In chunks of rows: a vocabulary-sized head's float temporaries stay a few MiB, not several copies of it."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features ({k}) must be a multiple of the group size ({group_size})")
    codes = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, k // group_size, dtype=torch.float32, device=weight.device)
    for start in range(0, n, INT8_CHUNK_ROWS):
        rows = min(INT8_CHUNK_ROWS, n - start)
        groups = weight[start : start + rows].float().reshape(rows, k // group_size, group_size)
        scale = groups.abs().amax(-1) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes[start : start + rows] = torch.round(groups / scale[..., None]).clamp_(-127, 127).reshape(rows, k)
        scales[start : start + rows] = scale
    return codes, scales


INT4_EXACT_TOLERANCE = 0.125  # of a group's step: above a bf16 copy's rounding (~0.03), far below RTN's (~0.5)


def is_int4_exact(weight: torch.Tensor, codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> bool:
    """Whether the int4 groups ``(codes, scales_and_zeros)`` (from :func:`quantize_int4`) give ``weight`` back up to
    the rounding of its dtype: the weight was 4-bit groups already (a dequantized Q4_0/Q4_1 matrix), not more bits."""
    n = weight.shape[0]
    step = scales_and_zeros[..., 0].t().float()[..., None]  # [N, groups, 1]
    error = (dequantize_int4(codes, scales_and_zeros) - weight.float()).abs().reshape(n, -1, INT4_GROUP_SIZE)
    return bool((error <= INT4_EXACT_TOLERANCE * step + 1e-12).all())


def cpu_int4_is_fast() -> bool:
    """torch's CPU int4 matmul is vectorized for AVX-512 only: on an AVX2-only CPU it is ~20x slower than the float32
    matmul it replaces (bench/results/cpu_int4-amd-epyc-2c.json: 576x1536 at batch 1, 2.6 ms vs 0.11 ms; SmolLM2
    3.0 vs 16.0 tok/s)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def int4pack_fits(n: int, k: int, group_size: int) -> bool:
    """Whether torch's CPU int4 kernel takes an [N, K] weight in groups of ``group_size`` columns."""
    return n % 16 == 0 and group_size in (32, 64, 128, 256) and k % group_size == 0


class Int4CpuMethod(DenseMethod):
    """torch's int4-packed weight ([N, K / 2] uint8) and its scales_and_zeros ([K / 32, N, 2] in the activation
    dtype), from the file's own codes where the checkpoint gives them (a GGUF's Q4_K matrices, as
    :class:`Int4Groups`), else quantized from the dense weight (round to nearest).

    Nothing dense is allocated with the model (a placeholder carries the device and dtype), and each layer is
    packed as soon as its last shard is in: a layer whose matrices come as codes never holds a float copy, one that
    comes dense holds it only while it loads, so a load's peak is the int4 model plus one float layer. A layer that
    mixes codes and dense shards (a Q4_K_M file's q/k Q4_K beside a Q6_K v) is assembled dense. With
    ``lossless_only`` (a K-quant mix, where the file chose a higher precision for some layers) a dense layer is
    quantized only where its weights are 4-bit groups already (:func:`is_int4_exact`: a Q4_0/Q4_1 layer), so a
    Q6_K one keeps its precision; otherwise every dense layer is quantized. A layer whose in_features is not whole
    groups, or whose out_features the kernel does not take, stays dense.

    Layers whose shards all come as codes but not all as Q4_K (a Q6_K or Q5_K ffn_down; q/k Q4_K beside a Q6_K v)
    keep them as int8 groups (:func:`unify_int8_groups`: Q4_K's codes are int8 groups of 32 with offsets too),
    multiplied by the C++ ``int8_group_matmul``; where those kernels are not built they are assembled dense."""

    def __init__(self, lossless_only: bool = False) -> None:
        super().__init__()
        self.lossless_only = lossless_only
        self.int4_weight: torch.Tensor | None = None
        self.scales_and_zeros: torch.Tensor | None = None
        self.int8_groups: Int8Groups | None = None
        self.from_file_codes = False
        self.pending: dict[str, Int4Groups | Int8Groups] = {}  # shard -> its codes, until the layer is complete
        self.done = False

    def create_weights(self, layer: Linear) -> None:
        layer.add_weight("weight", torch.empty(0), DENSE)  # a placeholder: allocated on the first dense shard

    def takes_code_groups(self, layer: Linear, param: str) -> bool:
        return param == "weight" and not self.done

    def load_code_groups(self, layer: Linear, shard: str, groups: Int4Groups | Int8Groups) -> None:
        self.pending[shard] = groups

    def prepare_load(self, layer: Linear, param: str) -> None:
        if param == "weight" and self.done:
            raise ValueError("weight: loaded twice (the layer is complete already)")
        if param == "weight":
            self._dense_weight(layer)

    def after_load(self, layer: Linear) -> None:
        if not self.done and not [m for m in layer.missing() if m.endswith("weight")]:
            self.process_weights_after_loading(layer)  # now: the next layers' float weights are not held beside it

    def _dense_weight(self, layer: Linear) -> torch.Tensor:
        weight = layer.weight
        assert weight is not None
        if weight.numel() == 0:
            full = torch.empty(layer.out_features, layer.in_features, dtype=weight.dtype, device=weight.device)
            layer.weight = torch.nn.Parameter(full, requires_grad=False)
            return full
        return weight.data

    def process_weights_after_loading(self, layer: Linear) -> None:
        if self.done:
            return
        self.done = True
        weight = layer.weight
        assert weight is not None, "the weight is loaded before it is processed"
        on_cpu = weight.device.type == "cpu"
        fits = on_cpu and int4pack_fits(layer.out_features, layer.in_features, INT4_GROUP_SIZE)
        shards = sorted(layer.shard_offsets, key=lambda s: layer.shard_offsets[s][0])
        parts = [self.pending[s] for s in shards if s in self.pending]
        all_codes = weight.numel() == 0 and len(parts) == len(shards)
        all_int4 = all(isinstance(p, Int4Groups) for p in parts)
        if all_codes and not (fits and all_int4) and on_cpu and int8_groups_fit(layer.in_features):
            self.int8_groups = unify_int8_groups(parts)  # the file's codes as int8 groups: no dense copy
            self.from_file_codes = True
            self.pending.clear()
            layer.weight = None  # held once
            return
        if fits and all_codes and all_int4:
            groups = cat_rows([p for p in parts if isinstance(p, Int4Groups)])
            codes = groups.codes.to(torch.int32)
            zero = groups.minimum + 8 * groups.scale  # the kernel's w = (q - 8) * scale + zero
            scales_and_zeros = torch.stack([groups.scale.t(), zero.t()], dim=-1).contiguous()
            self.from_file_codes = True
            self._keep_int4(layer, codes, scales_and_zeros, weight.dtype)
            return
        had_codes = bool(self.pending)
        if had_codes:  # some or all shards as codes, but not kept so: write them into the dense weight
            dense = self._dense_weight(layer)
            for shard, part in self.pending.items():
                offset, size = layer.shard_offsets[shard]
                dense[offset : offset + size] = part.dense(dense.dtype)
            self.pending.clear()
        weight = layer.weight
        assert weight is not None
        if not fits or had_codes or layer.in_features % INT4_GROUP_SIZE:
            return  # dense (oneDNN-packed later, on the CPU)
        codes, scales_and_zeros = quantize_int4(weight.data)
        if self.lossless_only and not is_int4_exact(weight.data, codes, scales_and_zeros):
            return
        self._keep_int4(layer, codes, scales_and_zeros, weight.dtype)

    def _keep_int4(
        self, layer: Linear, codes: torch.Tensor, scales_and_zeros: torch.Tensor, dtype: torch.dtype
    ) -> None:
        self.int4_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.scales_and_zeros = scales_and_zeros.to(dtype)
        self.pending.clear()
        layer.weight = None  # held once

    def pack(self, layer: Linear) -> bool:
        return False if self.int4_weight is not None or self.int8_groups is not None else super().pack(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.int8_groups is not None:
            return int8_groups_matmul(x, self.int8_groups)
        if self.int4_weight is None:
            return super().apply(layer, x)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.int4_weight, INT4_GROUP_SIZE, self.scales_and_zeros)

    def describe(self) -> str:
        if self.int8_groups is not None:
            offsets = " with offsets" if self.int8_groups.offset is not None else ""
            return f"int8 groups of {self.int8_groups.group_size}{offsets} (file codes)"
        if self.int4_weight is not None:
            return "int4 (file codes)" if self.from_file_codes else "int4"
        return super().describe()


class Int4CpuConfig(QuantConfig):
    """``lossless_only``: layers that arrive dense become int4 only where nothing is lost (a GGUF K-quant mix: its
    Q6_K/Q5_K layers keep the precision the file chose); else every dense layer is quantized at load."""

    name = "int4"
    int8_head = True

    def __init__(self, lossless_only: bool = False) -> None:
        self.lossless_only = lossless_only

    def linear_method(self) -> LinearMethod:
        return Int4CpuMethod(self.lossless_only)

    def check_device(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"quantization int4 is a CPU path (torch's CPU int4 kernel); the device is {device.type}")
