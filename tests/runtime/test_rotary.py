"""The rotary layer's CPU path (cos/sin gathered once per step, rotate-half in float32) equals the reference op."""

from __future__ import annotations

import pytest
import torch

from kubellm.runtime.kernels import cpu
from kubellm.runtime.kernels.cpu_backend import CpuAttentionBackend
from kubellm.runtime.kernels.interface import AttentionBackend
from kubellm.runtime.kernels.reference import rotary_embedding
from kubellm.runtime.kernels.torch_backend import TorchAttentionBackend
from kubellm.runtime.layers.rotary import RotaryEmbedding


@pytest.mark.parametrize("kernels", ["cpu-kernels", "torch-ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_rotary_equals_the_reference_across_steps(dtype: torch.dtype, kernels: str) -> None:
    """Both CPU backends: the C++ kernel, and the torch composition that serves without it."""
    backend: AttentionBackend
    if kernels == "torch-ops":
        backend = TorchAttentionBackend()
    else:
        loaded = cpu.load()
        assert loaded is not None
        backend = CpuAttentionBackend(loaded)
    gen = torch.Generator().manual_seed(7)
    num_heads, num_kv_heads, head_dim = 6, 2, 32
    scaling = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64}
    rope = RotaryEmbedding(head_dim, 256, 10000.0, scaling, backend, dtype=dtype)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    # two steps with different positions: the second must not reuse the first step's cos/sin
    for positions in (torch.tensor([0, 5, 6, 200]), torch.tensor([3, 255, 1])):
        qkv = torch.randn((len(positions), width), generator=gen).to(dtype)
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, num_heads, head_dim)  # strided views into qkv, as the attention layer passes them
        k = k.view(-1, num_kv_heads, head_dim)
        before = qkv.clone()
        for _ in range(3):  # every layer of a step calls with the same positions tensor
            out_q, out_k = rope(positions, q, k)
            ref_q, ref_k = rotary_embedding(positions, q.clone(), k.clone(), rope.cos_sin_cache)
            tol = 1e-6 if dtype == torch.float32 else 2**-7
            torch.testing.assert_close(out_q, ref_q, rtol=tol, atol=tol)
            torch.testing.assert_close(out_k, ref_k, rtol=tol, atol=tol)
            assert out_q.shape == q.shape and out_k.shape == k.shape
            # the attention layer's CPU path: query and key heads rotated in one pass over their adjacent columns
            qk_q, qk_k = rope.rotate_qk(positions, qkv[:, : q_size + kv_size].view(len(positions), -1, head_dim), 6)
            assert torch.equal(qk_q, out_q) and torch.equal(qk_k, out_k)
        assert torch.equal(qkv, before)  # the inputs are left alone
