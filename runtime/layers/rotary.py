"""Rotary position embedding (neox / Hugging Face "rotate half" layout) with Llama 3 and linear scaling.

The cos/sin table is computed the way Hugging Face transformers computes it (float32 inverse frequencies times
float32 positions), so float32 logits match it closely even at long positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..kernels.interface import AttentionBackend, RopeTables


def rope_inv_freq(head_dim: int, base: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, scaled as ``rope_scaling`` asks."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (rope_scaling or {}).get("rope_type") or (rope_scaling or {}).get("type") or "default"
    assert rope_scaling is not None or rope_type == "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])  # type: ignore[index]
    if rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between
        factor = float(rope_scaling["factor"])  # type: ignore[index]
        low_freq_factor = float(rope_scaling.get("low_freq_factor", 1.0))  # type: ignore[union-attr]
        high_freq_factor = float(rope_scaling.get("high_freq_factor", 4.0))  # type: ignore[union-attr]
        old_len = float(rope_scaling.get("original_max_position_embeddings", 8192))  # type: ignore[union-attr]
        low_freq_wavelen = old_len / low_freq_factor
        high_freq_wavelen = old_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """The cos/sin table of one model (shared by its layers) and the rotation, through the device's backend."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        rope_scaling: dict[str, Any] | None,
        backend: AttentionBackend,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        with torch.device("cpu"):  # real numbers even when the model is built on the meta device
            inv_freq = rope_inv_freq(head_dim, base, rope_scaling)
            freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # [max_position, D/2]
            # [max_position, head_dim], cos half then sin half, rounded to the model's dtype (as Hugging Face does)
            table = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)
        table = table.to(device or torch.get_default_device())
        self.tables = RopeTables(table, table.float().contiguous())
        self.max_position = max_position
        self.backend = backend

    @property
    def cos_sin_cache(self) -> torch.Tensor:
        return self.tables.cos_sin_cache

    def new_step(self) -> None:
        self.tables.new_step()

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T]; query: [T, Hq, D]; key: [T, Hkv, D] (views are fine) -> rotated (query, key)."""
        return self.backend.rotary_embedding(positions, query, key, self.tables)

    def rotate_qk(
        self, positions: torch.Tensor, qk: torch.Tensor, num_q_heads: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """qk: [T, Hq + Hkv, D], query heads then key heads -> rotated (query, key), in one pass where the backend
        can."""
        return self.backend.rotary_embedding_qk(positions, qk, num_q_heads, self.tables)
