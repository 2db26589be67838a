"""The model's elementwise ops, dispatched by device: Triton kernels for CUDA tensors, the torch reference ops
otherwise. Same signatures and results as kubellm.runtime.kernels.reference, so a layer can import from here
instead of from reference and get the fused kernels on a GPU. Triton is imported only when a CUDA tensor
arrives, so CPU-only processes never load it.
"""

from __future__ import annotations

import torch

from . import reference

__all__ = ["rms_norm", "rotary_embedding", "silu_and_mul", "write_kv_cache"]


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, new_residual): see reference.rms_norm."""
    if x.is_cuda:
        from .fused import rms_norm as fused_rms_norm

        return fused_rms_norm(x, weight, eps, residual)
    return reference.rms_norm(x, weight, eps, residual)


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
    return reference.silu_and_mul(x)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter keys and values into their cache slots (-1 skipped): see reference.write_kv_cache."""
    if kv_cache.is_cuda:
        from .kv_cache import write_kv_cache as triton_write_kv_cache

        triton_write_kv_cache(key, value, kv_cache, slot_mapping)
    else:
        reference.write_kv_cache(key, value, kv_cache, slot_mapping)
