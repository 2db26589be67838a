"""Linear layers whose weight is several Hugging Face matrices stacked along the output dimension.

q/k/v and gate/up are fused so that one matmul serves them; ``load_shard`` copies one checkpoint matrix into
its rows. (Quantized linears would live here too.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MergedLinear(nn.Module):
    """y = x @ W.T (+ b), W = cat([W_shard for shard in shards]) along the output rows."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.out_features = offset
        self.weight = nn.Parameter(torch.empty(offset, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(offset), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_shard(self, shard: str, param: str, tensor: torch.Tensor) -> None:
        """Copy the checkpoint tensor for ``shard`` ("q", "gate", ...) into ``param`` ("weight" or "bias")."""
        offset, size = self.shard_offsets[shard]
        target = self.weight if param == "weight" else self.bias
        if target is None:
            raise ValueError(f"checkpoint has a {shard} bias but the model was configured without attention_bias")
        expected = (size, self.in_features) if param == "weight" else (size,)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{shard}_proj.{param} has shape {tuple(tensor.shape)}, expected {expected}")
        target.data[offset : offset + size].copy_(tensor)
