"""Rotary position embedding (neox / Hugging Face "rotate half" layout) with Llama 3 and linear scaling.

The cos/sin table is computed the way Hugging Face transformers computes it (float32 inverse frequencies times
float32 positions), so float32 logits match it closely even at long positions.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..kernels import cpu, ops


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
    def __init__(
        self, head_dim: int, max_position: int, base: float, rope_scaling: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, base, rope_scaling)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # [max_position, D/2]
        # cos_sin_cache: [max_position, head_dim], cos half then sin half (the reference ops' layout)
        self.cos_sin_cache: torch.Tensor
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)
        self.max_position = max_position
        # (positions, cos, sin) of the current step, shared by all layers (CPU path); reset by new_step()
        self._step_cos_sin: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # (cos_sin_cache, its float32 copy) for the C++ kernel (CPU)
        self._table_f32: tuple[torch.Tensor, torch.Tensor] | None = None

    def new_step(self) -> None:
        """Forget the step's cos/sin: the next call gathers them again (positions may be rewritten in place, as a
        captured graph's static buffer is, so the tensor's identity alone cannot tell steps apart)."""
        self._step_cos_sin = None

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T]; query: [T, Hq, D]; key: [T, Hkv, D] (views are fine) -> rotated (query, key).

        On a GPU the fused kernel rotates contiguous copies in place. On the CPU see :meth:`rotate`.
        """
        if query.is_cuda:
            return ops.rotary_embedding(positions, query.contiguous(), key.contiguous(), self.cos_sin_cache, True)
        return self.rotate(positions, query), self.rotate(positions, key)

    def rotate(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """CPU: positions [T]; x [T, H, D] (a view is fine) -> a new rotated tensor. Query and key heads may come
        as one tensor (their columns are adjacent in the fused qkv projection): one pass rotates both.

        The C++ kernel when it is built (kernels/cpu.py); else ``x * cos + roll(x, D/2) * sin`` in float32 (the
        reference's arithmetic in fewer ops), with cos and sin gathered once per step: every layer of a forward
        pass gets the same ``positions`` tensor."""
        kernels = cpu.load()
        if kernels is not None and x.stride(-1) == 1:
            if self._table_f32 is None or self._table_f32[0] is not self.cos_sin_cache:  # .to() replaces the buffer
                self._table_f32 = (self.cos_sin_cache, self.cos_sin_cache.float().contiguous())
            return kernels.rotary(x, positions, self._table_f32[1])
        cached = self._step_cos_sin
        if cached is None or cached[0] is not positions:
            cos, sin = self.cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
            # rotate-half: out = x * [cos, cos] + [x2, x1] * [-sin, sin]
            cached = (positions, torch.cat([cos, cos], -1)[:, None, :], torch.cat([-sin, sin], -1)[:, None, :])
            self._step_cos_sin = cached
        _, cos_full, sin_signed = cached
        return _rotate_half(x, cos_full, sin_signed)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, -1), sin).to(x.dtype)
