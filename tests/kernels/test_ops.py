"""The backends' elementwise ops: the torch backend on the CPU (without loading Triton) and the Triton backend on
CUDA, each against the reference; and the dispatch that picks one per device."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kubellm.runtime.kernels import reference
from kubellm.runtime.kernels.interface import RopeTables
from kubellm.runtime.kernels.torch_backend import TorchAttentionBackend


def test_cpu_tensors_take_the_torch_backend_without_triton() -> None:
    code = (
        "import sys, torch\n"
        "from kubellm.runtime.kernels import reference\n"
        "from kubellm.runtime.kernels.dispatch import get_attention_backend\n"
        "from kubellm.runtime.kernels.interface import RopeTables\n"
        "ops = get_attention_backend(torch.device('cpu'))\n"
        "assert ops.name == 'torch' and not ops.supports_cuda_graphs, ops.name\n"
        "x = torch.randn(3, 8); w = torch.randn(8)\n"
        "assert torch.equal(ops.rms_norm(x, w, 1e-6, x)[0], reference.rms_norm(x, w, 1e-6, x)[0])\n"
        "assert torch.equal(ops.silu_and_mul(x), reference.silu_and_mul(x))\n"
        "cache = reference.rope_cos_sin_cache(8, 16)\n"
        "q, k = ops.rotary_embedding(torch.arange(3), x[:, None], x[:, None], RopeTables(cache, cache))\n"
        "rq, rk = reference.rotary_embedding(torch.arange(3), x[:, None].clone(), x[:, None].clone(), cache)\n"
        "torch.testing.assert_close(q, rq); torch.testing.assert_close(k, rk)\n"
        "assert not any(m == 'triton' or m.startswith('triton.') for m in sys.modules), 'triton was imported'\n"
    )
    # the torch compositions (the C++ kernels, within an ulp of these, are tests/runtime/test_cpu_kernels.py's)
    env = {**os.environ, "PYTHONSAFEPATH": "1", "CUDA_VISIBLE_DEVICES": "", "KUBELLM_CPU_KERNELS": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_failed_triton_import_on_cuda_raises_with_its_cause() -> None:
    """No silent slow path on a GPU: the dispatch names the import error (Triton made unimportable here)."""
    code = (
        "import sys, torch\n"
        "sys.modules['triton'] = None\n"
        "from kubellm.runtime.kernels.dispatch import get_attention_backend\n"
        "try:\n"
        "    get_attention_backend(torch.device('cuda'))\n"
        "except RuntimeError as e:\n"
        "    assert 'Triton attention backend' in str(e) and isinstance(e.__cause__, ImportError), repr(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.gpu
def test_cuda_tensors_take_the_triton_path(gen: torch.Generator) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    from kubellm.runtime.kernels.dispatch import get_attention_backend

    ops = get_attention_backend(torch.device("cuda"))
    assert ops.name == "triton" and ops.supports_cuda_graphs
    x = torch.randn((5, 64), generator=gen).to("cuda", torch.bfloat16)
    weight = torch.randn(64, generator=gen).to("cuda", torch.bfloat16)
    out, residual = ops.rms_norm(x, weight, 1e-6, x)
    ref_out, ref_residual = reference.rms_norm(x.cpu(), weight.cpu(), 1e-6, x.cpu())
    torch.testing.assert_close(out.cpu().float(), ref_out.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(residual.cpu().float(), ref_residual.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(
        ops.silu_and_mul(x).cpu().float(), reference.silu_and_mul(x.cpu()).float(), atol=2e-2, rtol=2e-2
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_torch_backend_ops_match_the_reference(gen: torch.Generator, dtype: torch.dtype) -> None:
    """The torch compositions (the fallback of the C++ kernels): rms_norm (with and without the residual)
    bit-equal to the reference; silu_and_mul within one rounding of it (half precision rounds the SiLU and the
    product separately); rotary within one rounding."""
    ops = TorchAttentionBackend()
    for rows in (1, 7, 64):
        x = torch.randn((rows, 96), generator=gen).to(dtype)
        residual = torch.randn((rows, 96), generator=gen).to(dtype)
        weight = (1 + 0.1 * torch.randn(96, generator=gen)).to(dtype)
        for res in (None, residual):
            out, new_residual = ops.rms_norm(x, weight, 1e-5, res)
            ref_out, ref_residual = reference.rms_norm(x, weight, 1e-5, res)
            assert torch.equal(out, ref_out) and torch.equal(new_residual, ref_residual)
        gate_up = torch.randn((rows, 2 * 96), generator=gen).to(dtype)
        ulp = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
        torch.testing.assert_close(
            ops.silu_and_mul(gate_up).float(), reference.silu_and_mul(gate_up).float(), rtol=2 * ulp, atol=ulp
        )
        cache = reference.rope_cos_sin_cache(32, 128, dtype=dtype)
        positions = torch.randint(0, 128, (rows,), generator=gen)
        q, k = torch.randn((2, rows, 3, 32), generator=gen).to(dtype)
        got_q, got_k = ops.rotary_embedding(positions, q, k, RopeTables(cache, cache.float()))
        ref_q, ref_k = reference.rotary_embedding(positions, q.clone(), k.clone(), cache)
        torch.testing.assert_close(got_q.float(), ref_q.float(), rtol=2 * ulp, atol=2 * ulp)
        torch.testing.assert_close(got_k.float(), ref_k.float(), rtol=2 * ulp, atol=2 * ulp)
    with pytest.raises(ValueError, match="residual must have"):
        ops.rms_norm(x, weight, 1e-5, residual[:1])
    with pytest.raises(ValueError, match="must be even"):
        ops.silu_and_mul(torch.zeros(2, 5))
