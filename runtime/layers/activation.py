"""SwiGLU over a fused gate/up projection."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.ops import silu_and_mul


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, 2 * d] (gate then up) -> [num_tokens, d]."""
        return silu_and_mul(x)
