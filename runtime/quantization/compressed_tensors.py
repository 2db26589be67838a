"""compressed-tensors checkpoints (llm-compressor's output, e.g. RedHatAI/*-quantized.w4a16, *-w8a8, *-FP8-dynamic):
``quantization_config`` ``{"quant_method": "compressed-tensors", "format": ..., "config_groups": {"group_0":
{"targets": ["Linear"], "weights": {...}, "input_activations": {...} | null}}, "ignore": ["lm_head"]}``.

A config group's ``weights`` / ``input_activations`` are compressed-tensors' QuantizationArgs (``num_bits``,
``type`` int | float, ``symmetric``, ``strategy`` tensor | channel | group | block | token, ``group_size``,
``block_structure``, ``dynamic``, ``actorder``); the format (the group's own ``format``, else the top-level one)
says how the tensors are stored. The schemes read here, as vLLM's compressed-tensors integration names them:

    pack-quantized   W4A16   int4 weights, group or channel, symmetric or not; no activation quantization
    int-quantized    W8A8    int8 weights, channel or tensor, symmetric; activations dynamic per token (or none)
    float-quantized  FP8     fp8 weights, tensor / channel / block; activations dynamic, static per tensor, or none
    naive-quantized          int8 or fp8 by the weights' type (the format the other two alias)

A decoder linear that no target matches, or that ``ignore`` lists, is left a plain matrix (the file stores its
float ``weight``), as compressed-tensors applies the group; q/k/v (gate/up) are one layer here, so they must be
quantized alike. The head must stay outside the group. Anything else here (2:4 sparsity, W4A8, act-order groups,
several groups, a quantized KV cache or head) is refused at start with the config field that asks for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import LinearMethod, QuantConfig
from .checkpoint_params import is_quantized, module_matches
from .compressed_tensors_methods import Int8CheckpointMethod, PackedW4Method
from .fp8_checkpoint import Fp8BlockMethod, Fp8CheckpointMethod, read_block_size

Q = "quantization_config"
FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
ORDER_ONLY_ACTORDER = (None, False, "weight", "static")  # reorders at quantization only: storage is unchanged


def _fail(field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config field '{field}' is {value!r}: {why}")


class _Args:
    """One QuantizationArgs object, read with compressed-tensors' defaults; errors name ``field.key``."""

    def __init__(self, args: Any, field: str) -> None:
        if not isinstance(args, dict):
            raise _fail(field, args, "must be an object (compressed-tensors QuantizationArgs)")
        self.args, self.field = args, field
        self.num_bits = args.get("num_bits", 8)
        self.type = args.get("type", "int")
        self.symmetric = args.get("symmetric", True)
        self.dynamic = args.get("dynamic", False)
        self.group_size = args.get("group_size")
        strategy = args.get("strategy")
        if strategy is None:  # compressed-tensors infers it from the group size
            strategy = "tensor" if self.group_size is None else ("channel" if self.group_size == -1 else "group")
        self.strategy = strategy

    def require(self, key: str, allowed: tuple[Any, ...], why: str) -> None:
        value = getattr(self, key) if hasattr(self, key) else self.args.get(key)
        if value not in allowed:
            raise _fail(f"{self.field}.{key}", value, why)


def _w4a16(weights: _Args, acts: _Args | None, field: str) -> Callable[[], LinearMethod]:
    if acts is not None:
        raise _fail(f"{field}.input_activations", acts.args, "pack-quantized is supported as W4A16 (no W4A8)")
    weights.require("type", ("int",), "pack-quantized weights are supported as integers")
    weights.require("num_bits", (4,), "pack-quantized is supported with 4 bits")
    weights.require("strategy", ("group", "channel"), "pack-quantized is supported per group or per channel")
    weights.require("dynamic", (False,), "weights must be static")
    weights.require("actorder", ORDER_ONLY_ACTORDER, "act-order groups (a weight_g_idx) are not supported")
    group_size = None
    if weights.strategy == "group":
        g = weights.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 8:
            raise _fail(f"{weights.field}.group_size", g, "must be a positive multiple of 8")
        group_size = g
    symmetric = bool(weights.symmetric)
    return lambda: PackedW4Method(group_size, symmetric)


def _int8(weights: _Args, acts: _Args | None, field: str) -> Callable[[], LinearMethod]:
    weights.require("type", ("int",), "int-quantized weights are integers")
    weights.require("num_bits", (8,), "int-quantized is supported with 8 bits")
    weights.require("symmetric", (True,), "int8 weights are supported symmetric")
    weights.require("strategy", ("channel", "tensor"), "int8 weights are supported per channel or per tensor")
    weights.require("dynamic", (False,), "weights must be static")
    if acts is not None:
        acts.require("type", ("int",), "int8 weights are supported with int8 activations")
        acts.require("num_bits", (8,), "int8 weights are supported with 8-bit activations")
        acts.require("symmetric", (True,), "activations are supported symmetric")
        acts.require("dynamic", (True,), "int8 activations are supported dynamic (no static input scales)")
        acts.require("strategy", ("token",), "int8 activations are supported per token")
    return Int8CheckpointMethod


