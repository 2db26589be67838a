"""FP8 and compressed-tensors checkpoints end to end, as test_checkpoints.py does for AWQ / GPTQ: a tiny random
Llama built by transformers, its linears quantized in the test into each format's tensors (ckpt_writers.py,
from the published layouts) and loaded by our engine from the directory. The oracle is transformers running the
dequantized weights in float32: logits equal to float tolerance, greedy continuations equal (up to a near-tie);
tensor parallelism (gloo, 2 ranks) gives TP 1's tokens; unsupported schemes and broken files are refused at start
with the field or tensor named."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from quantization.ckpt_writers import FORMATS, fp8_blocks, fp8_per_tensor, write_checkpoint
from quantization.test_checkpoints import TINY, assert_tp2_equals_tp1, draw_prompts, greedy_tokens, our_logits
from transformers_oracle import assert_greedy_agrees

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.layers.linear import Linear
from kubellm.runtime.quantization import w4
from kubellm.runtime.quantization.base import LinearMethod
from kubellm.runtime.quantization.compressed_tensors_methods import Int8CheckpointMethod, PackedW4Method
from kubellm.runtime.quantization.dense import DenseMethod
from kubellm.runtime.quantization.fp8_checkpoint import Fp8BlockMethod, Fp8CheckpointMethod
from kubellm.runtime.quantization.online import FP8, scaled_mm_supported
from kubellm.runtime.quantization.registry import quant_config_for

METHODS: dict[str, type[LinearMethod]] = {"fp8": Fp8CheckpointMethod, "fp8-block": Fp8BlockMethod,
                                          "ct-w4a16": PackedW4Method, "ct-w8a8-int8": Int8CheckpointMethod,
                                          "ct-fp8-block": Fp8BlockMethod, "ct-fp8": Fp8CheckpointMethod}  # fmt: skip
KV = 1 << 22


def method_of(name: str) -> type[LinearMethod]:
    return next(m for prefix, m in sorted(METHODS.items(), key=lambda kv: -len(kv[0])) if name.startswith(prefix))


def engine_for(path: Path, **kwargs: Any) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu", kv_cache_memory_bytes=KV, **kwargs))


@pytest.fixture(scope="module", params=list(FORMATS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    path, model = write_checkpoint(request.param, tmp_path_factory.mktemp("ckpt") / request.param, TINY)
    return request.param, path, model


def test_logits_and_greedy_tokens_equal_the_dequantized_float32_model(checkpoint: tuple[str, Path, Any]) -> None:
    name, path, hf_model = checkpoint
    engine = engine_for(path)
    assert engine.quantization == FORMATS[name][0]["quant_method"]  # auto follows the checkpoint's config
    linears = [m for m in engine.model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * TINY["num_hidden_layers"]
    assert all(type(m.method) is method_of(name) for m in linears), {type(m.method) for m in linears}
    prompts = draw_prompts()
    for prompt in prompts:
        with torch.inference_mode():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(our_logits(engine, prompt), expected, rtol=1e-4, atol=1e-4)
    assert_greedy_agrees(hf_model, prompts, greedy_tokens(engine, prompts))


@pytest.mark.parametrize("name", ["fp8-channel", "fp8-block", "ct-w4a16-asym", "ct-w8a8-int8"])
def test_bfloat16_serving_stays_within_bf16_rounding(name: str, tmp_path: Path) -> None:
    """bf16 activations take the formats' bf16 kernels (torch's int8 / int4 CPU matmuls, fp8 widened to bf16).
    Bound: bf16 keeps 8 significant bits (relative rounding 2^-9 per operation); two layers of it move these
    logits (|logit| < 1) by ~5e-3 here, so 3e-2 is a few times that, far below any layout error (>= 0.1)."""
    path, hf_model = write_checkpoint(name, tmp_path / name, TINY)
    engine = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", device="cpu", kv_cache_memory_bytes=KV))
    for prompt in draw_prompts(2):
        with torch.inference_mode():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(our_logits(engine, prompt).float(), expected, rtol=0, atol=3e-2)


def test_w4a16_without_the_avx512_int4_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An AVX2-only CPU (CI) serves W4A16 with the torch reference over the repacked layout, not torch's int4
    kernel: the same logits."""
    monkeypatch.setattr(w4, "cpu_int4_is_fast", lambda: False)
    path, hf_model = write_checkpoint("ct-w4a16-asym", tmp_path / "w4", TINY)
    engine = engine_for(path)
    methods = [m.method for m in engine.model.modules() if isinstance(m, Linear)]
    assert all(isinstance(m, PackedW4Method) and m.int4pack is None and m.w4 is not None for m in methods)
    for prompt in draw_prompts(2):
        with torch.inference_mode():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(our_logits(engine, prompt), expected, rtol=1e-4, atol=1e-4)


