"""Triton kernel tests: on the CPU through Triton's interpreter, on CUDA (``-m gpu``) compiled.

Triton picks the interpreter when a kernel is defined, so TRITON_INTERPRET=1 is set here, before any kernel
module is imported, and only where no CUDA device is present (on a GPU machine the kernels compile for it).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

try:
    import kubellm.runtime  # noqa: F401
except ImportError:
    # a bare copy of the tree (the GPU machine of bench/run_gpu.sh): register the packages from the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "gpu"))
    import gpubench

    gpubench.ensure_kubellm()

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    # A kernel module imported before this conftest (by another test folder) holds compiled-mode kernels: redefine
    # them under the interpreter, dependencies first.
    for _name in ("device", "kv_cache", "paged_attention", "prefill_attention", "fused", "backend"):
        _module = sys.modules.get(f"kubellm.runtime.kernels.{_name}")
        if _module is not None:
            importlib.reload(_module)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    if request.param == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device on this machine")
    if request.param == "cpu" and HAS_CUDA:
        pytest.skip("a CUDA device is present, so kernels compile for it: the interpreter variants run without one")
    return torch.device(request.param)


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fresh seed, printed (shown on failure); KUBELLM_TEST_SEED=<n> replays one."""
    seed = int(os.environ.get("KUBELLM_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"seed={seed} (replay with KUBELLM_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)
