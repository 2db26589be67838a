"""Speculative decoding (ngram prompt lookup, suffix): output tokens/s with and without it, at 1, 4 and 16 streams,
on (a) an extractive workload (quote / rewrite a given passage, rename a variable in code) and (b) the free-form
workload of bench/serve.py, with the acceptance rate.

    python -P bench/speculative.py                       # SmolLM2-135M (bundled GGUF), the serving defaults
    python -P bench/speculative.py --levels 1 4 --max-tokens 64

In-process (no HTTP): one LLMEngine, closed loop — ``streams`` requests in flight, a new one added as one finishes,
``--requests-per-stream`` per stream. Greedy: an extractive answer ends at its EOS (the task is done there; past it
the model starts a new chat turn, free text), a free-form one runs to ``--max-tokens`` (``ignore_eos``), and every
method's token count is recorded beside no speculation's (equal in float32; the default int4 path's head kernel
depends on the rows a step computes, so a verification may flip a near-tie). Per level: off, then each method with a
fresh speculator, back to back on one engine with its prefix cache reset before each run (a replayed prompt set
would hit the previous run's cache), so a ratio compares measurements seconds apart. Method ``draft_model`` runs on
an engine of its own (its KV cache), its draft the bundled SmolLM2 cut to ``--draft-layers``. Writes
bench/results/speculative-<machine>.json (with ``os.getloadavg()`` before and after) and prints a table last.
Speed is measured here, never in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.spec_decode.config import SpeculativeConfig
from kubellm.runtime.spec_decode.speculator import Speculator

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from machine import cpu_model, machine_name
from serve import prompts as free_form_prompts
from serve import smollm2_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from spec_drafts import SMOLLM2_DRAFT_LAYERS, write_smollm2_draft

DEFAULT_CONFIGS = ['{"method": "ngram"}', '{"method": "suffix"}', '{"method": "draft_model"}']

RESULTS = Path(__file__).resolve().parent / "results"
PASSAGES = [
    "The history of computing is a story of people, ideas and machines. Early mechanical calculators gave way to "
    "electronic computers, which filled rooms and consumed enormous power. Transistors and integrated circuits "
    "made them smaller and faster, and networks connected them across the world.",
    "The river runs through the valley, past the old mill and the stone bridge, until it reaches the sea. "
    "Fishermen gather at dawn on its banks, mending nets and telling stories of storms long past, while the "
    "children of the village race paper boats along the shallow edge of the water.",
    "Kubernetes schedules containers onto nodes. A Deployment keeps a number of identical pods running, a Service "
    "gives them one stable address, and a controller watches the cluster and moves its actual state towards the "
    "desired state written in the objects that users apply.",
]
CODE = """def total(items):
    x = 0
    for item in items:
        if item.price > 0:
            x = x + item.price * item.quantity
    return x


def average(items):
    x = total(items)
    return x / len(items) if items else 0.0
