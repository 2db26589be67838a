"""GPTQ checkpoints (AutoGPTQ / GPTQModel), ``quantization_config`` ``{"quant_method": "gptq", "bits": 4,
"group_size": 128, "sym": true, "desc_act": false}`` (``checkpoint_format`` "gptq", v1, by default).

Per linear (K in, N out, G = K / group_size, or 1 with group_size -1)::

    qweight [K / 8, N] int32   nibble j of word [r, n] = code of row 8r + j       (already our W4A16 layout)
    qzeros  [G, N / 8] int32   nibble i of word [g, c] = zero of column 8c + i, stored minus 1 in v1 files
    scales  [G, N]     float16
    g_idx   [K]        int32   each row's group: k // group_size, or a permutation's with desc_act (act order)
    W[k, n] = (code - zero[g_idx[k], n]) * scale[g_idx[k], n]

``sym``: the zero point is 8 everywhere (stored 7); both are read the same way. With ``desc_act`` a row-parallel
shard's rows span any groups, so scales and zeros are loaded whole (replicated) and g_idx sliced; so too with
group_size -1. GPTQ files carry a bias for every linear (zeros where the model has none): accepted if zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..kernels.quant_reference import unpack_int4_cols
from .base import LinearMethod, ParamLayout, QuantConfig
from .w4 import W4Method, W4Weights, check_bits, check_unconverted, read_group_size

if TYPE_CHECKING:
    from ..layers.linear import Linear

CHECKPOINT_FORMATS = {"gptq": 1, "gptq_v2": 0}  # -> the offset added to the stored zero points


class GPTQConfig(QuantConfig):
    name = "gptq"
    from_checkpoint = True

    def __init__(self, group_size: int = 128, desc_act: bool = False, sym: bool = True, zero_offset: int = 1) -> None:
        self.group_size = group_size
        self.desc_act = desc_act
        self.sym = sym
        self.zero_offset = zero_offset

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> GPTQConfig:
        check_bits(qc, "gptq")
        check_unconverted(qc, "gptq")
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"config field 'quantization_config.checkpoint_format' is {fmt!r} "
                f"(supported: {', '.join(CHECKPOINT_FORMATS)})"
            )
        for key in ("desc_act", "sym"):
            if not isinstance(qc.get(key, False), bool):
                raise ValueError(f"config field 'quantization_config.{key}' must be true or false, got {qc[key]!r}")
        group_size = read_group_size(qc, "group_size", allow_whole=True)
        return cls(group_size, bool(qc.get("desc_act", False)), bool(qc.get("sym", True)), CHECKPOINT_FORMATS[fmt])

    def linear_method(self) -> LinearMethod:
        return GPTQMethod(self)


class GPTQMethod(W4Method):
    def __init__(self, config: GPTQConfig) -> None:
        super().__init__()
        self.config = config
        self.group_size = config.group_size

    def create_weights(self, layer: Linear) -> None:
        k, n = layer.in_features, layer.out_features
        full_k = layer.input_slice[1]
        g = full_k if self.config.group_size == -1 else self.config.group_size
        self.group_size = g
        # act order or a single group: every shard needs all groups' scales (loaded whole, not sliced by rows)
        replicated = self.config.desc_act or self.config.group_size == -1
        if k % 8 or n % 8 or (not replicated and k % g):
            raise ValueError(
                f"gptq: a linear of in_features {k} and out_features {n} does not fit group_size {g} and the 8 "
                "values of a packed word (with tensor parallelism: this rank's slice)"
            )
        num_groups = -(-full_k // g) if replicated else k // g
        group_layout = ParamLayout(1, None) if replicated else ParamLayout(1, 0, in_pack=g)
        zero_layout = ParamLayout(1, None, out_pack=8) if replicated else ParamLayout(1, 0, 8, g)
        layer.add_weight("qweight", torch.empty(k // 8, n, dtype=torch.int32), ParamLayout(1, 0, in_pack=8))
        layer.add_weight("qzeros", torch.empty(num_groups, n // 8, dtype=torch.int32), zero_layout)
        layer.add_weight("scales", torch.empty(num_groups, n), group_layout)
        if self.config.desc_act:
            layer.add_weight("g_idx", torch.empty(k, dtype=torch.int32), ParamLayout(None, 0))

    def ignores(self, layer: Linear, param: str, tensor: torch.Tensor) -> bool:
        if param == "g_idx":
            return True  # without act order the rows' groups are k // group_size (the file's g_idx says the same)
        if param == "bias":
            if bool(tensor.any()):
                raise ValueError("gptq: the checkpoint has a nonzero bias but the model was configured without one")
            return True
        return False

    def repack(self, layer: Linear) -> W4Weights:
        zeros = unpack_int4_cols(layer.tensor("qzeros")).to(torch.int16) + self.config.zero_offset  # [G, N]
        g_idx = layer.tensor("g_idx") if self.config.desc_act else None
        return W4Weights(layer.tensor("qweight"), layer.tensor("scales"), zeros.to(torch.uint8), self.group_size, g_idx)
