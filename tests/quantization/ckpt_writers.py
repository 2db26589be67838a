"""Test-side writers of FP8 and compressed-tensors checkpoints (imported as ``quantization.ckpt_writers``).

Written from the published layouts, independently of the loader (runtime/quantization):

- FP8 (vLLM / transformers ``quant_method: fp8``, AutoFP8's files): ``weight`` float8_e4m3fn [N, K],
  ``weight_scale`` float32 per tensor (shape []) or per channel ([N]), ``input_scale`` [] when the activation
  scheme is static; block-wise (``weight_block_size [bn, bk]``): ``weight_scale_inv`` [N / bn, K / bk], the
  factor of each block (DeepSeek-V3's ``weight_dequant``: ``w * s`` per block).
- compressed-tensors (the library's compressors): ``pack_to_int32`` stores a signed 4-bit q as q + 8, eight per
  int32, value 8c + i of a row in bits 4i of word c (``weight_packed`` [N, K / 8]); zero points are packed the same
  way along the rows (``weight_zero_point`` [N / 8, G]); ``weight_scale`` [N, G]; ``weight_shape`` [N, K].
  ``int-quantized``: ``weight`` int8 and ``weight_scale`` [N, 1]; ``float-quantized``: ``weight`` fp8 and
  ``weight_scale`` [N, 1] (channel) or [1] (tensor).

Each writer also returns the dequantized float weight, which the oracle (transformers, float32) runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# v_proj and up_proj are scaled up in the model, so a merged layer's shards have per-tensor scales far apart
SPREAD = {"v_proj": 4.0, "up_proj": 3.0}
BLOCK = 16  # block-wise fp8 tests use 16 x 16 blocks: the tiny model's dimensions are multiples of it
W4_GROUP = 32

Quantizer = Callable[[torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


def _fp8(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, dequantized) of w / scale rounded to e4m3 (scale broadcast against w)."""
    codes = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, codes.float() * scale


def fp8_per_tensor(w: torch.Tensor, *, static: bool = False, shape: tuple[int, ...] = ()) -> tuple[dict, torch.Tensor]:
    scale = w.abs().max() / FP8_MAX
    codes, dense = _fp8(w, scale)
    tensors = {"weight": codes, "weight_scale": scale.reshape(shape).float()}
    if static:  # a calibration scale of its own per matrix: the merged shards' differ
        tensors["input_scale"] = torch.tensor(0.01 + float(w.abs().mean()), dtype=torch.float32).reshape(shape)
    return tensors, dense


def fp8_per_channel(w: torch.Tensor, *, column: bool = False) -> tuple[dict, torch.Tensor]:
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX  # [N, 1]
    codes, dense = _fp8(w, scale)
    return {"weight": codes, "weight_scale": scale if column else scale.reshape(-1)}, dense