"""
TASKS = [
    "Repeat the following passage exactly, word for word:\n\n{p}",
    "Quote this text back to me without changing anything:\n\n{p}",
]


def extractive_prompts(engine: LLMEngine, n: int, seed: int) -> list[list[int]]:
    tokenizer = engine.tokenizer
    assert tokenizer is not None
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 4 == 3:
            content = f"Rename the variable x to running_sum in this Python code and show the whole code:\n\n{CODE}"
        else:
            content = rng.choice(TASKS).format(p=PASSAGES[i % len(PASSAGES)])
        text = f"<|im_start|>user\n(request {i}) {content}<|im_end|>\n<|im_start|>assistant\n"
        out.append(tokenizer.encode(text, add_special_tokens=False))
    return out


def run_level(
    engine: LLMEngine, speculator: Speculator | None, prompts: list[list[int]], streams: int, params: SamplingParams
) -> dict[str, Any]:
    """One closed-loop run from a cold prefix cache, with ``speculator`` (None: no speculation)."""
    engine.speculator = speculator
    before = speculator.snapshot() if speculator is not None else None
    assert engine.block_manager.reset_prefix_cache()  # else the second run of a prompt set would hit the first's
    todo = list(enumerate(prompts))
    generated = 0
    in_flight = 0
    start = time.perf_counter()
    while todo or engine.has_unfinished_requests():
        while todo and in_flight < streams:
            i, prompt = todo.pop(0)
            engine.add_request(f"r{time.monotonic_ns()}-{i}", prompt, params)
            in_flight += 1
        for out in engine.step():
            generated += sum(len(c.token_ids) for c in out.outputs)
            in_flight -= out.finished
    wall = time.perf_counter() - start
    engine.block_manager.check_all_free()
    row: dict[str, Any] = {"output_tokens": generated, "wall_s": wall, "output_tokens_per_s": generated / wall}
    if speculator is not None and before is not None:
        after = speculator.snapshot()
        drafted = after.num_draft_tokens - before.num_draft_tokens
        accepted = after.num_accepted_tokens - before.num_accepted_tokens
        row |= {
            "num_drafts": after.num_drafts - before.num_drafts,
            "num_draft_tokens": drafted,
            "num_accepted_tokens": accepted,
            "acceptance_rate": accepted / drafted if drafted else None,
        }
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument(
        "--speculative-config",
        action="append",
        default=None,
        help="JSON, as the serve flag; repeatable (default: ngram, suffix, draft_model). A draft_model "
        "without a model gets SmolLM2 cut to --draft-layers (tests/spec_drafts.py)",
    )
    ap.add_argument(
        "--draft-layers",
        default=None,
        help="comma-separated decoder layers of the bundled SmolLM2 for the draft (default: all but 10..15)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    load_before = os.getloadavg()
    raw = [json.loads(c) for c in args.speculative_config or DEFAULT_CONFIGS]
    draft_layers = SMOLLM2_DRAFT_LAYERS if args.draft_layers is None else [int(x) for x in args.draft_layers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kubellm-bench-draft-"))
    for c in raw:
        if c.get("method") == "draft_model" and "model" not in c:
            c["model"] = str(write_smollm2_draft(smollm2_gguf(), tmp / "draft", draft_layers))
    configs = [SpeculativeConfig.from_dict(c) for c in raw]
    max_num_seqs = max(args.levels)
    # ngram and suffix share one engine, built with the widest of them (its logits rows per sequence), each run with
    # a speculator of its own; a draft model comes with an engine of its own (its KV cache, its shadow sequences)
    lookups = [c for c in configs if c.method != "draft_model"] or [SpeculativeConfig()]
    widest = max(lookups, key=lambda c: c.num_speculative_tokens)
    engine = LLMEngine(EngineConfig(speculative_config=dataclasses.asdict(widest), max_num_seqs=max_num_seqs))
    draft_engines = {
        i: LLMEngine(EngineConfig(speculative_config=dataclasses.asdict(c), max_num_seqs=max_num_seqs))
        for i, c in enumerate(configs)
        if c.method == "draft_model"
    }

    def speculator_for(i: int) -> tuple[LLMEngine, Speculator]:
        if i in draft_engines:
            spec = draft_engines[i].speculator
            assert spec is not None
            return draft_engines[i], spec
        return engine, Speculator(configs[i], engine.max_seq_len)

    warm = extractive_prompts(engine, 2, args.seed)
    warm_params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    run_level(engine, None, warm, 2, warm_params)  # warm-up (kernels, allocator, every step shape)
    for i in range(len(configs)):
        run_level(*speculator_for(i), warm, 2, warm_params)
    results: list[dict[str, Any]] = []
    for workload in ("extractive", "free-form"):
        # the extractive answer ends where the task does (EOS); free-form text runs to max_tokens (bench/serve.py)
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=workload == "free-form")
        for streams in args.levels:
            n = streams * args.requests_per_stream
            if workload == "extractive":
                prompts = extractive_prompts(engine, n, args.seed + streams)
            else:
                tokenizer = engine.tokenizer
                assert tokenizer is not None
                prompts = [tokenizer.encode(p) for p in free_form_prompts(n, args.seed + streams)]
            off = run_level(engine, None, prompts, streams, params)
            row: dict[str, Any] = {"workload": workload, "streams": streams, "off": off, "methods": {}}
            for i, config in enumerate(configs):
                on = run_level(*speculator_for(i), prompts, streams, params)
                # greedy: speculation changes no token in float32 (the tests check it); the default int4 path's head
                # is computed by the int8 kernel up to 4 rows and packed bf16 above, so a verification's wider
                # step can flip a near-tie and an answer end elsewhere: recorded, and tokens/s is each run's own
                on["same_token_count"] = on["output_tokens"] == off["output_tokens"]
                on["speedup"] = on["output_tokens_per_s"] / off["output_tokens_per_s"]
                row["methods"][config.method] = on
                print(f"{workload:10s} streams={streams:2d} off {off['output_tokens_per_s']:7.1f} tok/s  "
                      f"{config.method} {on['output_tokens_per_s']:7.1f} tok/s  x{on['speedup']:.2f}  "
                      f"acceptance {on.get('acceptance_rate')}", flush=True)  # fmt: skip
            results.append(row)
    load_after = os.getloadavg()
    report = {
        "benchmark": "speculative",
        "machine": {"name": machine_name(), "cpu": cpu_model(), "cores": os.cpu_count(), "gpu": None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "engine": {
            "model": engine.model_name,
            "dtype": str(engine.dtype),
            "quantization": engine.quantization,
            "speculative_configs": [dataclasses.asdict(c) for c in configs],
        },
        "workload": {
            "max_tokens": args.max_tokens,
            "requests_per_stream": args.requests_per_stream,
            "greedy": True,
            "extractive": "quote/rewrite one of 3 passages (~60 tokens) or rename a variable in 11 lines of code; "
            "each answer ends at its EOS (at most max_tokens)",
            "free-form": "bench/serve.py's prompts (BASE_TEXT, an explanation asked for), ignore_eos: max_tokens each",
            "runs": "per level: off, then each method with a fresh speculator; the prefix cache reset before each",
        },
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "results": results,
    }
    out = args.out or RESULTS / f"speculative-{machine_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nloadavg before {load_before}, after {load_after}; wrote {out}")
    print(f"{'workload':10s} {'streams':>7s} {'off tok/s':>10s} " + " ".join(f"{c.method:>18s}" for c in configs))
    for r in results:
        cells = []
        for c in configs:
            m = r["methods"][c.method]
            acc = m.get("acceptance_rate")
            cells.append(f"{m['speedup']:5.2f}x acc {'-' if acc is None else f'{acc:.2f}':>4s}".rjust(18))
        print(f"{r['workload']:10s} {r['streams']:7d} {r['off']['output_tokens_per_s']:10.1f} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
