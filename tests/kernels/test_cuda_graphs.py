"""Decode CUDA graphs and the GPU profiling pass.

On the CPU the capture/replay seam takes an eager stand-in that re-runs the captured function on the same
static buffers, with the Triton backend under the interpreter: this checks everything but CUDA itself (the
buffers, the padding rows, the choice of size, the metadata a graph holds fixed). Under ``-m gpu`` the real
graphs run and must give the eager engine's tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kubellm.runtime.engine import cuda_graphs, model_runner
from kubellm.runtime.engine.cuda_graphs import DecodeGraphs, capture_sizes, dummy_prefill_forward
from kubellm.runtime.kernels.backend import TritonAttentionBackend
from kubellm.runtime.llm import LLM
from kubellm.runtime.sampling_params import SamplingParams

TINY_LLAMA = {
    "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-5,
    "max_position_embeddings": 128, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}  # fmt: skip


class EagerGraph:
    """Stands in for a CUDA graph: replay re-runs the captured function and writes into the same output buffer."""

    replays = 0

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        EagerGraph.replays += 1
        self.out.copy_(self.fn())


def test_capture_sizes() -> None:
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(1000) == capture_sizes(256)
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(1) == [1]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]


@pytest.fixture
def triton_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine picks the Triton backend on the CPU too (the interpreter runs it)."""
    monkeypatch.setattr(model_runner, "get_attention_backend", lambda device: TritonAttentionBackend())


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return path


def make_llm(config_path: Path, device: str = "cpu", **overrides: Any) -> LLM:
    fields: dict[str, Any] = {
        "load_format": "dummy", "device": device, "dtype": "float32", "block_size": 8, "max_num_seqs": 6,
        "kv_cache_memory_bytes": 1 << 20,
    }  # fmt: skip
    fields.update(overrides)
    return LLM(model=str(config_path), **fields)


def workload(llm: LLM) -> list[list[int]]:
    """Six requests of different lengths: the decode batches shrink 6, 5, ..., 1 as they finish, so most steps
    pad to a larger captured size. Returns each request's token ids."""
    prompts = [[(5 * i + 7 * j) % 250 + 3 for j in range(3 + 4 * i)] for i in range(6)]
    params = [SamplingParams(max_tokens=2 + 2 * i, temperature=0.0, ignore_eos=True) for i in range(6)]
    outputs = llm.generate(prompts, params)  # type: ignore[arg-type]
    llm.engine.block_manager.check_all_free()
    return [out.outputs[0].token_ids for out in outputs]


@pytest.mark.slow
def test_replayed_decode_steps_give_the_eager_tokens(tiny_config: Path, triton_backend: None) -> None:
    expected = workload(make_llm(tiny_config))

    llm = make_llm(tiny_config)
    runner = llm.engine.runner
    with torch.inference_mode():
        runner.graphs = DecodeGraphs(
            llm.engine.model,
            runner.kv_caches,
            sizes=[1, 2, 4, 6],
            max_blocks_per_seq=16,
            max_seq_len=128,
            device=torch.device("cpu"),
            graph_factory=EagerGraph,
        )
    assert sorted(runner.graphs.outputs) == [1, 2, 4, 6]
    assert runner.graphs.size_for(3) == 4 and runner.graphs.size_for(5) == 6 and runner.graphs.size_for(1) == 1
    EagerGraph.replays = 0
    actual = workload(llm)
    assert EagerGraph.replays >= 10  # every decode step of the run replayed
    assert actual == expected

    with pytest.raises(ValueError, match="exceeds the captured"):
        runner.graphs.run([1], [0], [0], [list(range(17))], [1])
    with pytest.raises(ValueError, match="increasing order"):
        DecodeGraphs(llm.engine.model, runner.kv_caches, sizes=[4, 2], max_blocks_per_seq=1, max_seq_len=8,
                     device=torch.device("cpu"), graph_factory=EagerGraph)  # fmt: skip


