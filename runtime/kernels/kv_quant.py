"""The quantized KV cache (``--kv-cache-dtype int8 | fp8``): storage, per-layer scales, and how they are set.

Storage. A layer's cache keeps its usual shape ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` but holds
one-byte codes (``torch.int8``, or ``torch.float8_e4m3fn`` for ``fp8`` / ``fp8_e4m3``), beside one float32
``kv_scale`` tensor ``[2]`` per layer: ``(k_scale, v_scale)``. A value is ``code * scale``::

    int8:  code = clamp(floor(x / scale + 0.5), -127, 127)      scale = headroom * amax / 127
    fp8:   code = float8_e4m3fn(clamp(x / scale, -448, 448))     scale = headroom * amax / 448   (round to nearest)

(``x / scale`` is computed as ``x * (1 / scale)`` in float32 by every writer, so they agree bit for bit.)

Why static per-layer scales. A block then costs exactly half a bf16 block (a quarter of a float32 one), so the
block budget doubles; and every reader applies the scales for free: ``k_scale`` folds into the softmax scale
(``q . (s_k k) = s_k (q . k)``) and ``v_scale`` multiplies the output once (``sum p (s_v v) = s_v sum p v``), so
each kernel only widens the codes it loads. Per-token scales stored beside the blocks would be more accurate for
int8 (a row's range instead of the layer's) but cost bytes per block and a scale load per row in every path.

How the scales are set. Scales must be fixed before the first block is written (cached prefixes are shared and
never rewritten), and must not depend on which request came first. So the model runner calibrates once at
start-up: one prefill of ``CALIBRATION_TOKENS`` seeded random token ids into a cache in the model's dtype, and
``scale = headroom * amax / qmax`` per layer, separately for K (after rotary) and V (``scales_from_caches``).
Measured on SmolLM2-135M (30 layers; K amax 8-21, V amax 0.4-15): random tokens' per-layer amax was at most ~18 %
below that of real text (prose, code), the direction that would clip, and up to ~50 % above it in a few V layers
(costing int8 some resolution there). Values past the calibrated range saturate instead of overflowing.
Headroom: int8 has a uniform step, so headroom costs resolution linearly: 1.25 (covers the 18 %); fp8 keeps its
relative precision over its whole range, so it takes 2 at almost no cost. The resulting error of a dequantized
value on real text: ~2.0 % of the RMS for int8, ~2.6 % for fp8 (e4m3's 3 mantissa bits). Static per-channel
scales (as cheap to apply: they fold into q and the output elementwise) measured worse for int8 (K 2.7 %, V 3.9 %):
random tokens miss some channels' outliers on real text, which then clip. Under tensor parallelism the ranks take
each layer's largest scale (model_runner), so the scales do not depend on the sharding.
"""

from __future__ import annotations

import torch

from ..config import KV_CACHE_DTYPES

__all__ = [
    "CALIBRATION_TOKENS",
    "KV_CACHE_DTYPES",
    "check_kv_scale",
    "dequantize",
    "is_quantized",
    "kv_cache_torch_dtype",
    "quant_mode",
    "quantize",
    "scales_from_caches",
]

CALIBRATION_TOKENS = 256
QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
HEADROOM = {torch.int8: 1.25, torch.float8_e4m3fn: 2.0}


def kv_cache_torch_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensor's dtype for a --kv-cache-dtype value."""
    if name == "auto":
        return model_dtype
    if name == "int8":
        return torch.int8
    if name in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")


def is_quantized(dtype: torch.dtype) -> bool:
    return dtype in QMAX


def check_kv_scale(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> None:
    """A quantized cache comes with its float32 [2] (k_scale, v_scale), and only a quantized one."""
    if is_quantized(kv_cache.dtype) != (kv_scale is not None):
        raise ValueError(f"a {kv_cache.dtype} cache needs kv_scale exactly when it is int8 or float8 (quantized)")
    if kv_scale is not None and (kv_scale.shape != (2,) or kv_scale.dtype != torch.float32):
        shape = list(kv_scale.shape)
        raise ValueError(f"kv_scale must be float32 [2] (k_scale, v_scale), got {kv_scale.dtype} {shape}")


def quant_mode(kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> int:
    """The Triton kernels' QUANT constant for a cache: 0 (values), 1 (int8 codes), 2 (float8 e4m3 codes)."""
    check_kv_scale(kv_cache, kv_scale)
    return {torch.int8: 1, torch.float8_e4m3fn: 2}.get(kv_cache.dtype, 0)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (any float dtype) -> codes of ``dtype``; scale: a float32 scalar tensor (0-d or [1], broadcast)."""
    qmax = QMAX[dtype]
    y = (x.float() * (1.0 / scale.float())).clamp(-qmax, qmax)
    if dtype == torch.int8:
        return torch.floor(y + 0.5).to(torch.int8)
    return y.to(dtype)


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes (int8 / float8) -> float32 values ``codes * scale``."""
    return codes.float() * scale.float()


def scales_from_caches(caches: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """Per layer, ``[k_scale, v_scale]`` float32 from calibration caches in the model's dtype (unwritten slots
    hold zeros, so they do not move the amax): ``headroom * amax / qmax``, never 0."""
    out = []
    for cache in caches:
        amax = cache.flatten(1).abs().amax(dim=1).float()  # [2]: K, V
        out.append((amax * (HEADROOM[dtype] / QMAX[dtype])).clamp_min(1e-6))
    return out
