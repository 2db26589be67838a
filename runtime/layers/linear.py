"""Linear layers whose weight representation is a quantization format's :class:`LinearMethod`
(quantization/base.py): plain, oneDNN-packed, int4, AWQ/GPTQ int4 groups, int8, fp8. The layer holds its weight
once, in the method's representation.

``MergedLinear``'s weight is several Hugging Face matrices stacked along the output dimension: q/k/v and
gate/up are fused so that one matmul serves them; ``load_shard`` copies one checkpoint matrix into its rows.

Tensor parallelism, for every format alike: a column-parallel shard holds rows [start, start + size) of its
checkpoint matrix (``shard_rows``), a row-parallel layer columns [start, start + in_features) (``input_slice``).
Each weight tensor's :class:`ParamLayout` says which of its dimensions follow the rows and the columns, and how
many logical rows/columns one element covers (8 for int4 packed in int32, the group size for group scales), so
the same slicing serves a plain matrix, packed codes and their scales and zeros.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quantization.base import LinearMethod, ParamLayout, QuantConfig
from ..quantization.cpu_int4 import (
    INT4_GROUP_SIZE,
    INT4_MAX_ROWS,
    dequantize_int4,
    quantize_int4,
    quantize_int8_groups,
)
from ..quantization.dense import DenseMethod, pack_weight, packed_linear
from ..quantization.int4_groups import CodeGroups, Int4Groups, Weight
from ..quantization.int8_groups import Int8Groups

__all__ = [
    "INT4_GROUP_SIZE",
    "INT4_MAX_ROWS",
    "Linear",
    "MergedLinear",
    "dequantize_int4",
    "pack_weight",
    "packed_linear",
    "quantize_int4",
    "quantize_int8_groups",
]

BIAS = ParamLayout(out_dim=0, in_dim=None)


def _narrow(tensor: torch.Tensor, dim: int, start: int, size: int, pack: int, what: str) -> torch.Tensor:
    if start % pack or size % pack:
        raise ValueError(
            f"{what}: the slice [{start}, {start + size}) is not whole units of {pack} (packed values or a "
            "quantization group): tensor parallelism must split this layer at multiples of it"
        )
    return tensor.narrow(dim, start // pack, size // pack)


class Linear(nn.Module):
    """y = x @ W.T (+ b), W in the representation of ``quant``'s method (default: a plain matrix).

    ``input_slice`` (start, checkpoint in_features): this layer holds columns [start, start + in_features) of the
    checkpoint's matrix, a row-parallel shard (its caller all-reduces the partial outputs). ``names``: the Hugging
    Face module names of the checkpoint matrices it holds (a format may leave some unquantized)."""

    weight: nn.Parameter | None  # the dense methods' [N, K] (None once packed or quantized; absent for AWQ/GPTQ)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        input_slice: tuple[int, int] | None = None,
        quant: QuantConfig | None = None,
        names: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.input_slice = input_slice or (0, in_features)
        # shard -> (first output row in this layer, rows); shard -> (first row in the checkpoint matrix, its rows)
        self.shard_offsets: dict[str, tuple[int, int]] = {"": (0, out_features)}
        self.shard_rows: dict[str, tuple[int, int]] = {"": (0, out_features)}
        self.layouts: dict[str, ParamLayout] = {}
        method = quant.linear_method_for(names) if quant is not None else None
        self.method: LinearMethod = method if method is not None else DenseMethod()
        self.method.create_weights(self)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        if bias:
            self.layouts["bias"] = BIAS
        self.loaded: set[tuple[str, str]] = set()  # (shard, param) pairs copied in

    def add_weight(self, name: str, tensor: torch.Tensor, layout: ParamLayout) -> None:
        """For methods: register a checkpoint tensor of this layer (its whole merged, sharded shape)."""
        self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
        self.layouts[name] = layout

    def tensor(self, name: str) -> torch.Tensor:
        """For methods: the loaded data of the checkpoint tensor ``name``."""
        param = self._parameters.get(name)
        if param is None:
            raise ValueError(f"{name} is not loaded (or already repacked) in this layer")
        return param.data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        return y if self.bias is None else y + self.bias

    # ---- loading -------------------------------------------------------------------------------------------
    def load_weight(self, param: str, tensor: Weight) -> None:
        """Copy the checkpoint's ``param`` ("weight", "bias", "qweight", "scales", ...), the whole matrix's
        tensor, into this layer's slice of it."""
        self._load("", param, tensor)

    def _load(self, shard: str, param: str, tensor: Weight) -> None:
        if isinstance(tensor, CodeGroups):
            if self.method.takes_code_groups(self, param):
                self.method.load_code_groups(self, shard, self._slice_groups(shard, param, tensor))
                self.loaded.add((shard, param))
                self.method.after_load(self)
                return
            target = self._parameters.get(param)
            tensor = tensor.dense(target.dtype if target is not None else torch.float32)
        self.method.prepare_load(self, param)
        tensor = self.method.checkpoint_tensor(self, shard, param, tensor)
        layout = self.layouts.get(param)
        if layout is None:
            if self.method.ignores(self, param, tensor):
                return
            if param == "bias":
                raise ValueError("bias: the checkpoint has a bias but the model was configured without one")
            raise ValueError(f"{param}: not a tensor of this layer's format, which has {sorted(self.layouts)}")
        target = getattr(self, param)
        offset, size = self.shard_offsets[shard]
        start, full_rows = self.shard_rows[shard]
        in_start, full_in = self.input_slice
        expected = list(target.shape)
        if layout.out_dim is not None:
            expected[layout.out_dim] = full_rows // layout.out_pack
        if layout.in_dim is not None:
            expected[layout.in_dim] = full_in // layout.in_pack
        if list(tensor.shape) != expected:
            raise ValueError(f"{param}: checkpoint has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
        dst = target.data
        if layout.out_dim is not None:
            tensor = _narrow(tensor, layout.out_dim, start, size, layout.out_pack, param)
            dst = _narrow(dst, layout.out_dim, offset, size, layout.out_pack, param)
        if layout.in_dim is not None and self.in_features != full_in:
            tensor = _narrow(tensor, layout.in_dim, in_start, self.in_features, layout.in_pack, param)
        shared = layout.out_dim is None and any(p == param for _, p in self.loaded)
        # one tensor for all the merged shards (GPTQ's g_idx: q/k/v share their input, so their act order)
        if shared and not torch.equal(dst, tensor.to(dst.dtype)):
            raise ValueError(f"{param}: differs between the shards merged into one layer ({list(self.shard_rows)})")
        dst.copy_(tensor)
        self.loaded.add((shard, param))
        self.method.after_load(self)

    def _slice_groups(self, shard: str, param: str, groups: Int4Groups | Int8Groups) -> Int4Groups | Int8Groups:
        """This layer's rows and columns of a whole checkpoint matrix given as its file's codes."""
        start, full_rows = self.shard_rows[shard]
        size = self.shard_offsets[shard][1]
        in_start, full_in = self.input_slice
        if tuple(groups.shape) != (full_rows, full_in):
            raise ValueError(f"{param}: checkpoint has shape {tuple(groups.shape)}, expected {(full_rows, full_in)}")
        groups = groups.narrow(0, start, size)
        if self.in_features != full_in:
            try:
                groups = groups.narrow(1, in_start, self.in_features)
            except ValueError as e:
                raise ValueError(f"{param}: {e}: tensor parallelism must split this layer at multiples of it") from None
        return groups

    def missing(self) -> list[str]:
        """The checkpoint tensors not loaded yet, as "shard.param" ("param" for an unmerged layer)."""
        return [
            f"{shard}.{param}" if shard else param
            for shard in self.shard_offsets
            for param in self.layouts
            if (shard, param) not in self.loaded
        ]

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def pack(self) -> bool:
        """oneDNN's packed layout instead of the plain weight (CPU, dense methods); False where it does not apply."""
        pack = getattr(self.method, "pack", None)
        return bool(pack(self)) if pack is not None else False

    def extra_repr(self) -> str:
        extra = self.method.describe()
        extra = f", {extra}" if extra else ""
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
        quant: QuantConfig | None = None,
        names: tuple[str, ...] = (),
    ) -> None:
        offsets: dict[str, tuple[int, int]] = {}
        total = 0
        for name, size in shard_sizes.items():
            offsets[name] = (total, size)
            total += size
        super().__init__(in_features, total, bias, quant=quant, names=names)
        self.shard_offsets = offsets
        self.shard_rows = {name: (shard_rows or {}).get(name, (0, size)) for name, size in shard_sizes.items()}

    def load_shard(self, shard: str, param: str, tensor: Weight) -> None:
        """Copy the checkpoint tensor for ``shard`` ("q", "gate", ...) into ``param`` ("weight", "qweight", ...)."""
        try:
            self._load(shard, param, tensor)
        except ValueError as e:
            raise ValueError(f"{shard}_proj.{e}") from None  # "q_proj.qweight: ..."
