"""The CPU kernels of cpu_ops.cpp and cpu_quant_ops.cpp (the int8 group matmul), one module built on first use with
torch.utils.cpp_extension (a C++ compiler and ninja).

``load()`` returns the compiled module, or None where it cannot be had (no compiler, say): callers then use the
torch compositions, which compute the same thing in more calls. Builds are cached per source hash and torch
version under ``$KUBELLM_KERNEL_CACHE`` (default ``~/.cache/kubellm/cpu-kernels``): an edited source rebuilds
(about 30 s on 2 cores; ``make setup`` does it ahead of time), and a cached build is imported directly, with no
compiler needed (the CPU image ships one built at image build time). ``KUBELLM_CPU_KERNELS=0`` turns them off.

``KUBELLM_KERNEL_ARCH`` is the ``-march`` to build for: ``native`` (the default: this CPU's instruction set; the
cache key then carries the CPU's feature flags, so a cache shared with another CPU never runs foreign
instructions) or a portable level such as ``x86-64-v3`` (the CPU image's).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

SOURCES = (Path(__file__).with_name("cpu_ops.cpp"), Path(__file__).with_name("cpu_quant_ops.cpp"))


def cflags() -> list[str]:
    arch = os.environ.get("KUBELLM_KERNEL_ARCH") or "native"
    # -fopenmp: at::parallel_for is an inline OpenMP loop; without the flag it runs on one thread
    return ["-O3", f"-march={arch}", "-ffast-math", "-fno-finite-math-only", "-fopenmp"]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty where unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def enabled() -> bool:
    return os.environ.get("KUBELLM_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def build_directory() -> tuple[str, Path]:
    """(module name, folder) of the build for this source, these flags and this torch."""
    flags = cflags()
    key = b"".join(s.read_bytes() for s in SOURCES) + " ".join(flags).encode()
    if "-march=native" in flags:
        key += " ".join(sorted(cpu_flags())).encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    name = f"kubellm_cpu_ops_{digest}"
    root = Path(os.environ.get("KUBELLM_KERNEL_CACHE") or Path.home() / ".cache" / "kubellm" / "cpu-kernels")
    return name, root / f"torch-{torch.__version__}" / name


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the `ninja` package's binary sits in the virtual environment's bin, which is
    not on PATH when the environment is used without activating it (.venv/bin/python ...)."""
    try:
        import ninja
    except ImportError:
        return
    bin_dir = str(ninja.BIN_DIR)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels, or None (disabled, or the build failed: logged once)."""
    if not enabled():
        return None
    name, folder = build_directory()
    built = folder / f"{name}.so"
    try:
        if built.is_file():  # built before: import it, no toolchain needed
            loader = importlib.machinery.ExtensionFileLoader(name, str(built))
            spec = importlib.util.spec_from_file_location(name, built, loader=loader)
            assert spec is not None
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
            logger.info("CPU kernels: the C++ ones of cpu_ops.cpp serve (%s)", built)
            return module
        from torch.utils.cpp_extension import load as build

        _put_ninja_on_path()
        folder.mkdir(parents=True, exist_ok=True)
        return build(
            name=name,
            sources=[str(s) for s in SOURCES],
            extra_cflags=cflags(),
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
        )
    except Exception as e:  # any failure to build or import means: use the torch ops
        logger.warning("CPU kernels unavailable (%s); using torch ops instead", e)
        return None
