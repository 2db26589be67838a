"""Soak: mixed traffic against one `kubellm serve` for a long while, watching for leaks (issue #17).

    python -P bench/soak.py                       # 20 minutes, the bundled SmolLM2 on this machine
    python -P bench/soak.py --duration 120        # a short run

Traffic comes in cycles: TRAFFIC_S seconds of mixed load, then IDLE_S seconds of none. The mix, from CLIENTS
concurrent clients: streaming and non-streaming completions and chat, `n = 2`, streams the client cancels after a
few chunks, non-streaming requests the client abandons mid-way (a disconnect), and a burst over the queue limit
every cycle (those past the bound must get 429, never a 5xx). Every SAMPLE_S seconds it records the server's RSS and
open file descriptors, the KV cache usage, running/waiting requests, and the latency of GET /health (event-loop lag:
the probe shares the loop with the streams). At the end of each idle gap the engine must be empty: nothing running or
waiting and the KV cache usage back to 0 (a leaked block shows there).

Targets: RSS growth <= 5% from the end of warm-up (the first cycle) to the end; zero 5xx; every idle point at 0.
Writes bench/results/soak-<machine>.json and prints a summary. The machine may be shared: RSS, descriptors, errors
and idle points do not depend on its load; the /health latency does (the file says how loaded it was).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py, bench/serve.py
from machine import cpu_model, machine_name
from serve import Process, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2"
TRAFFIC_S, IDLE_S, SAMPLE_S = 50.0, 10.0, 10.0
CLIENTS = 6
MAX_NUM_SEQS, MAX_QUEUE_LEN, BURST = 8, 16, 40
TOPICS = ["rivers", "bridges", "compilers", "bees", "tides", "glaciers", "printing", "sailing", "clocks", "maps"]


@dataclass
class Tally:
    statuses: Counter[str] = field(default_factory=Counter)  # "200", "429", "5xx:503", "error:<type>"
    kinds: Counter[str] = field(default_factory=Counter)

    def record(self, kind: str, status: int | str) -> None:
        self.kinds[kind] += 1
        if isinstance(status, int) and status >= 500:
            self.statuses[f"5xx:{status}"] += 1
        else:
            self.statuses[str(status)] += 1

    @property
    def server_errors(self) -> int:
        return sum(n for key, n in self.statuses.items() if key.startswith("5xx"))


def _prompt(rng: random.Random) -> str:
    return f"Write a few sentences about {rng.choice(TOPICS)} and {rng.choice(TOPICS)}."


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any], cancel_after: int | None) -> int:
    """A streaming request read to its end, or dropped after cancel_after chunks. Returns the HTTP status."""
    async with session.post(url, json={**body, "stream": True}) as response:
        if response.status != 200:
            await response.read()
            return response.status
        chunks = 0
        async for line in response.content:
            if line.startswith(b"data: "):
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    response.close()  # the client leaves: the server must abort and free the blocks
                    break
        return 200


async def _once(session: aiohttp.ClientSession, base: str, rng: random.Random, tally: Tally) -> int | str:
    kind = rng.choice(["completion", "completion-stream", "chat", "chat-stream", "n2", "cancel", "disconnect"])
    max_tokens = rng.randint(8, 96)
    completion = {"model": MODEL, "prompt": _prompt(rng), "max_tokens": max_tokens, "temperature": 0.7}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": _prompt(rng)}], "max_tokens": max_tokens}
    try:
        if kind == "completion":
            async with session.post(base + "/v1/completions", json=completion) as r:
                await r.read()
                status: int | str = r.status
        elif kind == "chat":
            async with session.post(base + "/v1/chat/completions", json=chat) as r:
                await r.read()
                status = r.status
        elif kind == "completion-stream":
            status = await _stream(session, base + "/v1/completions", completion, None)
        elif kind == "chat-stream":
            status = await _stream(session, base + "/v1/chat/completions", chat, None)
        elif kind == "n2":
            status = await _stream(session, base + "/v1/chat/completions", {**chat, "n": 2}, None)
        elif kind == "cancel":
            status = await _stream(session, base + "/v1/chat/completions", {**chat, "max_tokens": 200}, 3)
        else:  # a non-streaming request the client gives up on before the answer
            try:
                timeout = aiohttp.ClientTimeout(total=rng.uniform(0.2, 1.0))
                async with session.post(
                    base + "/v1/completions", json={**completion, "max_tokens": 200}, timeout=timeout
                ) as r:
                    await r.read()
                    status = r.status
            except TimeoutError:
                status = "abandoned"
    except aiohttp.ClientError as exc:
        status = f"error:{type(exc).__name__}"
    tally.record(kind, status)
    return status


async def _client(session: aiohttp.ClientSession, base: str, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        if await _once(session, base, rng, tally) == 429:
            await asyncio.sleep(1.0)  # a well-behaved client backs off (Retry-After is at least 1 s)


async def _burst(session: aiohttp.ClientSession, base: str, tally: Tally) -> None:
    """More requests at once than running + queue slots: the rest must be refused with 429, not fail."""
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 16}

    async def one() -> None:
        try:
            async with session.post(base + "/v1/completions", json=body) as r:
                await r.read()
                tally.record("burst", r.status)
        except aiohttp.ClientError as exc:
            tally.record("burst", f"error:{type(exc).__name__}")

    await asyncio.gather(*(one() for _ in range(BURST)))


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def _metrics(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with session.get(base + "/metrics") as r:
        text = await r.text()
    wanted = {"vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"}
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in wanted:
                out[s.name] = float(s.value)
    return out


async def _sample(session: aiohttp.ClientSession, base: str, pid: int, t0: float, phase: str) -> dict[str, Any]:
    start = time.perf_counter()
    async with session.get(base + "/health") as r:
        await r.read()
    probe_ms = (time.perf_counter() - start) * 1e3
    m = await _metrics(session, base)
    return {
        "t_s": round(time.monotonic() - t0, 1),
        "phase": phase,
        "rss_mib": round(_rss_kib(pid) / 1024, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "kv_usage": m.get("vllm:kv_cache_usage_perc"),
        "running": m.get("vllm:num_requests_running"),
        "waiting": m.get("vllm:num_requests_waiting"),
        "health_ms": round(probe_ms, 1),
        "load1": round(os.getloadavg()[0], 2),
    }


async def soak(base: str, pid: int, duration: float, seed: int) -> dict[str, Any]:
    tally = Tally()
    samples: list[dict[str, Any]] = []
    idle_points: list[dict[str, Any]] = []
    t0 = time.monotonic()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        cycle = 0
        while time.monotonic() - t0 < duration:
            traffic_end = time.monotonic() + TRAFFIC_S
            clients = [
                asyncio.create_task(_client(session, base, seed * 1000 + cycle * 100 + i, traffic_end, tally))
                for i in range(CLIENTS)
            ]
            await asyncio.sleep(TRAFFIC_S / 2)
            await _burst(session, base, tally)
            while any(not c.done() for c in clients):
                samples.append(await _sample(session, base, pid, t0, "traffic"))
                await asyncio.wait(clients, timeout=SAMPLE_S)
            await asyncio.gather(*clients)
            await asyncio.sleep(IDLE_S)  # nothing in flight now: the engine must empty itself
            point = await _sample(session, base, pid, t0, "idle")
            point["cycle"] = cycle
            samples.append(point)
            idle_points.append(point)
            print(
                f"cycle {cycle}: rss {point['rss_mib']} MiB, fds {point['fds']}, kv {point['kv_usage']}, "
                f"requests {sum(tally.kinds.values())}, statuses {dict(tally.statuses)}",
                flush=True,
            )
            cycle += 1
    warm = idle_points[0]["rss_mib"]
    final = idle_points[-1]["rss_mib"]
    traffic_probes = sorted(s["health_ms"] for s in samples if s["phase"] == "traffic")
    bad_idle = [p for p in idle_points if p["kv_usage"] != 0 or p["running"] != 0 or p["waiting"] != 0]
    return {
        "summary": {
            "cycles": len(idle_points),
            "requests": sum(tally.kinds.values()),
            "kinds": dict(tally.kinds),
            "statuses": dict(tally.statuses),
            "server_errors_5xx": tally.server_errors,
            "rss_mib_after_warmup": warm,
            "rss_mib_final": final,
            "rss_growth_pct": round((final - warm) / warm * 100, 2),
            "fds_after_warmup": idle_points[0]["fds"],
            "fds_final": idle_points[-1]["fds"],
            "idle_points_not_empty": len(bad_idle),
            "health_ms_under_load": {
                "p50": traffic_probes[len(traffic_probes) // 2] if traffic_probes else None,
                "max": traffic_probes[-1] if traffic_probes else None,
            },
        },
        "idle_points_not_empty": bad_idle,
        "samples": samples,
    }


async def main_async(args: argparse.Namespace) -> int:
    port = free_port()
    server = Process(
        [
            sys.executable,
            "-P",
            "-m",
            "kubellm.runtime.server.cli",
            "--model",
            args.model,
            "--served-model-name",
            MODEL,
            "--port",
            str(port),
            "--max-num-seqs",
            str(MAX_NUM_SEQS),
            "--max-queue-len",
            str(MAX_QUEUE_LEN),
        ],
        port,
        "/ready",
    )
    try:
        await server.wait_ready()
        result = await soak(server.url, server.proc.pid, args.duration, args.seed)
    finally:
        server.stop()
    summary = result["summary"]
    targets = {
        "rss_growth_le_5pct": summary["rss_growth_pct"] <= 5.0,
        "zero_5xx": summary["server_errors_5xx"] == 0,
        "every_idle_point_empty": summary["idle_points_not_empty"] == 0,
    }
    out = {
        "benchmark": "soak",
        "machine": {"name": machine_name(), "cpu": cpu_model(), "cores": os.cpu_count()},
        "workload": {
            "model": args.model,
            "duration_s": args.duration,
            "seed": args.seed,
            "cycle": {"traffic_s": TRAFFIC_S, "idle_s": IDLE_S},
            "sample_s": SAMPLE_S,
            "clients": CLIENTS,
            "max_num_seqs": MAX_NUM_SEQS,
            "max_queue_len": MAX_QUEUE_LEN,
            "burst": BURST,
        },
        "targets_met": targets,
        **result,
    }
    path = REPO_ROOT / "bench" / "results" / f"soak-{machine_name()}{args.suffix}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({"summary": summary, "targets_met": targets}, indent=2))
    print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0 if all(targets.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=1200.0, help="seconds of cycles (default 20 minutes)")
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--seed", type=int, default=None, help="traffic seed (default: drawn and printed)")
    parser.add_argument("--suffix", default="", help="appended to the results file's name")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(2**31)
    print(f"seed={args.seed}", flush=True)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
