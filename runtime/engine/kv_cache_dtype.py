"""The KV cache's dtype at start-up: which one ``--kv-cache-dtype`` gives on this device (or a clear error), and
the calibration pass that sets a quantized cache's per-layer scales (why static scales: kernels/kv_quant.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..kernels import kv_quant
from .step_input import StepInput

__all__ = ["calibration_step", "resolve_kv_cache_dtype"]

CALIBRATION_SEED = 0  # fixed: the scales depend on the model alone, never on the engine's seed or a request


def resolve_kv_cache_dtype(
    name: str, model_dtype: torch.dtype, device: torch.device, capability: tuple[int, int] | None = None
) -> torch.dtype:
    """The cache tensor's dtype for ``kv_cache_dtype`` ``name``; ValueError naming the setting where this torch or
    device cannot hold it. ``capability``: the CUDA device's (default: asked of the device)."""
    dtype = kv_quant.kv_cache_torch_dtype(name, model_dtype)
    if dtype != torch.float8_e4m3fn:
        return dtype
    if device.type == "cuda":
        major, minor = capability or torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):  # Triton converts to and from float8 e4m3 on Ada / Hopper and later only
            raise ValueError(
                f"kv_cache_dtype {name} needs a GPU of compute capability 8.9 or later (float8 e4m3); {device} has "
                f"{major}.{minor}: use --kv-cache-dtype int8"
            )
    try:
        torch.zeros(1, device=device).to(torch.float8_e4m3fn).float()
    except (RuntimeError, TypeError) as e:
        raise ValueError(
            f"kv_cache_dtype {name}: torch {torch.__version__} cannot hold float8 e4m3 on {device} ({e})"
        ) from e
    return dtype


def calibration_step(num_tokens: int, block_size: int, vocab_size: int) -> StepInput:
    """One prefill of ``num_tokens`` seeded random token ids into blocks 0, 1, ..., with no logits."""
    gen = torch.Generator().manual_seed(CALIBRATION_SEED)
    input_ids = torch.randint(0, vocab_size, (num_tokens,), generator=gen).tolist()
    return StepInput(
        input_ids=input_ids,
        positions=list(range(num_tokens)),
        slot_mapping=list(range(num_tokens)),
        block_tables=[list(range(-(-num_tokens // block_size)))],
        seq_lens=[num_tokens],
        query_start_loc=[0, num_tokens],
        num_decode_tokens=1 if num_tokens == 1 else 0,
        logit_rows=[],
    )


def calibrate_kv_scales(
    run_step: Callable[[StepInput, list[torch.Tensor]], None],
    cache_shape: tuple[int, int, int],
    num_layers: int,
    *,
    num_tokens: int,
    vocab_size: int,
    model_dtype: torch.dtype,
    cache_dtype: torch.dtype,
    device: torch.device,
) -> list[torch.Tensor]:
    """Per layer, float32 [2] (k_scale, v_scale) on ``device``: ``run_step(step, caches)`` runs the calibration
    step over caches in the model's dtype; cache_shape: (block_size, num_kv_heads, head_dim)."""
    block_size, num_kv_heads, head_dim = cache_shape
    step = calibration_step(num_tokens, block_size, vocab_size)
    num_blocks = len(step.block_tables[0])
    caches = [
        torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=model_dtype, device=device)
        for _ in range(num_layers)
    ]
    run_step(step, caches)
    return kv_quant.scales_from_caches(caches, cache_dtype)
