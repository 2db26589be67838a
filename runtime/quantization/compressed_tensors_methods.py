"""The linear methods of compressed-tensors checkpoints (compressed_tensors.py reads the config), in the tensor
names and layouts of the ``compressed-tensors`` library's compressors. FP8 (``float-quantized``) files have the
names of fp8 checkpoints and are read by fp8_checkpoint.py's methods.

``pack-quantized`` (W4A16), per linear (K in, N out, G = K / group_size, 1 for the channel strategy)::

    weight_packed      [N, K / 8] int32   nibble i of word [n, c] = column 8c + i, stored q + 8 (q signed, -8..7)
    weight_scale       [N, G]     float16 / bf16
    weight_zero_point  [N / 8, G] int32   asymmetric only: packed along N (nibble i of word [r, g] = row 8r + i),
                                          stored z + 8
    weight_shape       [2]        int     the unpacked [N, K]
    W[n, k] = (q[n, k] - z[n, k // group_size]) * scale[n, k // group_size]

Repacked at load into the W4A16 layout (quantization/w4.py): the stored nibbles q + 8 are its unsigned codes and
z + 8 (8 when symmetric) its zero points, so ``(code - zero) * scale`` is the same product.

``int-quantized`` (W8A8-INT8): ``weight [N, K] int8``, ``weight_scale`` [N, 1] (channel) or [1] (tensor),
``W = weight * scale``: served by online int8's method (online.py), activations kept in the model's dtype (its
kernels are weight-only: the dequantized model exactly, not the checkpoint's per-token activation rounding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..kernels.quant_reference import pack_int4_rows, unpack_int4_cols, unpack_int4_rows
from .base import ParamLayout
from .checkpoint_params import ROW_SCALE, LazyParams, drop, row_scale
from .dense import DENSE
from .online import Int8Method
from .w4 import W4Method, W4Weights

if TYPE_CHECKING:
    from ..layers.linear import Linear

SIGNED_OFFSET = 8  # compressed-tensors stores a signed 4-bit value q as the nibble q + 8


class PackedW4Method(W4Method):
    """``group_size`` None: the channel strategy (one group over the whole input)."""

    def __init__(self, group_size: int | None, symmetric: bool) -> None:
        super().__init__()
        self.config_group_size = group_size
        self.symmetric = symmetric
        self.group_size = group_size or 0

    def create_weights(self, layer: Linear) -> None:
        k, n, full_k = layer.in_features, layer.out_features, layer.input_slice[1]
        whole = self.config_group_size is None
        g = self.group_size = full_k if whole else int(self.config_group_size or 0)
        if k % 8 or (not whole and k % g) or (not self.symmetric and n % 8):
            raise ValueError(
                f"compressed-tensors pack-quantized: a linear of in_features {k} and out_features {n} does not fit "
                f"group_size {g} and the 8 values of a packed word (with tensor parallelism: this rank's slice)"
            )
        num_groups = 1 if whole else k // g
        # the channel strategy: one scale per row over the whole input, so a row-parallel shard loads it whole
        group_layout = ParamLayout(0, None) if whole else ParamLayout(0, 1, in_pack=g)
        layer.add_weight("weight_packed", torch.empty(n, k // 8, dtype=torch.int32), ParamLayout(0, 1, in_pack=8))
        layer.add_weight("weight_scale", torch.empty(n, num_groups), group_layout)
        if not self.symmetric:
            zero_layout = ParamLayout(0, None, out_pack=8) if whole else ParamLayout(0, 1, out_pack=8, in_pack=g)
            layer.add_weight("weight_zero_point", torch.empty(n // 8, num_groups, dtype=torch.int32), zero_layout)

    def ignores(self, layer: Linear, param: str, tensor: torch.Tensor) -> bool:
        if param != "weight_shape":
            return False
        rows = sorted(r for _, r in layer.shard_rows.values())
        shape = [int(v) for v in tensor.reshape(-1).tolist()]
        if len(shape) != 2 or shape[1] != layer.input_slice[1] or shape[0] not in rows:
            k = layer.input_slice[1]
            raise ValueError(f"weight_shape: {shape} is not this layer's [N, K] (N one of {rows}, K {k})")
        return True  # the shape is the layer's own (K is a multiple of 8 here: no padding to strip)

    def repack(self, layer: Linear) -> W4Weights:
        codes = unpack_int4_cols(layer.tensor("weight_packed"))  # [N, K] the stored q + 8
        scales = layer.tensor("weight_scale").t().contiguous()  # [G, N]
        if self.symmetric:
            zeros = torch.full(scales.shape, SIGNED_OFFSET, dtype=torch.uint8, device=codes.device)
        else:
            zeros = unpack_int4_rows(layer.tensor("weight_zero_point")).t().contiguous()  # [G, N] the stored z + 8
        return W4Weights(pack_int4_rows(codes.t().contiguous()), scales, zeros, self.group_size, None)


class Int8CheckpointMethod(Int8Method):
    """``weight`` int8 [N, K] and its per-channel or per-tensor ``weight_scale``, loaded as they are."""

    def __init__(self) -> None:
        super().__init__()
        self.params = LazyParams()

    def create_weights(self, layer: Linear) -> None:
        n, k = layer.out_features, layer.in_features
        self.params.add(layer, "weight", (n, k), torch.int8, DENSE)
        self.params.add(layer, "weight_scale", (n,), torch.float32, ROW_SCALE)

    def prepare_load(self, layer: Linear, param: str) -> None:
        self.params.allocate(layer, param)

    def checkpoint_tensor(self, layer: Linear, shard: str, param: str, tensor: torch.Tensor) -> torch.Tensor:
        if param == "weight" and tensor.dtype != torch.int8:
            raise ValueError(f"weight: checkpoint dtype is {tensor.dtype}, expected int8 (the format's codes)")
        return row_scale(layer, shard, param, tensor) if param == "weight_scale" else tensor

    def ignores(self, layer: Linear, param: str, tensor: torch.Tensor) -> bool:
        if param == "weight_zero_point":  # symmetric files may store the zeros
            if bool(tensor.any()):
                raise ValueError("weight_zero_point: nonzero, but the config's weights are symmetric")
            return True
        return False

    def after_load(self, layer: Linear) -> None:
        pass  # nothing to quantize: the file's codes are kept

    def process_weights_after_loading(self, layer: Linear) -> None:
        self.codes = layer.tensor("weight")
        self.scale = layer.tensor("weight_scale")
        drop(layer)
        self.prepare_kernels(layer)

    def describe(self) -> str:
        return "int8 checkpoint" if self.codes is not None else ""
