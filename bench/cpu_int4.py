"""Is torch's CPU int4 weight-only matmul worth it on this CPU? What `quantization: auto` decides from the vector ISA.

    python -P bench/cpu_int4.py

1. One decoder-sized matmul at batch 1 (SmolLM2's MLP: 576 -> 1536), float32 vs int4 (group 32), median of repeats.
2. The bundled SmolLM2, offline greedy, 64 tokens: tokens/s with `quantization` none vs int4.
Writes bench/results/cpu_int4-<machine>.json. Speed is measured here, never in tests.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model, machine_name

REPO_ROOT = Path(__file__).resolve().parents[1]


def median_us(fn: object, repeats: int = 200) -> float:
    assert callable(fn)
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def matmul() -> dict[str, float]:
    n, k, group = 1536, 576, 32
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(n, k, generator=gen), torch.randn(1, k, generator=gen)
    packed = torch._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    scales_and_zeros = torch.randn(k // group, n, 2, generator=gen)
    f32 = median_us(lambda: x @ w.t())
    int4 = median_us(lambda: torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros))
    return {"float32_us": round(f32, 1), "int4_us": round(int4, 1), "int4_over_float32": round(int4 / f32, 2)}


def greedy_tok_s(quantization: str) -> float:
    from kubellm.runtime.llm import LLM
    from kubellm.runtime.sampling_params import SamplingParams

    llm = LLM(max_model_len=1024, quantization=quantization)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    llm.generate("Hello", params)  # warm-up
    start = time.perf_counter()
    llm.generate("Tell me a story about a dragon.", params)
    return round(64 / (time.perf_counter() - start), 2)


def main() -> int:
    result = {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "name": machine_name(), "gpu": None},
        "versions": {"torch": torch.__version__},
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_before": round(os.getloadavg()[0], 2),
        "matmul_576x1536_batch1": matmul(),
        "smollm2_greedy_tok_s": {q: greedy_tok_s(q) for q in ("none", "int4")},
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    out = REPO_ROOT / "bench" / "results" / f"cpu_int4-{machine_name()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
