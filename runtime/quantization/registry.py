"""The formats by vLLM's ``quant_method`` names, and how a run's format is chosen: ``config.json``'s
``quantization_config`` names a checkpoint's format; ``--quantization`` may repeat it (or pick an online one for
an unquantized checkpoint), and a mismatch is a start-up error naming the field."""

from __future__ import annotations

from typing import Any

from .base import QuantConfig
from .cpu_int4 import Int4CpuConfig
from .int4_groups import INT4_GROUP_FORMATS

# formats a checkpoint arrives in (its quantization_config says so); formats quantized at load from float weights
CHECKPOINT_FORMATS = ("awq", "gptq")
ONLINE_FORMATS = ("int4", "int8", "fp8")


def _config_classes() -> dict[str, type[QuantConfig]]:
    from .awq import AWQConfig
    from .gptq import GPTQConfig
    from .online import Fp8Config, Int8Config

    return {"int4": Int4CpuConfig, "awq": AWQConfig, "gptq": GPTQConfig, "int8": Int8Config, "fp8": Fp8Config}


def checkpoint_quant_method(hf: dict[str, Any]) -> str | None:
    """The checkpoint's ``quantization_config.quant_method`` (lower case), None for an unquantized checkpoint;
    ValueError naming the field when the format is not one we read."""
    qc = hf.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"config field 'quantization_config' must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if not isinstance(method, str):
        raise ValueError(f"config field 'quantization_config.quant_method' must be a string, got {method!r}")
    method = method.lower()
    if method not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"config field 'quantization_config.quant_method' is {method!r}, which is not supported "
            f"(supported checkpoint formats: {', '.join(CHECKPOINT_FORMATS)})"
        )
    return method


def quant_config_for(
    quantization: str, hf: dict[str, Any], weight_formats: frozenset[str] = frozenset()
) -> QuantConfig | None:
    """The format object of a resolved ``quantization`` ("none", "int4", "awq", ...); None for plain weights.
    ``weight_formats``: the GGUF types of the checkpoint's decoder matrices; int4 over a K-quant mix keeps the
    layers the file stores at more bits dense (its codes serve the Q4_K ones, Q4_0/Q4_1 ones are requantized)."""
    method = checkpoint_quant_method(hf)
    if method is not None and quantization != method:
        raise ValueError(
            f"quantization {quantization!r} does not match the checkpoint, whose config field "
            f"'quantization_config.quant_method' is {method!r} (use quantization {method!r} or auto)"
        )
    if quantization in CHECKPOINT_FORMATS and method is None:
        raise ValueError(
            f"quantization {quantization!r} needs a checkpoint quantized so (config.json has no "
            "'quantization_config'); for a float checkpoint use int8 or fp8, quantized at load"
        )
    if quantization == "none":
        return None
    classes = _config_classes()
    if quantization not in classes:
        raise ValueError(f"quantization must be one of none, {', '.join(classes)}, got {quantization!r}")
    if quantization == "int4":
        return Int4CpuConfig(lossless_only=bool(weight_formats & INT4_GROUP_FORMATS))
    return classes[quantization].from_config(hf.get("quantization_config") or {})
