"""Shared plumbing of the GPU benchmarks: import path, timing, ceilings, machine description, JSON results.

Each script in bench/gpu/ puts this folder on sys.path (PYTHONSAFEPATH=1 keeps the script's folder off it) and
imports this module. Conventions (DESIGN.md §5, .library/device/METHOD.md): random data, never zeros; warm up,
then the median of many timed runs (triton.testing.do_bench, device events); every number next to its ceiling
measured in the same run (device-to-device copy bandwidth counting bytes read + written; bf16 matmul rate).

``--smoke`` runs a tiny version on the CPU (Triton's interpreter for the kernels) so CI checks that every script
still runs end to end; its timings mean nothing and its JSON says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/machine.py
from machine import cpu_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def ensure_kubellm() -> None:
    """Make `kubellm.runtime` importable from this checkout even where it is not pip-installed (the device machine
    gets a bare copy of the tree): register the package folders the way pyproject.toml maps them."""
    try:
        import kubellm.runtime  # noqa: F401

        return
    except ImportError:
        pass

    def load_package(name: str, folder: Path) -> Any:
        spec = importlib.util.spec_from_file_location(
            name, folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    package = load_package("kubellm", REPO_ROOT / "kubellm")
    package.runtime = load_package("kubellm.runtime", REPO_ROOT / "runtime")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny CPU run (Triton interpreter) for CI; numbers mean nothing"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the JSON result (default: bench/results; with --smoke a temporary folder)",
    )
    return parser


def setup(args: argparse.Namespace) -> Any:
    """Pick the device (CUDA unless --smoke) and make kubellm importable; returns the torch.device."""
    if args.smoke:
        # kernels are defined at import: the interpreter must be chosen before any kernel module loads
        os.environ["TRITON_INTERPRET"] = "1"
    ensure_kubellm()
    import torch

    if args.smoke:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU check, or on a GPU machine")
    return torch.device("cuda")


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: Any, *, warmup_ms: float = 25, rep_ms: float = 200) -> float:
    """Median milliseconds per call. CUDA: triton.testing.do_bench (device events, L2 flushed between runs).
    CPU (smoke only, where the number means nothing): one host-timed call."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def copy_bandwidth_gbs(device: Any, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (random bf16 data).
    Two source buffers alternate so no run re-reads what the previous one left in cache."""
    import torch

    numel = nbytes // 2
    sources = [torch.randn(numel, device=device, dtype=torch.bfloat16) for _ in range(2)]
    dst = torch.empty(numel, device=device, dtype=torch.bfloat16)
    turn = [0]

    def copy() -> None:
        turn[0] ^= 1
        dst.copy_(sources[turn[0]])

    ms = time_ms(copy, device, rep_ms=300)
    return 2 * numel * 2 / (ms * 1e-3) / 1e9


def matmul_tflops(device: Any, n: int = 8192) -> float:
    """Dense bf16 n x n x n matrix product rate in TFLOP/s (random data)."""
    import torch

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn((n, n), device=device, dtype=dtype)
    b = torch.randn((n, n), device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, rep_ms=300)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def machine_info(device: Any) -> dict[str, Any]:
    """GPU name and driver (or the CPU model), and the versions that the numbers depend on."""
    import torch
    import triton

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            driver=_nvidia_smi("driver_version"),
        )
    else:
        info["cpu"] = cpu_model()
        info["cpu_threads"] = torch.get_num_threads()
    return info


def _nvidia_smi(field: str) -> str:
    try:
        result = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_slug(device: Any, smoke: bool) -> str:
    if smoke:
        return "cpu-smoke"
    import torch

    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def write_result(
    name: str, args: argparse.Namespace, device: Any, workload: dict[str, Any], results: dict[str, Any]
) -> Path:
    """bench results as JSON: <out>/<name>-<device>.json, with the machine, the workload and the numbers."""
    payload = {
        "benchmark": name,
        "smoke": bool(args.smoke),
        "note": "CPU smoke run through the Triton interpreter: the numbers mean nothing" if args.smoke else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_info(device),
        "workload": workload,
        "results": results,
    }
    out = args.out
    if out is None:
        # smoke numbers mean nothing: keep them out of bench/results, where results are committed
        out = Path(tempfile.mkdtemp(prefix="kubellm-bench-")) if args.smoke else REPO_ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{device_slug(device, args.smoke)}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned table (printed last by each script: the tail of the output is what comes back)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_source(preset: str, smoke: bool, workdir: Path) -> tuple[str, dict[str, Any]]:
    """The engine's `model` argument for a dummy-weight benchmark and its Hugging Face config dict.

    A real run uses the loader's preset (published shapes); --smoke writes a tiny config.json of the same
    architecture (2 layers, hidden 64, same GQA ratio) so the CPU can run it in seconds."""
    ensure_kubellm()
    from kubellm.runtime.models.loader import PRESETS

    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    config = dict(PRESETS[preset])
    if not smoke:
        return preset, config
    group = config["num_attention_heads"] // config["num_key_value_heads"]
    config.update(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=2,
        num_attention_heads=2 * group, head_dim=16, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config.pop("rope_scaling", None)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    path.write_text(json.dumps(config))
    return str(path), config


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig fields every engine benchmark shares: bf16 on the GPU, float32 on the CPU smoke run."""
    if args.smoke:
        return {"device": "cpu", "dtype": "float32", "kv_cache_memory_bytes": 64 << 20}
    return {"device": "cuda", "dtype": "bfloat16"}


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters (tied weights counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
