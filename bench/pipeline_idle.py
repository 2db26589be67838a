"""Pipeline parallelism on the CPU: how long each stage idles within a step, measured against the schedule's bound.

    python -P bench/pipeline_idle.py          # SmolLM2-135M's shape (30 layers, dummy float32 weights), PP 2

The schedule (runtime/distributed/pipeline.py): GPipe's forward pass within each engine step, the step's sequences
split into M = min(num_seqs, 2 x stages) micro-batches. With S equal stages each idles (S - 1) / (M + S - 1) of a
step at best (fill and drain); the rest of its idle time is imbalance and the cost of passing activations. Each rank
records its busy time (its layers and the head) and its wall time per step (``StageClock``); idle = 1 - busy / wall.
Workload (fixed seed): ``--num-requests`` prompts of 64 random tokens, 16 greedy output tokens each, submitted at
once (so decode steps carry every sequence). Writes bench/results/pipeline_idle-<machine>.json, prints a table last.
The machine's cores are shared with other work: the numbers are one run's, not a speed claim.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from kubellm.runtime.llm import LLM
from kubellm.runtime.models.loader import PRESETS
from kubellm.runtime.sampling_params import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from machine import cpu_model, machine_name

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m", help="a loader preset (dummy weights)")
    parser.add_argument("--pipeline-parallel-size", type=int, default=2)
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    stages = args.pipeline_parallel_size
    config = dict(PRESETS[args.preset])
    rng = random.Random(0)
    prompts = [[rng.randrange(3, config["vocab_size"]) for _ in range(64)] for _ in range(args.num_requests)]
    with tempfile.TemporaryDirectory() as workdir:
        timing = Path(workdir) / "timing.jsonl"
        os.environ["KUBELLM_PIPELINE_TIMING"] = str(timing)  # the spawned workers inherit it
        llm = LLM(
            args.preset, load_format="dummy", device="cpu", dtype="float32", kv_cache_memory_bytes=256 << 20,
            max_model_len=256, pipeline_parallel_size=stages, quantization="none",
        )  # fmt: skip
        started = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True))
        wall_s = time.perf_counter() - started
        llm.engine.runner.shutdown()
        clocks = sorted((json.loads(line) for line in timing.read_text().splitlines()), key=lambda c: c["rank"])
    micro = clocks[0]["microbatches"] / clocks[0]["steps"]
    bound = (stages - 1) / (micro + stages - 1)
    rows = []
    for c in clocks:
        c["idle_fraction"] = 1 - c["busy_s"] / c["wall_s"]
        rows.append(c)
    result = {
        "benchmark": "pipeline_idle",
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "note": "cores shared with other work during the run"},
        "workload": {"preset": args.preset, "weights": "dummy", "dtype": "float32", "pipeline_parallel_size": stages,
                     "num_requests": args.num_requests, "prompt_len": 64, "output_len": args.output_len},
        "schedule": "GPipe forward within each step, micro-batches = min(num_seqs, 2 x stages)",
        "results": {"stages": rows, "mean_microbatches_per_step": micro,
                    "schedule_idle_bound": bound, "wall_s": wall_s},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pipeline_idle-{machine_name()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    print(f"{'stage':>5} {'steps':>5} {'busy s':>8} {'wall s':>8} {'idle':>6}   (schedule bound {bound:.1%})")
    print("-" * 44)
    for c in rows:
        print(f"{c['stage']:>5} {c['steps']:>5} {c['busy_s']:>8.2f} {c['wall_s']:>8.2f} {c['idle_fraction']:>6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
