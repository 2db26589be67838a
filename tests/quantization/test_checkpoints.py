"""AWQ and GPTQ checkpoints end to end: a tiny random Llama built by transformers, its linears quantized in the
test (round-to-nearest int4, quant_testing.py) and written as safetensors with a ``quantization_config``, loaded
by our engine from the directory. The oracle is transformers running the dequantized weights in float32: logits
equal to float tolerance, greedy continuations equal; tensor parallelism (gloo, 2 ranks) gives TP 1's tokens."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from quantization.quant_testing import awq_tensors, gptq_tensors, rtn_quantize
from transformers_oracle import assert_greedy_agrees

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.kernels.interface import AttentionMetadata
from kubellm.runtime.layers.linear import Linear
from kubellm.runtime.llm import LLM
from kubellm.runtime.models.loader import load_model
from kubellm.runtime.quantization.w4 import W4Method
from kubellm.runtime.sampling_params import SamplingParams

TINY = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}  # fmt: skip
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
INPUT_OF = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}
GROUP_SIZE = 32

FORMATS: dict[str, dict[str, Any]] = {
    "awq": {"quant_method": "awq", "bits": 4, "group_size": GROUP_SIZE, "zero_point": True, "version": "gemm"},
    "gptq-sym": {"quant_method": "gptq", "bits": 4, "group_size": GROUP_SIZE, "sym": True, "desc_act": False},
    "gptq-asym-act-order": {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP_SIZE,
        "sym": False,
        "desc_act": True,
    },
}


def write_quantized(name: str, path: Path) -> tuple[Path, torch.nn.Module]:
    """(checkpoint directory, the transformers model holding its dequantized weights)."""
    import transformers
    from safetensors.torch import save_file

    qc = FORMATS[name]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    state: dict[str, torch.Tensor] = {}
    for param_name, tensor in model.state_dict().items():
        module = param_name.rpartition(".")[0]
        if module.rsplit(".", 1)[-1] not in PROJECTIONS:
            state[param_name] = tensor.contiguous()
            continue
        # q/k/v share an input (so GPTQ's act order: one permutation per layer input), gate/up too
        seed = int(module.split(".")[2]) * 10 + INPUT_OF[module.rsplit(".", 1)[-1]]
        act_order = bool(qc.get("desc_act"))
        iw = rtn_quantize(tensor, GROUP_SIZE, sym=bool(qc.get("sym", False)), act_order=act_order, seed=seed)
        packed = awq_tensors(iw) if qc["quant_method"] == "awq" else gptq_tensors(iw, with_bias=tensor.shape[0])
        state.update({f"{module}.{k}": v for k, v in packed.items()})
        with torch.no_grad():
            tensor.copy_(iw.dense())  # the oracle runs the dequantized weight
    path.mkdir(parents=True)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({**model.config.to_dict(), "quantization_config": qc}))
    return path, model


@pytest.fixture(scope="module", params=list(FORMATS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Any]:
    path, model = write_quantized(request.param, tmp_path_factory.mktemp("ckpt") / request.param)
    return request.param, path, model


def our_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """All positions' logits [T, vocab] from one prefill of ``token_ids`` through the paged cache."""
    n = len(token_ids)
    num_blocks = -(-n // engine.cache_config.block_size)
    md = AttentionMetadata(
        slot_mapping=torch.arange(n, dtype=torch.int64),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None, :],
        seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        max_query_len=n, max_seq_len=n, num_decode_tokens=1 if n == 1 else 0, seq_lens_cpu=[n],
        query_start_loc_cpu=[0, n],
    )  # fmt: skip
    with torch.inference_mode():
        hidden = engine.model(torch.tensor(token_ids), torch.arange(n), engine.runner.kv_caches, md)
        return engine.model.compute_logits(hidden)


def draw_prompts(count: int = 3) -> list[list[int]]:
    seed = int(os.environ.get("KUBELLM_TEST_SEED") or random.randrange(2**31))
    print(f"prompt seed={seed} (replay with KUBELLM_TEST_SEED={seed})")
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY["vocab_size"]) for _ in range(rng.randint(4, 24))] for _ in range(count)]


