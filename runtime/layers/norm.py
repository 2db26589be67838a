"""RMSNorm, optionally fused with the residual add that precedes it (the torch reference op does both)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.ops import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [..., hidden] -> (normed, new residual = x + residual)."""
        return rms_norm(x, self.weight, self.eps, residual)
