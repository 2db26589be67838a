"""The quantization tests run the Triton W4A16 kernel on the CPU through Triton's interpreter (as tests/kernels
does): TRITON_INTERPRET=1 is set here, before the kernel module is imported, where no CUDA device is present."""

from __future__ import annotations

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("device", "quant_gemm"):  # imported earlier in compiled mode: redefine under the interpreter
        _module = sys.modules.get(f"kubellm.runtime.kernels.{_name}")
        if _module is not None:
            importlib.reload(_module)
