"""Offline throughput of the engine (no HTTP): 64 requests submitted at once to ``LLM.generate``.

    python -P bench/offline.py                        # SmolLM2-135M (bundled GGUF), dtypes float32 and bfloat16
    python -P bench/offline.py --dtype bfloat16 --num-requests 32

Workload (fixed seed): prompts of 32-256 random-word tokens (uniform), outputs of 32-128 tokens (uniform),
greedy with ``ignore_eos`` so every request generates exactly its output length; prompts are distinct (no
prefix-cache hits). Reports requests/s, output tokens/s, total (prompt + output) tokens/s and wall time, and
compares against the physical limit of a decode step: the bytes of weights read per step / measured copy
bandwidth. Writes bench/results/offline-<machine>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kubellm.runtime.llm import LLM
from kubellm.runtime.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from machine import cpu_model, machine_name

RESULTS = Path(__file__).resolve().parent / "results"


def copy_bandwidth_gbs() -> float:
    """Measured memory copy bandwidth (GB/s, read + write counted) on a 256 MiB buffer."""
    src = torch.empty(64 << 20, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def workload(num_requests: int, seed: int, tokenizer: Any) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    vocab = [t for t in range(1000, 20000)]
    prompts, params = [], []
    for _ in range(num_requests):
        prompts.append([rng.choice(vocab) for _ in range(rng.randint(32, 256))])
        params.append(SamplingParams(temperature=0.0, max_tokens=rng.randint(32, 128), ignore_eos=True))
    return prompts, params


def run_one(dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    llm = LLM(
        args.model, dtype=dtype, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
    )
    prompts, params = workload(args.num_requests, args.seed, llm.tokenizer)
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4))  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    num_prompt = sum(len(p) for p in prompts)
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    weight_bytes = sum(p.numel() * p.element_size() for p in llm.engine.model.parameters())
    return {
        "dtype": dtype,
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(prompts) / wall, 3),
        "output_tokens_per_s": round(num_output / wall, 1),
        "total_tokens_per_s": round((num_prompt + num_output) / wall, 1),
        "num_prompt_tokens": num_prompt,
        "num_output_tokens": num_output,
        "weight_bytes": weight_bytes,
        "num_preemptions": llm.engine.stats().num_preemptions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dtypes = args.dtype or ["float32", "bfloat16"]

    bandwidth = copy_bandwidth_gbs()
    rows = [run_one(dtype, args) for dtype in dtypes]
    for row in rows:
        # a decode step reads every weight once: the best possible steps/s is bandwidth / weight bytes
        row["decode_steps_per_s_limit"] = round(bandwidth * 1e9 / row["weight_bytes"], 1)
    result = {
        "benchmark": "offline",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        "threads": torch.get_num_threads(),
        "copy_bandwidth_gbs": round(bandwidth, 1),
        "workload": {
            "model": args.model,
            "num_requests": args.num_requests,
            "prompt_tokens": "uniform 32-256 (random vocabulary ids, distinct prompts)",
            "output_tokens": "uniform 32-128, greedy, ignore_eos",
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "seed": args.seed,
        },
        "results": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"offline-{machine_name()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    print(f"\n{'dtype':<10}{'wall s':>9}{'req/s':>9}{'out tok/s':>11}{'total tok/s':>13}{'step/s limit':>14}")
    for r in rows:
        print(
            f"{r['dtype']:<10}{r['wall_s']:>9}{r['requests_per_s']:>9}{r['output_tokens_per_s']:>11}"
            f"{r['total_tokens_per_s']:>13}{r['decode_steps_per_s_limit']:>14}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