def test_graphs_refuse_the_torch_backend(tiny_config: Path) -> None:
    """The torch backend reads per-step host lists, which a replayed graph would never see change."""
    llm = make_llm(tiny_config)
    with pytest.raises(ValueError, match="reads no host state"):
        DecodeGraphs(llm.engine.model, llm.engine.runner.kv_caches, sizes=[1], max_blocks_per_seq=1,
                     max_seq_len=8, device=torch.device("cpu"), graph_factory=EagerGraph)  # fmt: skip


def test_padding_rows_neither_write_nor_change_the_real_rows(tiny_config: Path, triton_backend: None) -> None:
    """A batch of 1 replayed at size 4: the three padding rows keep slot -1 and length 0."""
    llm = make_llm(tiny_config)
    with torch.inference_mode():
        graphs = DecodeGraphs(
            llm.engine.model, llm.engine.runner.kv_caches, sizes=[4], max_blocks_per_seq=4, max_seq_len=32,
            device=torch.device("cpu"), graph_factory=EagerGraph,
        )  # fmt: skip
        graphs.slot_mapping.fill_(7)  # stale values from an earlier, wider step
        graphs.seq_lens.fill_(9)
        seen: dict[str, list[int]] = {}
        graph = graphs.graphs[4]
        assert isinstance(graph, EagerGraph)
        real_fn = graph.fn

        def spy() -> torch.Tensor:
            seen["slots"] = graphs.slot_mapping.tolist()
            seen["lens"] = graphs.seq_lens.tolist()
            seen["tables"] = graphs.block_tables[0, :2].tolist()
            return real_fn()

        graph.fn = spy
        hidden = graphs.run(input_ids=[5], positions=[0], slot_mapping=[3], block_tables=[[2]], seq_lens=[1])
    assert hidden.shape == (1, TINY_LLAMA["hidden_size"])
    assert seen["slots"] == [3, -1, -1, -1] and seen["lens"] == [1, 0, 0, 0] and seen["tables"][0] == 2


def test_dummy_prefill_forward_covers_the_largest_step_without_touching_a_cache(tiny_config: Path) -> None:
    llm = make_llm(tiny_config)
    caches = [c.clone() for c in llm.engine.runner.kv_caches]
    logits = dummy_prefill_forward(llm.engine.model, num_tokens=300, max_model_len=128, num_logits=6, block_size=8)
    assert logits.shape == (6, TINY_LLAMA["vocab_size"]) and logits.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(caches, llm.engine.runner.kv_caches, strict=True))


@pytest.mark.gpu
def test_cuda_graphs_on_a_gpu(tiny_config: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    eager = make_llm(tiny_config, device="cuda", enforce_eager=True)
    assert eager.engine.runner.graphs is None
    expected = workload(eager)
    graphed = make_llm(tiny_config, device="cuda")
    assert graphed.engine.runner.graphs is not None
    assert graphed.engine.runner.graphs.sizes == capture_sizes(6)
    assert isinstance(graphed.engine.runner.graphs.graphs[1], cuda_graphs.CudaGraph)
    assert workload(graphed) == expected


@pytest.mark.gpu
def test_profiled_activations_grow_with_the_step(tiny_config: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    llm = make_llm(tiny_config, device="cuda", enforce_eager=True)
    small = cuda_graphs.profile_activation_bytes(
        llm.engine.model, num_tokens=64, max_model_len=128, num_logits=4, block_size=8
    )
    large = cuda_graphs.profile_activation_bytes(
        llm.engine.model, num_tokens=4096, max_model_len=128, num_logits=256, block_size=8
    )
    assert 0 < small < large
    # without an explicit budget the engine sizes its cache from the profile, inside gpu_memory_utilization
    sized = make_llm(tiny_config, device="cuda", kv_cache_memory_bytes=None, gpu_memory_utilization=0.5)
    stats = sized.engine.stats()
    free, total = torch.cuda.mem_get_info()
    assert stats.num_gpu_blocks > 0 and total - free <= 0.5 * total + (512 << 20)
