"""The Triton backend inside the real engine (CPU, interpreter): the same greedy tokens and log-probabilities as
the CPU backend, through prefill chunks, prefix-cache hits (extend) and batched decodes.

The engine picks its backend by device (the C++ kernels' on the CPU); here its selector is pointed at the Triton
backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kubellm.runtime.engine import model_runner
from kubellm.runtime.kernels.backend import TritonAttentionBackend
from kubellm.runtime.llm import LLM
from kubellm.runtime.sampling_params import SamplingParams

# a 2-layer Llama with GQA group 2 and head_dim 16; dummy weights come from the engine's fixed seed
TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 512, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}  # fmt: skip


def _run(config_path: Path, kv_cache_dtype: str) -> tuple[str, list[Any]]:
    llm = LLM(
        model=str(config_path), load_format="dummy", device="cpu", dtype="float32", block_size=8,
        max_num_batched_tokens=24, enable_prefix_caching=True, kv_cache_memory_bytes=1 << 20,
        kv_cache_dtype=kv_cache_dtype,
    )  # fmt: skip
    shared = [(7 * i + 3) % 250 + 3 for i in range(29)]  # 29 tokens: three full blocks of 8 and a partial one
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)
    first = llm.generate([[*shared, 5, 6], [9] * 11, [4]], params)  # 31 tokens: chunked over two steps
    second = llm.generate([[*shared, 8, 9, 10]], params)  # reuses the shared prefix's cached blocks
    assert second[0].metrics.num_cached_tokens >= 24
    return llm.engine.model.layers[0].self_attn.backend.name, [*first, *second]


@pytest.mark.slow
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_engine_tokens_match_the_cpu_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kv_cache_dtype: str
) -> None:
    """Also with a quantized cache (int8 / fp8 codes, kernels/kv_quant.py): the Triton write, decode and prefill
    kernels against the C++ decode kernel and the torch prefill, on the scales each engine calibrated."""
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(TINY_LLAMA))
    backend, expected = _run(config_path, kv_cache_dtype)
    assert backend in ("cpu", "torch")  # the C++ kernels' backend where they are built, else the torch one

    monkeypatch.setattr(model_runner, "get_attention_backend", lambda device: TritonAttentionBackend())
    backend, actual = _run(config_path, kv_cache_dtype)
    assert backend == "triton"

    for want, got in zip(expected, actual, strict=True):
        (want_choice,), (got_choice,) = want.outputs, got.outputs
        assert got_choice.token_ids == want_choice.token_ids
        assert want_choice.logprobs is not None and got_choice.logprobs is not None
        want_lp = torch.tensor([lp.logprob for lp in want_choice.logprobs])
        got_lp = torch.tensor([lp.logprob for lp in got_choice.logprobs])
        torch.testing.assert_close(got_lp, want_lp, atol=1e-4, rtol=1e-4)
