"""SwiGLU over a fused gate/up projection."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.interface import AttentionBackend


class SiluAndMul(nn.Module):
    def __init__(self, backend: AttentionBackend) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, 2 * d] (gate then up) -> [num_tokens, d]."""
        return self.backend.silu_and_mul(x)