def fp8_blocks(w: torch.Tensor, block: int = BLOCK, scale_name: str = "weight_scale_inv") -> tuple[dict, torch.Tensor]:
    n, k = w.shape
    blocks = w.reshape(n // block, block, k // block, block)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX  # [N / b, K / b]
    codes, dense = _fp8(blocks, scale[:, None, :, None])
    return {"weight": codes.reshape(n, k), scale_name: scale}, dense.reshape(n, k)


def pack_to_int32(values: np.ndarray, along_rows: bool = False) -> torch.Tensor:
    """Signed 4-bit values [R, C] -> int32 words, q + 8 in nibble i of value 8j + i (along C, or along R)."""
    stored = (values + 8).astype(np.uint32)
    if along_rows:
        stored = stored.T
    rows, cols = stored.shape
    packed = np.zeros((rows, cols // 8), dtype=np.uint32)
    for i in range(8):
        packed |= stored[:, i::8] << (4 * i)
    if along_rows:
        packed = packed.T
    return torch.from_numpy(np.ascontiguousarray(packed).view(np.int32))


def ct_w4a16(w: torch.Tensor, *, symmetric: bool, group_size: int | None = W4_GROUP) -> tuple[dict, torch.Tensor]:
    """compressed-tensors pack-quantized: per group of ``group_size`` input columns (None: one per row)."""
    n, k = w.shape
    g = k if group_size is None else group_size
    groups = w.reshape(n, k // g, g)
    if symmetric:
        scale = (groups.abs().amax(-1) / 7.5).clamp_min(1e-8).to(torch.bfloat16)  # [N, G]
        zero = torch.zeros(n, k // g)
    else:
        lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp_min(1e-8).to(torch.bfloat16)
        zero = torch.clamp(-8 - torch.round(lo / scale.float()), -8, 7)
    s = scale.float()[..., None]
    q = torch.clamp(torch.round(groups / s) + zero[..., None], -8, 7)
    dense = ((q - zero[..., None]) * s).reshape(n, k)
    tensors = {
        "weight_packed": pack_to_int32(q.reshape(n, k).numpy().astype(np.int64)),
        "weight_scale": scale,
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if not symmetric:
        tensors["weight_zero_point"] = pack_to_int32(zero.numpy().astype(np.int64), along_rows=True)
    return tensors, dense


def ct_int8(w: torch.Tensor, *, per_tensor: bool = False) -> tuple[dict, torch.Tensor]:
    top = w.abs().amax().reshape(1) if per_tensor else w.abs().amax(dim=1, keepdim=True)
    scale = (top / 127).to(torch.bfloat16)  # [N, 1] or [1], in the model's dtype
    q = torch.clamp(torch.round(w / scale.float()), -127, 127)
    return {"weight": q.to(torch.int8), "weight_scale": scale}, q * scale.float()


def _group(weights: dict[str, Any], acts: dict[str, Any] | None, fmt: str) -> dict[str, Any]:
    group = {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": fmt, "config_groups": {"group_0": group},
            "ignore": ["lm_head"], "quantization_status": "compressed", "kv_cache_scheme": None,
            "sparsity_config": {}}  # fmt: skip


def _args(num_bits: int, type_: str, strategy: str, **extra: Any) -> dict[str, Any]:
    return {"num_bits": num_bits, "type": type_, "symmetric": True, "strategy": strategy, "dynamic": False,
            "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax", **extra}  # fmt: skip


DYNAMIC = {"dynamic": True, "observer": None}
FORMATS: dict[str, tuple[dict[str, Any], Quantizer]] = {
    "fp8-tensor-dynamic": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, fp8_per_tensor),
    "fp8-tensor-static": (
        {"quant_method": "fp8", "activation_scheme": "static"},
        lambda w: fp8_per_tensor(w, static=True, shape=(1,)),
    ),
    "fp8-channel": ({"quant_method": "fp8", "activation_scheme": "dynamic"}, fp8_per_channel),
    "fp8-block": (
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]},
        fp8_blocks,
    ),
    "ct-w4a16-sym": (
        _group(_args(4, "int", "group", group_size=W4_GROUP), None, "pack-quantized"),
        lambda w: ct_w4a16(w, symmetric=True),
    ),
    "ct-w4a16-asym": (
        _group(_args(4, "int", "group", group_size=W4_GROUP, symmetric=False), None, "pack-quantized"),
        lambda w: ct_w4a16(w, symmetric=False),
    ),
    "ct-w4a16-channel": (
        _group(_args(4, "int", "channel"), None, "pack-quantized"),
        lambda w: ct_w4a16(w, symmetric=True, group_size=None),
    ),
    "ct-w8a8-int8": (
        _group(_args(8, "int", "channel"), _args(8, "int", "token", **DYNAMIC), "int-quantized"),
        ct_int8,
    ),
    "ct-w8a8-int8-tensor": (
        _group(_args(8, "int", "tensor"), _args(8, "int", "token", **DYNAMIC), "int-quantized"),
        lambda w: ct_int8(w, per_tensor=True),
    ),
    "ct-fp8-dynamic": (
        _group(_args(8, "float", "channel"), _args(8, "float", "token", **DYNAMIC), "float-quantized"),
        lambda w: fp8_per_channel(w, column=True),
    ),
    "ct-fp8-static": (
        _group(_args(8, "float", "tensor"), _args(8, "float", "tensor"), "float-quantized"),
        lambda w: fp8_per_tensor(w, static=True, shape=(1,)),
    ),
    "ct-fp8-block": (
        _group(_args(8, "float", "block", block_structure=[BLOCK, BLOCK]),
               _args(8, "float", "group", group_size=BLOCK, **DYNAMIC), "float-quantized"),
        lambda w: fp8_blocks(w, scale_name="weight_scale"),
    ),
}  # fmt: skip


def write_checkpoint(
    name: str, path: Path, tiny: dict[str, Any], *, plain: tuple[str, ...] = (), qc: dict[str, Any] | None = None
) -> tuple[Path, torch.nn.Module]:
    """(checkpoint directory, the transformers Llama holding its dequantized weights) of format ``name``.
    ``plain``: module names (``model.layers.1.mlp.down_proj``) written as float matrices, as a file whose
    config ignores them stores them; ``qc``: the quantization_config to write instead of the format's."""
    import transformers
    from safetensors.torch import save_file

    default_qc, quantize = FORMATS[name]
    qc = default_qc if qc is None else qc
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**tiny)).eval()
    state: dict[str, torch.Tensor] = {}
    for param_name, tensor in model.state_dict().items():
        module, _, kind = param_name.rpartition(".")
        projection = module.rsplit(".", 1)[-1]
        if projection not in PROJECTIONS or kind != "weight" or module in plain:
            state[param_name] = tensor.contiguous()
            continue
        packed, dense = quantize(tensor.float() * SPREAD.get(projection, 1.0))
        state.update({f"{module}.{k}": v.contiguous() for k, v in packed.items()})
        with torch.no_grad():
            tensor.copy_(dense)  # the oracle runs the dequantized weight
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**model.config.to_dict(), "quantization_config": qc}))
    return path, model
