"""RMSNorm, optionally fused with the residual add that precedes it (the backend's op does both)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.interface import AttentionBackend


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, backend: AttentionBackend) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [..., hidden] -> (normed, new residual = x + residual)."""
        return self.backend.rms_norm(x, self.weight, self.eps, residual)
