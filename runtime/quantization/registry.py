"""The formats by vLLM's ``quant_method`` names, and how a run's format is chosen: ``config.json``'s
``quantization_config`` names a checkpoint's format; ``--quantization`` may repeat it (or pick an online one for
an unquantized checkpoint), and a mismatch is a start-up error naming the field.

``fp8`` is both: the format of an FP8 checkpoint (its quantization_config says ``quant_method: fp8``) and an
online quantization of a float checkpoint, as in vLLM; which one is decided by the checkpoint, not the flag."""

from __future__ import annotations

from typing import Any

from .base import QuantConfig
from .cpu_int4 import Int4CpuConfig
from .int4_groups import INT4_GROUP_FORMATS
from .int8_groups import INT8_GROUP_FORMATS

# formats a checkpoint arrives in (its quantization_config says so); formats quantized at load from float weights
CHECKPOINT_FORMATS = ("awq", "gptq", "fp8", "compressed-tensors")
ONLINE_FORMATS = ("int4", "int8", "fp8")
# the formats that need a checkpoint quantized so (no online variant)
CHECKPOINT_ONLY_FORMATS = tuple(f for f in CHECKPOINT_FORMATS if f not in ONLINE_FORMATS)


def _checkpoint_classes() -> dict[str, type[QuantConfig]]:
    from .awq import AWQConfig
    from .compressed_tensors import CompressedTensorsConfig
    from .fp8_checkpoint import Fp8CheckpointConfig
    from .gptq import GPTQConfig

    return {"awq": AWQConfig, "gptq": GPTQConfig, "fp8": Fp8CheckpointConfig,
            "compressed-tensors": CompressedTensorsConfig}  # fmt: skip


def _online_classes() -> dict[str, type[QuantConfig]]:
    from .online import Fp8Config, Int8Config

    return {"int4": Int4CpuConfig, "int8": Int8Config, "fp8": Fp8Config}


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
    layers the file stores at more bits at those bits (its codes serve the Q4_K ones as int4, the Q5_K / Q6_K ones as
    int8 groups; Q4_0/Q4_1 ones are requantized, losslessly; any other dense layer stays dense)."""
    method = checkpoint_quant_method(hf)
    if method is not None and quantization != method:
        raise ValueError(
            f"quantization {quantization!r} does not match the checkpoint, whose config field "
            f"'quantization_config.quant_method' is {method!r} (use quantization {method!r} or auto)"
        )
    if quantization in CHECKPOINT_ONLY_FORMATS and method is None:
        raise ValueError(
            f"quantization {quantization!r} needs a checkpoint quantized so (config.json has no "
            "'quantization_config'); for a float checkpoint use int8 or fp8, quantized at load"
        )
    if quantization == "none":
        return None
    if method is not None:
        return _checkpoint_classes()[method].from_config(hf["quantization_config"])
    online = _online_classes()
    if quantization not in online:
        names = dict.fromkeys([*online, *CHECKPOINT_FORMATS])
        raise ValueError(f"quantization must be one of none, {', '.join(names)}, got {quantization!r}")
    if quantization == "int4":
        return Int4CpuConfig(lossless_only=bool(weight_formats & (INT4_GROUP_FORMATS | set(INT8_GROUP_FORMATS))))
    return online[quantization].from_config({})
