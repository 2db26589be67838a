"""Where the Triton kernels may run, and what the device offers them.

On a CUDA device the kernels are compiled. On the CPU they run only under Triton's interpreter, which Triton
selects when each kernel is *defined* (at import of the kernel module), from the environment variable
``TRITON_INTERPRET=1``; the tests set it before importing anything from this package.
"""

from __future__ import annotations

import functools

import torch
import triton

__all__ = ["check_launchable", "dot_in_float32", "dot_precision", "next_power_of_2", "num_sms"]


def check_launchable(kernel: object, *tensors: torch.Tensor) -> None:
    """Fail clearly, instead of with a pointer error deep in Triton, when the tensors cannot reach the kernel."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    (device,) = devices
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if device.type == "cpu" and not interpreted:
        raise RuntimeError(
            "Triton kernels on CPU tensors need the interpreter: set TRITON_INTERPRET=1 before importing "
            "kubellm.runtime.kernels (or use the torch reference ops in kubellm.runtime.kernels.reference)"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on CUDA (or the CPU interpreter), got device {device}")


@functools.cache
def _num_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small fixed number elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def next_power_of_2(n: int) -> int:
    return int(triton.next_power_of_2(max(int(n), 1)))


def dot_in_float32(device: torch.device, *dtypes: torch.dtype) -> bool:
    """Whether kernels must upcast tl.dot operands: Triton's interpreter multiplies bfloat16 as raw integers."""
    return device.type == "cpu" and torch.bfloat16 in dtypes


def dot_precision(*dtypes: torch.dtype) -> str:
    """tl.dot input precision: a float32 model asked for float32 accuracy, so no tf32 rounding of its operands
    (ieee; slower, no tensor cores); other dtypes run on the tensor cores and ignore the setting."""
    return "ieee" if torch.float32 in dtypes else "tf32"