def greedy_tokens(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 8) -> list[list[int]]:
    """The engine's greedy continuations of ``prompts``, batched; every KV block free afterwards."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    ours: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            ours[delta.request_id] += delta.outputs[0].token_ids if delta.outputs else []
    engine.block_manager.check_all_free()
    return [ours[str(i)] for i in range(len(prompts))]


def test_logits_and_greedy_tokens_equal_the_dequantized_float32_model(checkpoint: tuple[str, Path, Any]) -> None:
    name, path, hf_model = checkpoint
    engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 22))
    assert engine.quantization == FORMATS[name]["quant_method"]  # auto follows the checkpoint's config
    linears = [m for m in engine.model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * TINY["num_hidden_layers"] and all(isinstance(m.method, W4Method) for m in linears)
    prompts = draw_prompts()
    for prompt in prompts:
        with torch.inference_mode():
            expected = hf_model(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(our_logits(engine, prompt), expected, rtol=1e-4, atol=1e-4)
    assert_greedy_agrees(hf_model, prompts, greedy_tokens(engine, prompts))


@pytest.mark.parametrize("name", ["awq", "gptq-asym-act-order"])
def test_tensor_parallel_2_equals_1(name: str, tmp_path: Path) -> None:
    path, _ = write_quantized(name, tmp_path / name)
    assert_tp2_equals_tp1(path)


def assert_tp2_equals_tp1(path: Path, kv_cache_memory_bytes: int = 1 << 22) -> None:
    """Greedy tokens of the checkpoint at ``path`` under tensor_parallel_size 2 (gloo) equal those of 1."""
    prompts = draw_prompts()

    def greedy(tp: int) -> list[list[int]]:
        llm = LLM(str(path), device="cpu", dtype="float32", max_model_len=128, block_size=8,
                  kv_cache_memory_bytes=kv_cache_memory_bytes, tensor_parallel_size=tp)  # fmt: skip
        try:
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
        finally:
            llm.engine.runner.shutdown()

    assert greedy(2) == greedy(1)


def test_a_quantization_flag_that_contradicts_the_checkpoint_fails_at_start(tmp_path: Path) -> None:
    path, _ = write_quantized("awq", tmp_path / "awq")
    with pytest.raises(ValueError, match=r"quantization 'gptq' does not match .*quant_method' is 'awq'"):
        LLMEngine(EngineConfig(model=str(path), device="cpu", quantization="gptq", kv_cache_memory_bytes=1 << 22))


def test_the_loader_casts_floats_only(tmp_path: Path) -> None:
    """A dtype given to the loader casts scales, norms and embeddings, never packed codes or zero points."""
    path, _ = write_quantized("gptq-asym-act-order", tmp_path / "gptq")
    dtypes = {name: t.dtype for name, t in load_model(str(path), dtype=torch.bfloat16).weights or ()}
    assert dtypes["model.layers.0.self_attn.q_proj.qweight"] == torch.int32
    assert dtypes["model.layers.0.self_attn.q_proj.g_idx"] == torch.int32
    assert dtypes["model.layers.0.self_attn.q_proj.scales"] == torch.bfloat16
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16


def test_a_quantized_checkpoint_cannot_load_dummy_or_float_weights(tmp_path: Path) -> None:
    path, _ = write_quantized("awq", tmp_path / "awq")
    with pytest.raises(ValueError, match="load_format 'dummy' draws float weights; quantization 'awq'"):
        LLMEngine(EngineConfig(model=str(path), device="cpu", load_format="dummy", kv_cache_memory_bytes=1 << 22))
    # a float tensor where the format has packed ones: the error names the tensor and the format's tensors
    config = json.loads((path / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.qweight"]
    state["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 128)
    save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"down_proj.weight: weight: not a tensor of this layer's format, which has"):
        LLMEngine(EngineConfig(model=str(path), device="cpu", kv_cache_memory_bytes=1 << 22))
