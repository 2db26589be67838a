"""Checkpoint tensors kept in their own dtype, and per-tensor scales held per output row: shared by the 8-bit
checkpoint formats (fp8_checkpoint.py, compressed_tensors.py).

Why lazy: the model is built on the meta device and cast to its dtype as a whole (``model.to(dtype)``), which
would turn an fp8 weight or a float32 scale into bf16. A tensor registered here is an empty placeholder until
its first shard arrives (:meth:`LazyParams.allocate`), then allocated in its own dtype on the placeholder's
device, so an fp8 weight is held as fp8 and a scale as float32.

Why per row: an FP8 file stores one scale per checkpoint matrix (``[]`` or ``[1]``), but q/k/v (gate/up) are
one merged layer here, each shard with its own scale. vLLM requantizes the shards to their largest scale (one
rounding more, so the served weights are not the file's); we keep each shard's scale exactly by repeating it
over the shard's rows: a per-channel scale ``[N]``, which the fp8 and int8 kernels take anyway (row-wise
``_scaled_mm``, torch's int8 matmul). A per-channel file's ``[N, 1]`` becomes ``[N]`` too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .base import ParamLayout

if TYPE_CHECKING:
    from ..layers.linear import Linear

ROW_SCALE = ParamLayout(out_dim=0, in_dim=None)  # [N]: one scale per output row, whole along the input


@dataclass(frozen=True)
class _Spec:
    shape: tuple[int, ...]
    dtype: torch.dtype


class LazyParams:
    """The checkpoint tensors of one layer that are allocated on their first shard, in their own dtype."""

    def __init__(self) -> None:
        self.specs: dict[str, _Spec] = {}

    def add(self, layer: Linear, name: str, shape: tuple[int, ...], dtype: torch.dtype, layout: ParamLayout) -> None:
        layer.add_weight(name, torch.empty(0), layout)  # a placeholder: carries the device only
        self.specs[name] = _Spec(shape, dtype)

    def allocate(self, layer: Linear, param: str) -> None:
        spec = self.specs.get(param)
        current = layer._parameters.get(param)
        if spec is None or current is None or current.numel() > 0:
            return
        tensor = torch.empty(spec.shape, dtype=spec.dtype, device=current.device)
        layer._parameters[param] = torch.nn.Parameter(tensor, requires_grad=False)


def row_scale(layer: Linear, shard: str, param: str, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint scale of one shard as ``[rows]`` float32: a per-tensor one (``[]``, ``[1]``) repeated over the
    shard's checkpoint rows, a per-channel one (``[rows]``, ``[rows, 1]``) flattened; else ValueError naming it."""
    rows = layer.shard_rows[shard][1]
    if tensor.numel() == 1:
        return tensor.reshape(1).to(torch.float32).expand(rows)
    if tensor.dim() in (1, 2) and tensor.shape[0] == rows and tensor.numel() == rows:
        return tensor.reshape(rows).to(torch.float32)
    raise ValueError(
        f"{param}: checkpoint has shape {tuple(tensor.shape)}: expected a per-tensor scale ([] or [1]) or one per "
        f"output channel ([{rows}] or [{rows}, 1])"
    )


def drop(layer: Linear) -> None:
    """The layer's checkpoint tensors are converted: hold them once (the method's copy is the weight now)."""
    for name in layer.layouts:
        if name != "bias":
            setattr(layer, name, None)


def module_matches(pattern: str, name: str) -> bool:
    """compressed-tensors' module matching (vLLM's too): "re:" a regex (``re.match``), "Linear" any linear, else
    a module name, whole or its tail (``lm_head``, ``model.layers.0.mlp.down_proj``)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == "Linear" or name == pattern or name.endswith("." + pattern)


def is_quantized(names: tuple[str, ...], quantized: Callable[[str], bool], fields: str) -> bool:
    """Whether the linear holding the checkpoint matrices ``names`` is quantized (True where ``names`` is unknown);
    ValueError naming ``fields`` when its merged shards (q/k/v, gate/up) disagree: one layer has one format."""
    flags = {name: quantized(name) for name in names}
    if len(set(flags.values())) > 1:
        plain = [n for n, q in flags.items() if not q]
        raise ValueError(
            f"config fields {fields} leave {plain} unquantized but not the rest of {list(flags)}: matrices merged "
            "into one layer must be quantized alike"
        )
    return all(flags.values())