def test_fp8_weights_are_held_once_as_fp8_and_merged_shards_keep_their_own_scales(tmp_path: Path) -> None:
    path, _ = write_checkpoint("fp8-tensor-static", tmp_path / "fp8", TINY)
    engine = engine_for(path)
    qkv = engine.model.layers[0].self_attn.qkv_proj
    method = qkv.method
    assert isinstance(method, Fp8CheckpointMethod) and method.codes is not None and method.scale is not None
    assert method.codes.dtype == FP8 and method.scale.dtype == torch.float32
    assert list(qkv.parameters()) == []  # the checkpoint tensors are dropped: the method's copy is the weight
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    prefix = "model.layers.0.self_attn"
    file_scales = [state[f"{prefix}.{p}.weight_scale"] for p in ("q_proj", "k_proj", "v_proj")]
    rows = [TINY["num_attention_heads"] * TINY["head_dim"]] + [TINY["num_key_value_heads"] * TINY["head_dim"]] * 2
    expected = torch.cat([s.float().expand(r) for s, r in zip(file_scales, rows, strict=True)])
    assert len({float(s) for s in file_scales}) == 3  # v_proj is scaled up: the shards' scales differ
    assert torch.equal(method.scale, expected)  # each shard's own scale, not requantized to a common one
    input_scales = [state[f"{prefix}.{p}.input_scale"] for p in ("q_proj", "k_proj", "v_proj")]
    assert method.input_scale is not None and float(method.input_scale) == max(float(s) for s in input_scales)


@pytest.mark.parametrize("name", ["fp8-tensor-dynamic", "fp8-block", "ct-w4a16-asym"])
def test_tensor_parallel_2_equals_1(name: str, tmp_path: Path) -> None:
    path, _ = write_checkpoint(name, tmp_path / name, TINY)
    assert_tp2_equals_tp1(path, KV)


def _ct(name: str) -> dict[str, Any]:
    return copy.deepcopy(FORMATS[name][0])


def _group0(qc: dict[str, Any]) -> dict[str, Any]:
    return qc["config_groups"]["group_0"]


def _refusals() -> list[tuple[dict[str, Any], str]]:
    cases = []
    w4a8 = _ct("ct-w4a16-sym")
    _group0(w4a8)["input_activations"] = _ct("ct-w8a8-int8")["config_groups"]["group_0"]["input_activations"]
    cases.append((w4a8, r"'quantization_config\.config_groups\.group_0\.input_activations' .*W4A8"))
    sparse = _ct("ct-w4a16-sym")
    sparse["sparsity_config"] = {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"]}
    cases.append((sparse, r"'quantization_config\.sparsity_config' .*2:4"))
    marlin = _ct("ct-w4a16-sym")
    marlin["format"] = "marlin-24"
    cases.append((marlin, r"'quantization_config\.format' is 'marlin-24'"))
    actorder = _ct("ct-w4a16-sym")
    _group0(actorder)["weights"]["actorder"] = "group"
    cases.append((actorder, r"'quantization_config\.config_groups\.group_0\.weights\.actorder' is 'group'"))
    static_int8 = _ct("ct-w8a8-int8")
    _group0(static_int8)["input_activations"].update(dynamic=False, strategy="tensor")
    cases.append((static_int8, r"'quantization_config\.config_groups\.group_0\.input_activations\.dynamic'"))
    two_groups = _ct("ct-w8a8-int8")
    two_groups["config_groups"]["group_1"] = _group0(two_groups)
    cases.append((two_groups, r"'quantization_config\.config_groups' is 2: exactly one"))
    head = _ct("ct-fp8-dynamic")
    head["ignore"] = []
    cases.append((head, r"'quantization_config\.ignore' is \[\]: the head \(lm_head\) is a target"))
    kv = _ct("ct-fp8-dynamic")
    kv["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
    cases.append((kv, r"'quantization_config\.kv_cache_scheme'"))
    three_bits = _ct("ct-w4a16-sym")
    _group0(three_bits)["weights"]["num_bits"] = 3
    cases.append((three_bits, r"'quantization_config\.config_groups\.group_0\.weights\.num_bits' is 3"))
    fp8_scheme = {"quant_method": "fp8", "activation_scheme": "per-tensor"}
    cases.append((fp8_scheme, r"'quantization_config\.activation_scheme' is 'per-tensor'"))
    fp8_block = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128]}
    cases.append((fp8_block, r"'quantization_config\.weight_block_size' must be two positive integers"))
    fp8_skip = {"quant_method": "fp8", "ignored_layers": "lm_head"}
    cases.append((fp8_skip, r"'quantization_config\.ignored_layers' must be a list of module names"))
    return cases


