"""int8 group linears on the CPU: a GGUF K-quant layer's codes and scales (int8_groups.py) multiplied as they are
by the C++ ``int8_group_matmul`` (kernels/cpu_quant_ops.cpp; its reference kernels/quant_reference.py).

Below ``GEMM_MIN_ROWS`` activation rows (decode batches) the kernel reads each weight once per 4 rows and decodes
it in registers: the step costs the weight bytes (1 + 4/G per weight instead of bf16's 2). From there on (prefill
chunks) it dequantizes 64 weight rows at a time into a float32 tile and multiplies it with one GEMM per tile: the
arithmetic is what costs there, and a GEMM does it at the machine's matmul rate, the tile's decode adding a pass
over K floats per 64 rows. The crossover, measured on one thread of a shared (noisy) 2-core EPYC with AVX-512,
SmolLM2's ffn_down shape 576 x 1536 in Q6_K groups of 16, float32 activations, median of 15 (us):

    rows           1     4     8    12    16    24    32    64   300
    registers     66   105   273   386   531   804  1064  2111 21657
    tiles+GEMM   130   239   321   377   465   616   793  1374  7059

about even at 12 rows; 16 leaves the decode batches the path that reads the fewest bytes.
"""

from __future__ import annotations

import torch

from ..kernels import cpu
from .int4_groups import Int4Groups
from .int8_groups import Int8Groups, cat_rows

GEMM_MIN_ROWS = 16  # from here on: dequantized tiles and a GEMM (see above)


def int8_groups_fit(in_features: int) -> bool:
    """Whether the C++ kernel is built here (else a layer holds its weight dense) and takes rows of this width."""
    return cpu.load() is not None and in_features % 16 == 0


def as_int8_groups(groups: Int4Groups | Int8Groups, group_size: int, with_offset: bool) -> Int8Groups:
    """The same numbers as int8 groups of ``group_size`` (a divisor of its own), with an offset tensor if asked:
    Q4_K's codes 0..15 are int8 codes too, its minimum the offset; splitting a group repeats its scale (exact)."""
    if isinstance(groups, Int4Groups):
        groups = Int8Groups(groups.codes.to(torch.int8), groups.scale, groups.minimum, 32)
    repeat = groups.group_size // group_size
    if groups.group_size % group_size:
        raise ValueError(f"groups of {groups.group_size} cannot be split into groups of {group_size}")
    scale = groups.scale.repeat_interleave(repeat, dim=1) if repeat > 1 else groups.scale
    offset = groups.offset
    if offset is None and with_offset:
        offset = torch.zeros_like(groups.scale)
    if offset is not None and repeat > 1:
        offset = offset.repeat_interleave(repeat, dim=1)
    return Int8Groups(groups.codes, scale, offset, group_size)


def unify_int8_groups(parts: list[Int4Groups | Int8Groups]) -> Int8Groups:
    """The shards of one merged layer (in row order) as one int8 group matrix: the smallest group size among them,
    offsets where any shard has them."""
    group_size = min(32 if isinstance(p, Int4Groups) else p.group_size for p in parts)
    with_offset = any(isinstance(p, Int4Groups) or p.offset is not None for p in parts)
    return cat_rows([as_int8_groups(p, group_size, with_offset) for p in parts])


def int8_groups_matmul(x: torch.Tensor, groups: Int8Groups, isa: int = 0) -> torch.Tensor:
    """x [M, K] @ W.T -> [M, N] in x's dtype (computed in float32). ``isa``: 0 the best this CPU has; 1 scalar,
    2 AVX2, 3 AVX-512 (tests force each path)."""
    kernels = cpu.load()
    assert kernels is not None, "int8 groups are only kept where the CPU kernels are built"
    y = kernels.int8_group_matmul(
        x.float(), groups.codes, groups.scale, groups.offset, groups.group_size, isa, GEMM_MIN_ROWS
    )
    return y if x.dtype == torch.float32 else y.to(x.dtype)
