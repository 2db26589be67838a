"""AWQ checkpoints (AutoAWQ's GEMM packing), ``quantization_config`` ``{"quant_method": "awq", "bits": 4,
"group_size": 128, "zero_point": true, "version": "gemm"}``.

Per linear (K in, N out, G = K / group_size)::

    qweight [K, N / 8] int32   nibble i of word [k, c] = code of column 8c + AWQ_ORDER[i]   (AWQ's interleave)
    qzeros  [G, N / 8] int32   the same packing of the zero points
    scales  [G, N]     float16
    W[k, n] = (code - zero[k // group_size, n]) * scale[k // group_size, n]

At load the codes are unpacked and repacked along K (quantization/w4.py's layout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..kernels.quant_reference import pack_int4_rows, unpack_int4_cols
from .base import LinearMethod, ParamLayout, QuantConfig
from .w4 import W4Method, W4Weights, check_bits, check_unconverted, read_group_size

if TYPE_CHECKING:
    from ..layers.linear import Linear

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack order: nibble i holds column AWQ_ORDER[i] of the word's 8


class AWQConfig(QuantConfig):
    name = "awq"
    from_checkpoint = True

    def __init__(self, group_size: int = 128) -> None:
        self.group_size = group_size

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> AWQConfig:
        check_bits(qc, "awq")
        check_unconverted(qc, "awq")
        if not qc.get("zero_point", True):
            raise ValueError(
                "config field 'quantization_config.zero_point' is false: awq is supported with zero points"
            )
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(
                f"config field 'quantization_config.version' is {version!r}: awq is supported in the gemm packing"
            )
        return cls(read_group_size(qc, "group_size", "q_group_size"))

    def linear_method(self) -> LinearMethod:
        return AWQMethod(self.group_size)


class AWQMethod(W4Method):
    def __init__(self, group_size: int) -> None:
        super().__init__()
        self.group_size = group_size

    def create_weights(self, layer: Linear) -> None:
        k, n, g = layer.in_features, layer.out_features, self.group_size
        if k % g or n % 8:
            raise ValueError(
                f"awq: a linear of in_features {k} and out_features {n} does not fit group_size {g} and the 8 "
                "columns of a packed word (with tensor parallelism: this rank's slice)"
            )
        layer.add_weight("qweight", torch.empty(k, n // 8, dtype=torch.int32), ParamLayout(1, 0, out_pack=8))
        layer.add_weight("qzeros", torch.empty(k // g, n // 8, dtype=torch.int32), ParamLayout(1, 0, 8, g))
        layer.add_weight("scales", torch.empty(k // g, n), ParamLayout(1, 0, in_pack=g))

    def repack(self, layer: Linear) -> W4Weights:
        codes = unpack_int4_cols(layer.tensor("qweight"), AWQ_ORDER)  # [K, N]
        zeros = unpack_int4_cols(layer.tensor("qzeros"), AWQ_ORDER)  # [G, N]
        return W4Weights(pack_int4_rows(codes), layer.tensor("scales"), zeros, self.group_size, None)
