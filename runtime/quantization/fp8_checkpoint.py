"""FP8 checkpoints, ``quantization_config`` ``{"quant_method": "fp8", "activation_scheme": "dynamic" | "static"}``
(vLLM's and transformers' FP8 layout, as AutoFP8 and llm-compressor's predecessors wrote it), and the block-wise
variant with ``"weight_block_size": [bn, bk]`` (DeepSeek-V3, Qwen3-FP8). Per linear (K in, N out)::

    weight        [N, K]   float8_e4m3fn
    weight_scale  [] or [1] (per tensor), [N] or [N, 1] (per output channel)   float32
    input_scale   [] or [1]  float32, with activation_scheme "static" only      x ~ fp8(x / input_scale) * input_scale
    W[n, k] = weight[n, k] * weight_scale[n]

    block-wise:   weight_scale_inv [N / bn, K / bk] float32, W[n, k] = weight[n, k] * scale_inv[n // bn, k // bk]
                  (the name says inverse; the value multiplies, as in DeepSeek-V3's own dequantization)

Served by online fp8's method (online.py): row-wise ``torch._scaled_mm`` on sm89+ GPUs with bf16 activations
(per-token dynamic activation scales, or the file's static one), elsewhere the fp8 weight widened to the
activation dtype per matmul (held once, as fp8). Per-tensor scales become per-row ones (checkpoint_params.py:
each merged shard keeps its own scale exactly). With static scales, q/k/v (gate/up) share one input, so the
largest of their input scales quantizes it (vLLM does the same). Block-wise weights are dequantized per matmul
(no block-scaled kernel here yet). The linears ``ignored_layers`` (``modules_to_not_convert``) names are plain
matrices in the file and are served so; the head is never quantized here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .base import LinearMethod, ParamLayout, QuantConfig
from .checkpoint_params import ROW_SCALE, LazyParams, drop, is_quantized, module_matches, row_scale
from .dense import DENSE
from .online import FP8, Fp8Method

if TYPE_CHECKING:
    from ..layers.linear import Linear

ACTIVATION_SCHEMES = ("dynamic", "static")


def check_fp8_dtype(param: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != FP8:
        raise ValueError(f"{param}: checkpoint dtype is {tensor.dtype}, expected float8_e4m3fn (the format's codes)")


class Fp8CheckpointMethod(Fp8Method):
    """``weight`` fp8, ``weight_scale`` per tensor or per channel, ``input_scale`` when static: loaded as they are
    (no online quantization), then served as online fp8 is."""

    def __init__(self, static_input: bool) -> None:
        super().__init__()
        self.static_input = static_input
        self.params = LazyParams()

    def create_weights(self, layer: Linear) -> None:
        n, k = layer.out_features, layer.in_features
        self.params.add(layer, "weight", (n, k), FP8, DENSE)
        self.params.add(layer, "weight_scale", (n,), torch.float32, ROW_SCALE)
        if self.static_input:
            self.params.add(layer, "input_scale", (n,), torch.float32, ROW_SCALE)

    def prepare_load(self, layer: Linear, param: str) -> None:
        self.params.allocate(layer, param)

    def checkpoint_tensor(self, layer: Linear, shard: str, param: str, tensor: torch.Tensor) -> torch.Tensor:
        if param == "weight":
            check_fp8_dtype(param, tensor)
        if param in ("weight_scale", "input_scale") and param in layer.layouts:
            return row_scale(layer, shard, param, tensor)
        return tensor

    def ignores(self, layer: Linear, param: str, tensor: torch.Tensor) -> bool:
        # a dynamic-activation file may still carry calibration scales: activations are scaled per token instead
        return param == "input_scale" and not self.static_input

    def after_load(self, layer: Linear) -> None:
        pass  # nothing to quantize: the file's codes are kept

    def process_weights_after_loading(self, layer: Linear) -> None:
        self.codes = layer.tensor("weight")
        self.scale = layer.tensor("weight_scale")
        if self.static_input:
            self.input_scale = layer.tensor("input_scale").amax().reshape(())  # the shards share one input
        drop(layer)
        self.prepare_kernels(layer)

    def describe(self) -> str:
        if self.codes is None:
            return ""
        static = " static" if self.static_input else ""
        return f"fp8 e4m3 checkpoint{static}" + (" scaled_mm" if self.use_scaled_mm else "")


class Fp8BlockMethod(LinearMethod):
    """``weight`` fp8 [N, K] and one float32 scale per [bn, bk] block (``scale_name``: ``weight_scale_inv`` in fp8
    files, ``weight_scale`` in compressed-tensors ones)."""

    def __init__(self, block: tuple[int, int], scale_name: str, field: str) -> None:
        self.block = block
        self.scale_name = scale_name
        self.field = field  # the config field that set the block size, for errors
        self.params = LazyParams()
        self.codes: torch.Tensor | None = None  # [N, K] fp8
        self.block_scale: torch.Tensor | None = None  # [N / bn, K / bk] float32

    def _check(self, rows: int, cols: int, what: str) -> None:
        bn, bk = self.block
        if rows % bn or cols % bk:
            raise ValueError(
                f"{what} of {rows} rows and {cols} columns is not whole blocks of config field {self.field!r} "
                f"({bn}, {bk}) (with tensor parallelism: this rank's slice)"
            )

    def create_weights(self, layer: Linear) -> None:
        (bn, bk), n, k = self.block, layer.out_features, layer.in_features
        self._check(n, k, "a linear")
        self.params.add(layer, "weight", (n, k), FP8, DENSE)
        layout = ParamLayout(out_dim=0, in_dim=1, out_pack=bn, in_pack=bk)
        self.params.add(layer, self.scale_name, (n // bn, k // bk), torch.float32, layout)

    def prepare_load(self, layer: Linear, param: str) -> None:
        self.params.allocate(layer, param)

    def checkpoint_tensor(self, layer: Linear, shard: str, param: str, tensor: torch.Tensor) -> torch.Tensor:
        if param == "weight":
            check_fp8_dtype(param, tensor)
            self._check(layer.shard_rows[shard][1], layer.input_slice[1], f"{param}: a checkpoint matrix")
        return tensor.to(torch.float32) if param == self.scale_name else tensor

    def process_weights_after_loading(self, layer: Linear) -> None:
        self.codes = layer.tensor("weight")
        self.block_scale = layer.tensor(self.scale_name)
        drop(layer)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        assert self.codes is not None and self.block_scale is not None
        (bn, bk), (n, k) = self.block, self.codes.shape
        blocks = self.codes.to(x.dtype).view(n // bn, bn, k // bk, bk)
        weight = (blocks * self.block_scale.to(x.dtype)[:, None, :, None]).view(n, k)
        return F.linear(x, weight)

    def describe(self) -> str:
        return f"fp8 e4m3 block {self.block[0]}x{self.block[1]}" if self.codes is not None else ""


def read_block_size(value: Any, field: str) -> tuple[int, int]:
    ok = isinstance(value, list | tuple) and len(value) == 2
    if not ok or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in value):
        raise ValueError(f"config field {field!r} must be two positive integers [rows, columns], got {value!r}")
    return int(value[0]), int(value[1])


class Fp8CheckpointConfig(QuantConfig):
    """``quant_method: fp8`` in a checkpoint's config (``--quantization fp8`` over a float checkpoint is online.py's
    :class:`~.online.Fp8Config`; the registry picks by whether the checkpoint carries a quantization_config)."""

    name = "fp8"
    from_checkpoint = True

    def __init__(
        self, static_input: bool = False, block: tuple[int, int] | None = None, skipped: list[str] | None = None
    ) -> None:
        self.static_input = static_input
        self.block = block
        self.skipped = skipped or []  # module names the file leaves unquantized (lm_head, ...)

    @classmethod
    def from_config(cls, qc: dict[str, Any]) -> Fp8CheckpointConfig:
        scheme = qc.get("activation_scheme", "dynamic")
        if scheme not in ACTIVATION_SCHEMES:
            raise ValueError(
                f"config field 'quantization_config.activation_scheme' is {scheme!r} "
                f"(supported: {', '.join(ACTIVATION_SCHEMES)})"
            )
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"config field 'quantization_config.fmt' is {qc['fmt']!r}: fp8 is supported as e4m3")
        skipped: list[str] = []
        for key in ("ignored_layers", "modules_to_not_convert"):
            names = qc.get(key) or []
            if not isinstance(names, list) or not all(isinstance(s, str) for s in names):
                raise ValueError(f"config field 'quantization_config.{key}' must be a list of module names")
            skipped += names
        block = qc.get("weight_block_size")
        if block is None:
            return cls(scheme == "static", skipped=skipped)
        if scheme == "static":
            raise ValueError(
                "config field 'quantization_config.activation_scheme' is 'static' with 'weight_block_size': "
                "block-wise fp8 is supported with dynamic activations"
            )
        return cls(False, read_block_size(block, "quantization_config.weight_block_size"), skipped)

    def linear_method_for(self, names: tuple[str, ...]) -> LinearMethod | None:
        """A linear that ``ignored_layers`` (``modules_to_not_convert``) names is stored as a plain matrix."""
        fields = "'quantization_config.ignored_layers' / 'modules_to_not_convert'"
        quantized = is_quantized(names, lambda n: not any(module_matches(p, n) for p in self.skipped), fields)
        return self.linear_method() if quantized else None

    def linear_method(self) -> LinearMethod:
        if self.block is not None:
            return Fp8BlockMethod(self.block, "weight_scale_inv", "quantization_config.weight_block_size")
        return Fp8CheckpointMethod(self.static_input)
