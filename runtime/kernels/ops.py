"""The model's elementwise ops, dispatched by device: Triton kernels for CUDA tensors; on the CPU the C++ kernels
of cpu_ops.cpp when they are built (kernels/cpu.py; rms_norm), else lean torch compositions. Same signatures and results
(within rounding) as kubellm.runtime.kernels.reference, which the layers call through here. Triton is imported
only when a CUDA tensor arrives, so CPU-only processes never load it.

Why one call per op matters on the CPU: a decode step of a small model is hundreds of tiny ops, where each
call's fixed cost (a microsecond or more) outweighs its arithmetic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu, reference

__all__ = ["rms_norm", "rotary_embedding", "silu_and_mul", "write_kv_cache"]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, new_residual): see reference.rms_norm."""
    if x.is_cuda:
        from .fused import rms_norm as fused_rms_norm

        return fused_rms_norm(x, weight, eps, residual)
    kernels = cpu.load()
    if kernels is not None and x.dim() == 2 and x.stride(-1) == 1 and weight.dtype == x.dtype:
        out, new_residual = kernels.rms_norm(x, residual, weight, eps)
        return out, new_residual
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        x = x + residual  # computed in float32 and rounded once, as the reference does
    # torch's fused CPU rms_norm normalizes in float32 and rounds once: bit-equal to the reference
    return F.rms_norm(x, weight.shape, weight, eps), x


def rotary_embedding(
    positions: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
    *,
    head_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates query and key in place and returns them: see reference.rotary_embedding."""
    if query.is_cuda:
        from .fused import rotary_embedding as fused_rotary_embedding

        return fused_rotary_embedding(positions, query, key, cos_sin_cache, is_neox, head_size=head_size)
    return reference.rotary_embedding(positions, query, key, cos_sin_cache, is_neox, head_size=head_size)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * d] -> silu(gate) * up [..., d]: see reference.silu_and_mul."""
    if x.is_cuda:
        from .fused import silu_and_mul as fused_silu_and_mul

        return fused_silu_and_mul(x)
    if x.shape[-1] % 2:
        raise ValueError(f"the last dimension of x must be even (gate and up halves), got {x.shape[-1]}")
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up  # half precision rounds twice (as Hugging Face's SiLU * up does)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter keys and values into their cache slots (-1 skipped): see reference.write_kv_cache."""
    if kv_cache.is_cuda:
        from .kv_cache import write_kv_cache as triton_write_kv_cache

        triton_write_kv_cache(key, value, kv_cache, slot_mapping)
    else:
        reference.write_kv_cache(key, value, kv_cache, slot_mapping)