def _fp8(weights: _Args, acts: _Args | None, field: str) -> Callable[[], LinearMethod]:
    weights.require("type", ("float",), "float-quantized weights are floats")
    weights.require("num_bits", (8,), "float-quantized is supported as fp8 (8 bits)")
    weights.require("symmetric", (True,), "fp8 weights are symmetric")
    weights.require("strategy", ("tensor", "channel", "block"), "fp8 is supported per tensor, channel or block")
    weights.require("dynamic", (False,), "weights must be static")
    static = False
    if acts is not None:
        acts.require("type", ("float",), "fp8 weights are supported with fp8 activations")
        acts.require("num_bits", (8,), "fp8 weights are supported with 8-bit activations")
        static = not acts.dynamic
        if static:
            acts.require("strategy", ("tensor",), "static activation scales are supported per tensor")
            acts.require("symmetric", (True,), "static activation scales are supported symmetric")
    if weights.strategy != "block":
        return lambda: Fp8CheckpointMethod(static)
    if static:
        raise _fail(f"{field}.input_activations.dynamic", False, "block-wise fp8 is supported with dynamic activations")
    block_field = f"{weights.field}.block_structure"
    block = read_block_size(weights.args.get("block_structure"), block_field)
    return lambda: Fp8BlockMethod(block, "weight_scale", block_field)


def _naive(weights: _Args, acts: _Args | None, field: str) -> Callable[[], LinearMethod]:
    """naive-quantized: the codes in the dtype of their type (the library's int- and float-quantized formats are
    its aliases), so int8 or fp8 by ``weights.type``."""
    return (_fp8 if weights.type == "float" else _int8)(weights, acts, field)


SCHEMES = {"pack-quantized": _w4a16, "int-quantized": _int8, "float-quantized": _fp8, "naive-quantized": _naive}


def _read_patterns(qc: dict[str, Any], targets: Any, field: str) -> tuple[list[str], list[str]]:
    """(targets, ignore) as lists of module patterns; the head must not be quantized."""
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise _fail(f"{Q}.ignore", ignore, "must be a list of module names or 're:' patterns")
    if not isinstance(targets, list) or not all(isinstance(p, str) for p in targets):
        raise _fail(f"{field}.targets", targets, "must be a list of module names, 're:' patterns or 'Linear'")
    head_targeted = any(module_matches(p, "lm_head") for p in targets)
    if head_targeted and not any(module_matches(p, "lm_head") for p in ignore):
        raise _fail(f"{Q}.ignore", ignore, "the head (lm_head) is a target; a quantized head is not supported")
    return targets, ignore


class CompressedTensorsConfig(QuantConfig):
    name = "compressed-tensors"
    from_checkpoint = True

    def __init__(
        self, make: Callable[[], LinearMethod], targets: list[str], ignore: list[str], fields: str = ""
    ) -> None:
        self.make = make  # a fresh method of the config group's scheme
        self.targets = targets
        self.ignore = ignore
        self.fields = fields  # the config fields that choose the quantized modules, for errors

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> CompressedTensorsConfig:
        sparsity = qc.get("sparsity_config")
        if sparsity and (not isinstance(sparsity, dict) or sparsity.get("format", "dense") != "dense"):
            raise _fail(f"{Q}.sparsity_config", sparsity, "sparse checkpoints (e.g. 2:4) are not supported")
        if qc.get("kv_cache_scheme") is not None:
            raise _fail(f"{Q}.kv_cache_scheme", qc["kv_cache_scheme"], "a checkpoint's KV cache scales are not read")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or len(groups) != 1:
            count = len(groups) if isinstance(groups, dict) else groups
            raise _fail(f"{Q}.config_groups", count, "exactly one config group (one scheme for all linears) is read")
        ((name, group),) = groups.items()
        field = f"{Q}.config_groups.{name}"
        if not isinstance(group, dict):
            raise _fail(field, group, "must be an object")
        fmt_field = f"{field}.format" if group.get("format") else f"{Q}.format"
        fmt = group.get("format") or qc.get("format")
        if fmt not in SCHEMES:
            raise _fail(fmt_field, fmt, f"supported formats: {', '.join(FORMATS)}")
        if group.get("output_activations") is not None:
            raise _fail(f"{field}.output_activations", group["output_activations"], "output quantization")
        targets, ignore = _read_patterns(qc, group.get("targets"), field)
        weights = _Args(group.get("weights"), f"{field}.weights")
        acts_args = group.get("input_activations")
        acts = None if acts_args is None else _Args(acts_args, f"{field}.input_activations")
        fields = f"'{field}.targets' / '{Q}.ignore'"
        return cls(SCHEMES[fmt](weights, acts, field), targets, ignore, fields)

    def _quantized(self, name: str) -> bool:
        """As compressed-tensors applies a config group: a module matched by a target and by no ignore entry."""
        targeted = any(module_matches(p, name) for p in self.targets)
        return targeted and not any(module_matches(p, name) for p in self.ignore)

    def linear_method(self) -> LinearMethod:
        return self.make()

    def linear_method_for(self, names: tuple[str, ...]) -> LinearMethod | None:
        return self.make() if is_quantized(names, self._quantized, self.fields) else None
