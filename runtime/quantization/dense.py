"""The unquantized format: a plain ``[out_features, in_features]`` weight; on the CPU, oneDNN's packed copy of it
replaces it (``pack``), so the layer still holds its weight once.

The dense bf16/float32 matmul goes through oneDNN, which reorders a plain weight into its blocked layout on
every call; ``pack`` does that once (``torch.ops.mkldnn._reorder_linear_weight``, the layout torch.compile's CPU
backend prepacks to). Packed, SmolLM2's 30 layers take 12.2 / 23.5 / 42.3 ms at 8 / 32 / 64 rows instead of
19.7 / 35.6 / 59.7 (2-core EPYC, weights streamed from memory). The plain weight is dropped once packed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .base import LinearMethod, ParamLayout, QuantConfig

if TYPE_CHECKING:
    from ..layers.linear import Linear

PACK_BATCH_HINT = 32  # the row count oneDNN tunes the packed layout for (decode batches)
DENSE = ParamLayout(out_dim=0, in_dim=1)  # weight [N, K]


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """[N, K] CPU weight -> oneDNN's packed copy for ``torch.ops.mkldnn._linear_pointwise``, or None if unsupported."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
    except RuntimeError:
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ bias) with W packed by :func:`pack_weight`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class DenseMethod(LinearMethod):
    """``weight`` [N, K] in the model's dtype; after :meth:`pack`, oneDNN's blocked copy instead."""

    def __init__(self) -> None:
        self.packed: torch.Tensor | None = None  # oneDNN's blocked layout (an opaque mkldnn tensor)

    def create_weights(self, layer: Linear) -> None:
        layer.add_weight("weight", torch.empty(layer.out_features, layer.in_features), DENSE)

    def pack(self, layer: Linear) -> bool:
        """Replace the plain weight by oneDNN's packed copy (CPU). False where oneDNN cannot take this dtype on this
        CPU (float16 without avx512_fp16, bf16 without avx512_bf16): the plain weight serves then."""
        weight = getattr(layer, "weight", None)
        if self.packed is not None:
            return True
        if weight is None:
            return False
        self.packed = pack_weight(weight.data)
        if self.packed is None:
            return False
        layer.weight = None  # held once: the packed copy is the weight now
        return True

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed)
        assert layer.weight is not None
        return F.linear(x, layer.weight)

    def describe(self) -> str:
        return "packed" if self.packed is not None else ""


class DenseConfig(QuantConfig):
    name = "none"

    def linear_method(self) -> LinearMethod:
        return DenseMethod()
