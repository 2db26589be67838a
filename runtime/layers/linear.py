"""Linear layers, with CPU fast paths: a oneDNN-packed weight, and an int4 weight-only copy for small batches.

``MergedLinear``'s weight is several Hugging Face matrices stacked along the output dimension: q/k/v and
gate/up are fused so that one matmul serves them; ``load_shard`` copies one checkpoint matrix into its rows.

Why int4 on the CPU: a decode step at batch 1 reads every weight once, so its time is the weight bytes over
the memory bandwidth. torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) reads a quarter of bf16's
bytes. Measured on a 2-core EPYC, all 30 SmolLM2 layers streamed from memory (not from cache):

    rows (tokens)       1      4      8     16     32
    bf16 (ms)          17.0   28.8   30.3   47.7   56.8
    int4 (ms)           6.9   11.4   18.2   40.4   92.7

The dense bf16/float32 matmul goes through oneDNN, which reorders a plain weight into its blocked layout on
every call; ``pack`` does that once (``torch.ops.mkldnn._reorder_linear_weight``, the layout torch.compile's CPU
backend prepacks to). Packed, the 30 layers take 12.2 / 23.5 / 42.3 ms at 8 / 32 / 64 rows instead of
19.7 / 35.6 / 59.7 (same machine, streamed), and int4 stays ahead only up to ``INT4_MAX_ROWS`` rows, where it
reads a quarter of the bytes. The plain weight stays too (loading, the fallback path): the CPU path holds each
weight twice, plus the int4 copy.

The format is groupwise asymmetric, the layout of GGUF's Q4_1 (and Q4_0): per group of 32 input columns,
``w = scale * q + minimum`` with ``q`` in 0..15. Quantizing the dequantized weights of a Q4_0/Q4_1 checkpoint
finds its own codes again, so for such checkpoints the int4 path computes with the file's weights, up to the
rounding of ``scale`` and ``minimum`` to the activation dtype that the kernel requires.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZE = 32
INT4_MAX_ROWS = 4  # int4 up to here; the packed dense weight above (measured crossover: 4-6 rows)
PACK_BATCH_HINT = 32  # the row count oneDNN tunes the packed layout for (decode batches)


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


def quantize_int8_groups(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (codes [N, K] int8, scales [N, K / group_size] float32), ``w = q * scale`` per group: the
    layout of GGUF's Q8_0, whose own codes come back from its dequantized weights (the largest value of a Q8_0
    block is stored as +-127). For the C++ kernel ``int8_matmul`` (kernels/cpu_ops.cpp)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features ({k}) must be a multiple of the group size ({group_size})")
    groups = weight.float().reshape(n, k // group_size, group_size)
    scale = groups.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(groups / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return codes.reshape(n, k).contiguous(), scale.contiguous()


def dequantize_int4(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`quantize_int4`: [N, K] float32 weights."""
    n, k = codes.shape
    num_groups = scales_and_zeros.shape[0]
    scale = scales_and_zeros[..., 0].t().float()[..., None]  # [N, groups, 1]
    zero = scales_and_zeros[..., 1].t().float()[..., None]
    return ((codes.reshape(n, num_groups, -1).float() - 8) * scale + zero).reshape(n, k)


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """[N, K] CPU weight -> oneDNN's packed copy for ``torch.ops.mkldnn._linear_pointwise``, or None if unsupported."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
    except RuntimeError:
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ W.T with W packed by :func:`pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


class Linear(nn.Module):
    """y = x @ W.T (+ b). After :meth:`quantize_int4`, inputs of at most ``INT4_MAX_ROWS`` rows use the int4 copy.

    ``input_slice`` (start, checkpoint in_features): this layer holds columns [start, start + in_features) of the
    checkpoint's matrix, a row-parallel shard (its caller all-reduces the partial outputs)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, *, input_slice: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.input_slice = input_slice or (0, in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.int4_weight: torch.Tensor | None = None  # [N, K / 2] uint8, torch's packed layout
        self.int4_scales_and_zeros: torch.Tensor | None = None  # [K / group, N, 2] in the weight's dtype
        self.packed_weight: torch.Tensor | None = None  # oneDNN's blocked layout (an opaque mkldnn tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4_weight is not None and x.shape[0] <= INT4_MAX_ROWS and x.dim() == 2:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x, self.int4_weight, INT4_GROUP_SIZE, self.int4_scales_and_zeros
            )
            return y if self.bias is None else y + self.bias
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def load_weight(self, param: str, tensor: torch.Tensor) -> None:
        """Copy the checkpoint's ``param`` ("weight" or "bias"), the whole matrix, into this layer's slice of it."""
        target = self.weight if param == "weight" else self.bias
        start, full_in = self.input_slice
        expected = (self.out_features, full_in) if param == "weight" else (self.out_features,)
        if target is None or tuple(tensor.shape) != expected:
            got = tuple(tensor.shape) if target is not None else "a bias, but the layer has none"
            raise ValueError(f"{param}: checkpoint has {got}, expected {expected}")
        if param == "weight" and self.in_features != full_in:
            tensor = tensor.narrow(1, start, self.in_features)
        target.data.copy_(tensor)

    def pack(self) -> bool:
        """Add the oneDNN-packed copy (CPU). False where oneDNN cannot take this dtype on this CPU (float16
        without avx512_fp16, say): the plain path serves then."""
        self.packed_weight = pack_weight(self.weight.data)
        return self.packed_weight is not None

    def quantize_int4(self) -> bool:
        """Add the int4 copy (CPU only; the dense weight stays for large batches). False if the shape does not fit."""
        if self.weight.device.type != "cpu" or self.in_features % INT4_GROUP_SIZE:
            return False
        codes, scales_and_zeros = quantize_int4(self.weight.data)
        self.int4_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.int4_scales_and_zeros = scales_and_zeros.to(self.weight.dtype)
        return True

    def extra_repr(self) -> str:
        extra = (", packed" if self.packed_weight is not None else "") + (
            ", int4" if self.int4_weight is not None else ""
        )
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{extra}"


class MergedLinear(Linear):
    """A Linear whose W = cat([W_shard for shard in shards]) along the output rows.

    ``shard_rows[name]`` (start, checkpoint rows): the shard holds rows [start, start + size) of its checkpoint
    matrix, a column-parallel slice (tensor parallelism: this rank's heads, its part of the intermediate size)."""

    def __init__(
        self,
        in_features: int,
        shard_sizes: dict[str, int],
        bias: bool = False,
        *,
        shard_rows: dict[str, tuple[int, int]] | None = None,
    ) -> None:
        offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, size in shard_sizes.items():
            offsets[name] = (total, size)
            total += size
        super().__init__(in_features, total, bias)
        self.shard_offsets = offsets
        self.shard_rows = {name: (shard_rows or {}).get(name, (0, size)) for name, size in shard_sizes.items()}

    def load_shard(self, shard: str, param: str, tensor: torch.Tensor) -> None:
        """Copy the checkpoint tensor for ``shard`` ("q", "gate", ...) into ``param`` ("weight" or "bias")."""
        offset, size = self.shard_offsets[shard]
        target = self.weight if param == "weight" else self.bias
        if target is None:
            raise ValueError(f"checkpoint has a {shard} bias but the model was configured without attention_bias")
        start, rows = self.shard_rows[shard]
        expected = (rows, self.in_features) if param == "weight" else (rows,)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{shard}_proj.{param} has shape {tuple(tensor.shape)}, expected {expected}")
        target.data[offset : offset + size].copy_(tensor.narrow(0, start, size))
