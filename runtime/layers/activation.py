"""SwiGLU over a fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, 2 * d] (gate then up) -> [num_tokens, d]."""
        gate, up = x.chunk(2, dim=-1)
        if x.dtype == torch.float32:
            return F.silu(gate) * up
        # half precision: activate in float32, round once (as the kernels' reference does)
        return (F.silu(gate.float()) * up.float()).to(x.dtype)
