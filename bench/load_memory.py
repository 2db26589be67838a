"""How much memory does a GGUF model take once loaded, and at the peak of its load? Against issue #14's bound:
resident memory after load <= 1.15 x the quantized file's size + the KV cache.

    python -P bench/load_memory.py [--kv-cache-mib 64] [--quantization auto] [--smoke]

For the bundled SmolLM2 (Q4_1) and Q4_K_M / Q5_K_M copies of it written here (runtime/models/gguf_quantize.py's
round-to-nearest K-quant writer, llama.cpp's _M rule for which layers get Q6_K), each in a fresh process: the
engine (quantization ``auto``, CPU, float32 activations) is built and its KV cache allocated; reported are the
resident set before the load (the interpreter with torch and the runtime imported: not the model's), after it
(VmRSS; RssAnon: without the file's mapped pages) and its high-water mark (VmHWM: the load's own peak), each less
the baseline, against the file size and the KV cache's bytes. What is in "after" beside the weights: the
tokenizer and the GGUF metadata as Python objects (~80 MiB for SmolLM2's 49k vocabulary and merges).
``--smoke``: the bundled file only, a 4 MiB cache, no results file (a check that it runs).
Writes bench/results/load_memory-<machine>.json. Run it on a quiet machine: other processes do not change a
process's RSS, but a loaded machine's page cache can drop the file's mapped pages mid-load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, machine_name

RESULTS = Path(__file__).resolve().parent / "results"
BOUND = 1.15  # issue #14: RSS after load <= 1.15 x file size + KV cache

MEASURE = """
import json, re, sys
import torch
from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.llm_engine import LLMEngine

def status(key):
    return int(re.search(rf"{key}:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

path, quantization, kv_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3])
baseline, baseline_anon = status("VmRSS"), status("RssAnon")
with open("/proc/self/clear_refs", "w") as f:  # the high-water mark from here: the load's own peak
    f.write("5")
config = EngineConfig(model=path, device="cpu", dtype="float32", quantization=quantization,
                      kv_cache_memory_bytes=kv_bytes)
engine = LLMEngine(config)
runner = engine.runner
kv = sum(t.numel() * t.element_size() for t in runner.kv_caches)
methods = {}
for name, module in engine.model.named_modules():
    method = getattr(module, "method", None)
    if method is not None:
        kind = method.describe() or type(method).__name__
        methods[kind] = methods.get(kind, 0) + 1
print(json.dumps({"baseline_rss": baseline, "rss_after_load": status("VmRSS"), "peak_rss": status("VmHWM"),
                  "baseline_rss_anon": baseline_anon, "rss_anon_after_load": status("RssAnon"),
                  "kv_cache_bytes": kv, "quantization": runner.quantization, "linears": methods}))
"""


def measure(path: Path, quantization: str, kv_bytes: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), quantization, str(kv_bytes)],
        env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{path.name}: the measuring process failed:\n{result.stderr[-3000:]}")
    row: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    file_bytes = path.stat().st_size
    model_rss = row["rss_after_load"] - row["baseline_rss"]
    limit = BOUND * file_bytes + row["kv_cache_bytes"]
    row.update(
        file=path.name,
        file_bytes=file_bytes,
        model_rss_after_load=model_rss,
        model_peak_rss=row["peak_rss"] - row["baseline_rss"],
        model_rss_anon_after_load=row["rss_anon_after_load"] - row["baseline_rss_anon"],
        bound_bytes=int(limit),
        within_bound=model_rss <= limit,
        rss_over_file=round((model_rss - row["kv_cache_bytes"]) / file_bytes, 3),
    )
    return row


def files(folder: Path, smoke: bool) -> list[Path]:
    from kubellm.runtime.models.gguf_quantize import write_q4_k_m_copy
    from kubellm.runtime.models.loader import builtin_model_path

    bundled = builtin_model_path("smollm2-135m-instruct")
    if smoke:
        return [bundled]
    q4_k_m, q5_k_m = folder / "smollm2.Q4_K_M.gguf", folder / "smollm2.Q5_K_M.gguf"
    write_q4_k_m_copy(bundled, q4_k_m, base=("Q4_K",))
    write_q4_k_m_copy(bundled, q5_k_m, base=("Q5_K",))
    return [bundled, q4_k_m, q5_k_m]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-cache-mib", type=int, default=64)
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--smoke", action="store_true", help="the bundled file, a 4 MiB cache, no results file")
    args = parser.parse_args()
    kv_bytes = (4 if args.smoke else args.kv_cache_mib) << 20
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(path, args.quantization, kv_bytes) for path in files(Path(tmp), args.smoke)]
    mib = 1 << 20
    print(f"{'file':<34}{'quant':>7}{'file MiB':>10}{'KV MiB':>8}{'base MiB':>10}{'after MiB':>11}{'anon MiB':>10}"
          f"{'peak MiB':>10}{'bound MiB':>11}{'ok':>4}")  # fmt: skip
    for r in rows:
        print(
            f"{r['file']:<34}{r['quantization']:>7}{r['file_bytes'] / mib:>10.1f}{r['kv_cache_bytes'] / mib:>8.1f}"
            f"{r['baseline_rss'] / mib:>10.1f}{r['model_rss_after_load'] / mib:>11.1f}"
            f"{r['model_rss_anon_after_load'] / mib:>10.1f}"
            f"{r['model_peak_rss'] / mib:>10.1f}{r['bound_bytes'] / mib:>11.1f}"
            f"{'yes' if r['within_bound'] else 'NO':>4}"
        )
    if args.smoke:
        return 0
    import torch

    result = {
        "benchmark": "load_memory",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "workload": {
            "quantization": args.quantization,
            "kv_cache_bytes": kv_bytes,
            "dtype": "float32",
            "note": "model_* = the process's RSS less its baseline (the interpreter with torch and the runtime "
            "imported, before the load); bound = 1.15 x file + KV cache (issue #14)",
        },
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"load_memory-{machine_name()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
