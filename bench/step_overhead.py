"""Where the host time of one decode step goes (issue 13, item 3): model forward vs sampling vs the Python around.

    python -P bench/step_overhead.py                          # this tree: fp32 and the default, batches 1/8/32
    python -P bench/step_overhead.py --rev b3ac529 --rev HEAD # two commits, interleaved in the same run

Workload (fixed seed): B requests with distinct prompts of ``--prompt-len`` random-word tokens, ``ignore_eos``;
once every one of them decodes, ``--steps`` decode steps are timed (each a batch of B one-token sequences). Modes:
greedy; sample (temperature 0.8, top_p 0.9, top_k 50); seeded (sample, each request with its own seed); penalties
(sample + presence 0.5, frequency 0.5, repetition 1.1). The engine's own calls are timed with
``time.perf_counter`` (wrapped on the instance, the code is not changed):

    step = schedule + plan (step input, tensors) + forward (model + logits) + sample + output (append, stops,
           detokenize, deltas) + rest (sampling rows, draft bookkeeping, the loop itself)

Each variant (each ``--rev``, as ``git archive`` gives it; else the working tree) runs in its own process,
alternating, ``--repeats`` times; a number is the median over repeats of the median step. The load average is
recorded before and after: the machine is shared.
Writes bench/results/step_overhead-<machine>.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from machine import cpu_model, machine_name  # noqa: E402

PARTS = ("schedule", "plan", "forward", "sample", "output")
CONFIGS = {"fp32": {"dtype": "float32", "quantization": "none"}, "default": {}}
MODES: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0.0},
    "sample": {"temperature": 0.8, "top_p": 0.9, "top_k": 50},
    "seeded": {"temperature": 0.8, "top_p": 0.9, "top_k": 50},  # + a seed per request
    "penalties": {
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 50,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "repetition_penalty": 1.1,
    },
}


# ---- one variant, in its own process ----------------------------------------------------------------------
class Clock:
    """Seconds spent in each named part during the current step."""

    def __init__(self) -> None:
        self.spent = dict.fromkeys(PARTS, 0.0)

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[part] += time.perf_counter() - t

        return timed


def instrument(engine: Any, clock: Clock) -> None:
    runner = engine.runner
    execute, execute_step = runner.execute, runner.execute_step
    runner.execute_step = clock.wrap("forward", execute_step)
    # plan = execute without the forward inside it
    runner.execute = clock.wrap("plan", execute)
    engine.scheduler.schedule = clock.wrap("schedule", engine.scheduler.schedule)
    engine.output_processor.process = clock.wrap("output", engine.output_processor.process)
    engine.sampler = clock.wrap("sample", engine.sampler)


def time_mode(engine: Any, clock: Clock, batch: int, mode: str, args: argparse.Namespace) -> dict[str, float]:
    from kubellm.runtime.sampling_params import SamplingParams

    rng = random.Random(args.seed + batch)
    # same prompts in every mode: after the first mode, prefill is (mostly) a prefix-cache hit
    prompts = [[rng.randrange(1000, 20000) for _ in range(args.prompt_len)] for _ in range(batch)]
    max_tokens = args.warmup_steps + args.steps + 8
    for i, prompt in enumerate(prompts):
        seed = {"seed": 1000 + i} if mode == "seeded" else {}
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **MODES[mode], **seed)
        engine.add_request(f"{mode}-{batch}-{i}", prompt, params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running):
        engine.step()  # prefill
    for _ in range(args.warmup_steps):
        engine.step()
    steps: list[dict[str, float]] = []
    for _ in range(args.steps):
        assert engine.scheduler.num_running == batch, (engine.scheduler.num_running, batch)
        clock.spent = dict.fromkeys(PARTS, 0.0)
        t = time.perf_counter()
        engine.step()
        total = time.perf_counter() - t
        part = dict(clock.spent)
        part["plan"] -= part["forward"]
        part["rest"] = total - sum(part.values())
        part["step"] = total
        steps.append(part)
    engine.abort_all()
    out = {k: statistics.median(s[k] for s in steps) * 1e3 for k in (*PARTS, "rest", "step")}
    # the fastest step of each part: what interference from other jobs (it only adds time) leaves least touched
    out.update({f"{k}_min": min(s[k] for s in steps) * 1e3 for k in ("forward", "sample", "step")})
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.engine.llm_engine import LLMEngine

    out = []
    for name in args.config:
        engine = LLMEngine(EngineConfig(model=args.model, max_num_seqs=max(args.batch), **CONFIGS[name]))
        clock = Clock()
        instrument(engine, clock)
        for batch in args.batch:
            for mode in args.mode:
                ms = time_mode(engine, clock, batch, mode, args)
                out.append({"config": name, "quantization": engine.quantization, "batch": batch, "mode": mode, **ms})
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "rows": out}))


# ---- the driver -------------------------------------------------------------------------------------------
def rev_tree(rev: str, into: Path) -> Path:
    """A directory holding package ``kubellm`` as commit ``rev`` has it (put first on PYTHONPATH: it shadows the
    editable install of the working tree)."""
    into.mkdir(parents=True)
    archive = into / "tree.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(archive), rev, "kubellm", "runtime"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    pkg = into / "pkg" / "kubellm"
    pkg.mkdir(parents=True)
    for f in (into / "tree" / "kubellm").iterdir():
        (pkg / f.name).symlink_to(f)
    (pkg / "runtime").symlink_to(into / "tree" / "runtime")
    return into / "pkg"


def run_variant(args: argparse.Namespace, pythonpath: Path | None) -> dict[str, Any]:
    env = dict(os.environ, PYTHONSAFEPATH="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    argv = [sys.executable, "-P", __file__, "--worker", "--model", args.model, "--prompt-len", str(args.prompt_len)]
    argv += ["--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--seed", str(args.seed)]
    for flag, values in (("--config", args.config), ("--batch", args.batch), ("--mode", args.mode)):
        for v in values:
            argv += [flag, str(v)]
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (config, batch, mode): the median over repeats of each part's median step time (ms)."""
    rows = []
    for i, first in enumerate(runs[0]["rows"]):
        same = [run["rows"][i] for run in runs]
        row = {k: first[k] for k in ("config", "quantization", "batch", "mode")}
        row.update({k: round(statistics.median(r[k] for r in same), 3) for k in (*PARTS, "rest", "step")})
        row.update({k: round(min(r[k] for r in same), 3) for k in ("forward_min", "sample_min", "step_min")})
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--batch", action="append", type=int, default=None)
    parser.add_argument("--mode", action="append", choices=list(MODES), default=None)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rev", action="append", default=None, help="a git revision to measure (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="step_overhead", help="the results file's prefix")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.config = args.config or ["fp32", "default"]
    args.batch = args.batch or [1, 8, 32]
    args.mode = args.mode or list(MODES)
    if args.worker:
        worker(args)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        variants: dict[str, Path | None] = {"working-tree": None}
        if args.rev:
            variants = {rev: rev_tree(rev, Path(tmp) / str(i)) for i, rev in enumerate(args.rev)}
        load_before = os.getloadavg()
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for repeat in range(args.repeats):
            for name, path in variants.items():
                print(f"repeat {repeat + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
                runs[name].append(run_variant(args, path))
        load_after = os.getloadavg()
    first = next(iter(runs.values()))[0]
    result = {
        "benchmark": "step_overhead",
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "shared": "yes: another job ran on the same cores (see load averages)",
            "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
            "load_avg_1_5_15_after": [round(x, 2) for x in load_after],
        },
        "versions": {"torch": first["torch"], "python": sys.version.split()[0]},
        "threads": first["threads"],
        "workload": {
            "model": args.model,
            "prompt_tokens": args.prompt_len,
            "timed_decode_steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "repeats": args.repeats,
            "modes": MODES,
            "configs": CONFIGS,
            "seed": args.seed,
            "unit": "ms per step: median over repeats of the median step; *_min: the fastest step of all repeats",
        },
        "variants": {name: summarize(r) for name, r in runs.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.name}-{machine_name()}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    print_table(result["variants"])
    return 0


def print_table(variants: dict[str, list[dict[str, Any]]]) -> None:
    cols = (*PARTS, "rest", "step", "sample_min", "step_min")
    print(f"\n{'variant':<20}{'config':<9}{'batch':>6} {'mode':<10}" + "".join(f"{c:>11}" for c in cols) + "   (ms)")
    for name, rows in variants.items():
        for r in rows:
            head = f"{name:<20}{r['config']:<9}{r['batch']:>6} {r['mode']:<10}"
            print(head + "".join(f"{r[c]:>11.2f}" for c in cols))


if __name__ == "__main__":
    sys.exit(main())