@pytest.mark.parametrize(("qc", "message"), _refusals())
def test_an_unsupported_scheme_is_refused_naming_the_config_field(qc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        quant_config_for(qc["quant_method"], {"quantization_config": qc})


def test_an_unsupported_scheme_fails_the_engine_at_start(tmp_path: Path) -> None:
    qc = _ct("ct-w4a16-sym")
    _group0(qc)["weights"]["actorder"] = "group"
    path, _ = write_checkpoint("ct-w4a16-sym", tmp_path / "ct", TINY, qc=qc)
    with pytest.raises(ValueError, match=r"'quantization_config\.config_groups\.group_0\.weights\.actorder'"):
        engine_for(path)


PLAIN = ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj")


def _ignoring(name: str) -> dict[str, Any]:
    """The format's config with PLAIN left unquantized: by ignore entries (a name, a regex), or for fp8 by
    ignored_layers; compressed-tensors' targets also leave out layer 1's down_proj (the file stores it plain)."""
    qc = _ct(name)
    if qc["quant_method"] == "fp8":
        return {**qc, "ignored_layers": ["lm_head", *PLAIN]}
    qc["ignore"] = ["re:.*lm_head", "re:model\\.layers\\.0\\.mlp\\.(gate|up)_proj", PLAIN[2]]
    _group0(qc)["targets"] = ["re:.*self_attn\\.[qkvo]_proj$", "re:.*mlp\\.(gate|up)_proj$", "layers.0.mlp.down_proj"]
    return qc


@pytest.mark.parametrize("name", ["ct-w8a8-int8", "ct-w4a16-sym", "fp8-channel"])
def test_linears_the_config_leaves_out_are_served_plain(name: str, tmp_path: Path) -> None:
    qc = _ignoring(name)
    untargeted = () if qc["quant_method"] == "fp8" else ("model.layers.1.mlp.down_proj",)
    path, hf_model = write_checkpoint(name, tmp_path / name, TINY, plain=PLAIN + untargeted, qc=qc)
    engine = engine_for(path)
    modules = dict(engine.model.named_modules())
    dense = [modules[n] for n in ("layers.0.mlp.gate_up_proj", "layers.1.self_attn.o_proj")]
    dense += [modules[n.removeprefix("model.")] for n in untargeted]
    assert all(type(m.method) is DenseMethod for m in dense)
    quantized = [m for m in engine.model.modules() if isinstance(m, Linear) and not any(m is d for d in dense)]
    assert len(quantized) == 4 * TINY["num_hidden_layers"] - len(dense)
    assert all(type(m.method) is method_of(name) for m in quantized)
    for prompt in draw_prompts(2):
        with torch.inference_mode():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(our_logits(engine, prompt), expected, rtol=1e-4, atol=1e-4)


def test_merged_shards_quantized_differently_are_refused(tmp_path: Path) -> None:
    qc = _ct("ct-fp8-dynamic")
    qc["ignore"] = ["lm_head", "model.layers.1.self_attn.k_proj"]
    path, _ = write_checkpoint(
        "ct-fp8-dynamic", tmp_path / "ct", TINY, plain=("model.layers.1.self_attn.k_proj",), qc=qc
    )
    with pytest.raises(ValueError, match=r"ignore' leave \['model\.layers\.1\.self_attn\.k_proj'\] unquantized but"):
        engine_for(path)


def test_a_quantization_flag_that_contradicts_the_checkpoint_fails_at_start(tmp_path: Path) -> None:
    path, _ = write_checkpoint("ct-w8a8-int8", tmp_path / "ct", TINY)
    with pytest.raises(ValueError, match=r"quantization 'int8' does not match .*quant_method' is 'compressed-tensors'"):
        engine_for(path, quantization="int8")
    fp8_path, _ = write_checkpoint("fp8-channel", tmp_path / "fp8", TINY)
    with pytest.raises(ValueError, match=r"quantization 'awq' does not match .*quant_method' is 'fp8'"):
        engine_for(fp8_path, quantization="awq")
    with pytest.raises(ValueError, match=r"quantization 'compressed-tensors' needs a checkpoint quantized so"):
        quant_config_for("compressed-tensors", {})
    assert engine_for(fp8_path, quantization="fp8").quantization == "fp8"  # the flag may repeat the format


@pytest.mark.parametrize(
    ("name", "drop", "message"),
    [
        ("fp8-tensor-static", "model.layers.1.self_attn.k_proj.input_scale", r"self_attn\.qkv_proj\.k\.input_scale"),
        ("fp8-channel", "model.layers.0.mlp.down_proj.weight_scale", r"mlp\.down_proj\.weight_scale"),
        ("fp8-block", "model.layers.0.mlp.up_proj.weight_scale_inv", r"gate_up_proj\.up\.weight_scale_inv"),
        ("ct-w4a16-asym", "model.layers.1.mlp.gate_proj.weight_zero_point", r"gate\.weight_zero_point"),
        ("ct-w8a8-int8", "model.layers.0.self_attn.o_proj.weight_scale", r"o_proj\.weight_scale"),
    ],
)
def test_a_missing_scale_tensor_is_named(name: str, drop: str, message: str, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path, _ = write_checkpoint(name, tmp_path / name, TINY)
    state = load_file(str(path / "model.safetensors"))
    del state[drop]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"checkpoint is missing 1 tensors.*{message}"):
        engine_for(path)


def test_wrong_codes_and_scale_shapes_are_named(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path, _ = write_checkpoint("fp8-channel", tmp_path / "fp8", TINY)
    state = load_file(str(path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj"
    state[f"{name}.weight"] = state[f"{name}.weight"].float()  # a float matrix where the format stores fp8
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"down_proj\.weight: weight: checkpoint dtype is torch.float32, expected"):
        engine_for(path)
    state[f"{name}.weight"] = state[f"{name}.weight"].to(FP8)
    state[f"{name}.weight_scale"] = torch.ones(3)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"down_proj\.weight_scale: weight_scale: checkpoint has shape \(3,\)"):
        engine_for(path)


def test_the_config_files_of_published_checkpoints_are_read() -> None:
    """quantization_config blocks as published checkpoints carry them (abridged from their config.json)."""
    w4a16 = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "input_activations": None,
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": 128,
                    "dynamic": False,
                    "actorder": "weight",
                    "observer": "minmax",
                },
            }
        },
        "kv_cache_scheme": None,
        "quantization_status": "compressed",
        "global_compression_ratio": 1.9,
    }
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    # the older naive-quantized format (int- and float-quantized are its aliases): the weights' type decides
    naive_fp8 = _ct("ct-fp8-dynamic") | {"format": "naive-quantized"}
    naive_int8 = _ct("ct-w8a8-int8") | {"format": "naive-quantized"}
    expected = [(w4a16, PackedW4Method), (fp8, Fp8BlockMethod), (naive_fp8, Fp8CheckpointMethod),
                (naive_int8, Int8CheckpointMethod)]  # fmt: skip
    for qc, method in expected:
        config = quant_config_for(qc["quant_method"], {"quantization_config": json.loads(json.dumps(qc))})
        assert config is not None and type(config.linear_method()) is method
    with pytest.raises(ValueError, match=r"'quantization_config\.fmt' is 'e5m2'"):
        quant_config_for("fp8", {"quantization_config": {**fp8, "fmt": "e5m2"}})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_checkpoint_layers_on_a_gpu_track_their_reference() -> None:
    """sm89+: row-wise _scaled_mm with the file's static input scale (the activations rounded to e4m3 exactly as
    the reference rounds them, so only accumulation order and the bf16 output differ); block-wise: the weight
    widened per matmul."""
    device = torch.device("cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(256, 512, device=device, generator=gen) * 0.05
    x = torch.randn(37, 512, device=device, generator=gen).to(torch.bfloat16)
    static = {"quant_method": "fp8", "activation_scheme": "static"}
    block = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    for qc, quantize in ((static, fp8_per_tensor), (block, fp8_blocks)):
        config = quant_config_for("fp8", {"quantization_config": qc})
        assert config is not None
        tensors, dense = quantize(w, **({"static": True} if qc is static else {"block": 128}))
        layer = Linear(512, 256, quant=config).to(device=device, dtype=torch.bfloat16)
        for param, tensor in tensors.items():
            layer.load_weight(param, tensor)
        layer.process_weights_after_loading()
        xr = x.float()
        if qc is static:
            if not scaled_mm_supported(device):
                continue
            assert "scaled_mm" in repr(layer)
            s = tensors["input_scale"].float()
            xr = (xr / s).clamp(-448.0, 448.0).to(FP8).float() * s
        ref = xr @ dense.t()
        assert float((layer(x).float() - ref).norm() / ref.norm()) < 1e-2
