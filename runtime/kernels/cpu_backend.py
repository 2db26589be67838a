"""The CPU backend: the torch backend with the C++ kernels of cpu_ops.cpp (kernels/cpu.py) where they apply.

Chosen only when the kernels are built (``kernels/dispatch.py``); the kernels module is handed in at construction,
so a process decides once. The C++ kernels: RMSNorm with the residual add, rotary (query and key heads in one pass),
paged decode attention reading K and V in place (no gather copy), also as int8 / float8 codes of a quantized cache.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .interface import RopeTables
from .torch_backend import TorchAttentionBackend, TorchAttentionMetadata

__all__ = ["CpuAttentionBackend"]


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def __init__(self, kernels: ModuleType) -> None:
        self.kernels = kernels

    def _decode(
        self,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        md: TorchAttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_seqs = query.shape[0]
        if kv_scale is not None:  # int8 / float8 codes, read in place with the layer's scales
            k_scale, v_scale = kv_scale.tolist()
            return self.kernels.paged_decode_attention(
                query, kv_cache, md.block_tables[:num_seqs], md.seq_lens[:num_seqs], scale, k_scale, v_scale
            )
        if kv_cache.dtype != query.dtype:
            return super()._decode(query, kv_cache, md, scale, kv_scale)
        return self.kernels.paged_decode_attention(
            query, kv_cache, md.block_tables[:num_seqs], md.seq_lens[:num_seqs], scale
        )

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() == 2 and x.stride(-1) == 1 and weight.dtype == x.dtype:
            out, new_residual = self.kernels.rms_norm(x, residual, weight, eps)
            return out, new_residual
        return super().rms_norm(x, weight, eps, residual)

    def rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, rope: RopeTables
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rotate_cpp(positions, query, rope), self._rotate_cpp(positions, key, rope)

    def rotary_embedding_qk(
        self, positions: torch.Tensor, qk: torch.Tensor, num_q_heads: int, rope: RopeTables
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rotated = self._rotate_cpp(positions, qk, rope)  # one pass over both
        return rotated[:, :num_q_heads], rotated[:, num_q_heads:]

    def _rotate_cpp(self, positions: torch.Tensor, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        if x.stride(-1) != 1:
            return self._rotate(positions, x, rope)
        return self.kernels.rotary(x, positions, rope.cos_sin_f32)
