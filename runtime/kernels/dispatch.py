"""The one place that picks a device's backend (kernels/interface.py lists them), once, when a model is built."""

from __future__ import annotations

import torch

from . import cpu
from .interface import AttentionBackend
from .torch_backend import TorchAttentionBackend

__all__ = ["get_attention_backend"]


def get_attention_backend(device: torch.device) -> AttentionBackend:
    """Triton on CUDA (a failed import raises with its cause: no silent slow path on a GPU); on the CPU the C++
    kernels when they are built (else, logged once by kernels/cpu.py, the torch backend)."""
    if device.type == "cuda":
        try:
            from .backend import TritonAttentionBackend
        except ImportError as e:
            raise RuntimeError(f"the Triton attention backend for {device} cannot be imported: {e}") from e
        return TritonAttentionBackend()
    if device.type == "cpu":
        kernels = cpu.load()
        if kernels is not None:
            from .cpu_backend import CpuAttentionBackend

            return CpuAttentionBackend(kernels)
    return TorchAttentionBackend()
