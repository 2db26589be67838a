"""The gateway's own cost per request, without a cluster: the real gateway app (kubellm.gateway.app, its registry fed
the objects a watch would deliver) in front of a stand-in runtime that answers /tokenize like the real one (the
token ids of the prompt as JSON, the same size, and /metrics as a runtime renders it), each in its own process, over
loopback. --replicas N: the gateway is told of N replicas (N addresses of the one stand-in), routes among them and
scrapes each every second, as with N runtimes; --runtime: a real `kubellm serve` instead of the stand-in.

    python -P bench/gateway_overhead.py [--prompt-bytes 200000] [--requests 200] [--replicas 4] [--runtime] [--profile]

The client sends each request twice, once straight to the stand-in and once through the gateway, in a random order
per pair, one pair at a time: both halves of a pair meet the same machine load, so the pair's difference is the
gateway's addition at that moment (its p50 / p99 over pairs is what `added_*` reports); the gateway process's CPU
time per request is the part the machine's load does not move. --profile runs the gateway under cProfile (CPU time)
and prints its top functions (inflated by the profiler; read them relative to each other). This is a tool for
finding the gateway's costs; bench/gateway.py measures against real runtimes in a cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from machine import process_cpu_seconds

SERVED = "bench"
TOKEN_CHARS = 4  # the stand-in's "tokenizer": one id per 4 characters (SmolLM2: 3.4 on the bench's prompt)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the two servers ---------------------------------------------------------------------------------------------


def serve_stand_in(port: int) -> None:
    from aiohttp import web

    async def tokenize(request: web.Request) -> web.Response:
        body = await request.json()  # the runtime parses the body too (pydantic, from JSON)
        prompt = str(body["prompt"])
        ids = [hash(prompt[i : i + TOKEN_CHARS]) % 49152 for i in range(0, len(prompt), TOKEN_CHARS)]
        return web.json_response({"count": len(ids), "max_model_len": 2048, "tokens": ids, "token_strs": None})

    from kubellm.runtime.outputs import EngineStats
    from kubellm.runtime.server.metrics import ServerMetrics

    # /metrics as a runtime renders it (its histograms, counters and the gauges the gateway scrapes every second)
    metrics = ServerMetrics(SERVED, lambda: EngineStats(0, 0, 0.0, 1000, 16))
    for i in range(200):
        metrics.ttft.observe(i / 100)
        metrics.http_request("/tokenize", 200)

    async def prometheus(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), content_type="text/plain")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/metrics", prometheus)
    # every 127.0.0.0/8 address reaches it: the replicas the gateway is told of are this one server
    web.run_app(app, host="0.0.0.0", port=port, access_log=None, print=None)


def serve_gateway(port: int, upstream_port: int, replicas: int, profile: bool) -> None:
    import logging

    from aiohttp import web

    from kubellm.gateway.app import Gateway, build_app
    from kubellm.gateway.settings import GatewaySettings

    # the access log as the real process writes it: one JSON line per request on stdout (here: /dev/null)
    logging.basicConfig(level="INFO", format="%(message)s", stream=open(os.devnull, "w"))  # noqa: SIM115
    gateway = Gateway(GatewaySettings(), kube=None)
    model = {"model": {"servedModelName": SERVED}, "replicas": replicas}
    gateway.registry.model_event("ADDED", {"metadata": {"name": "m", "namespace": "a"}, "spec": model})
    for i in range(replicas):  # each on an address of its own, all of them the one stand-in: scraped as N replicas
        pod = {
            "metadata": {"name": f"m-{i}", "namespace": "a", "labels": {"app.kubernetes.io/instance": "m"}},
            "spec": {"containers": [{"name": "runtime", "ports": [{"name": "http", "containerPort": upstream_port}]}]},
            "status": {"podIP": f"127.0.0.{i + 1}", "conditions": [{"type": "Ready", "status": "True"}]},
        }
        gateway.registry.pod_event("ADDED", pod)
    # CPU time, not wall time: a wait for a core (the machine is shared) is not the gateway's cost
    profiler = cProfile.Profile(time.process_time) if profile else None

    async def start(_: web.Application) -> None:
        if profiler is not None:
            profiler.enable()

    async def stop(_: web.Application) -> None:
        if profiler is not None:
            profiler.disable()
            stats = pstats.Stats(profiler, stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(25)
            stats.sort_stats("cumulative").print_stats(40)
            sys.stdout.flush()

    app = build_app(gateway)
    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    web.run_app(app, host="127.0.0.1", port=port, handler_cancellation=True, access_log=None, print=None)


# -- the client ----------------------------------------------------------------------------------------------------


async def _wait_up(url: str, timeout: float = 30.0) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as r:
                    await r.read()
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")
            await asyncio.sleep(0.05)  # a port not listening yet (a model loading): nothing to wait on


async def paired(direct: str, gateway: str, body: bytes, count: int, seed: int) -> dict[str, list[float]]:
    """Each pair: the same request straight and through the gateway, in an order drawn per pair."""
    import aiohttp

    rng = random.Random(seed)
    out: dict[str, list[float]] = {"direct": [], "gateway": [], "added": []}
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:

        async def one(base: str) -> float:
            start = time.perf_counter()
            async with session.post(base + "/tokenize", data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, (base, r.status, await r.text())
            return time.perf_counter() - start

        for _ in range(3):  # warm both connection pools
            await one(direct)
            await one(gateway)
        for _ in range(count):
            if rng.random() < 0.5:
                d = await one(direct)
                g = await one(gateway)
            else:
                g = await one(gateway)
                d = await one(direct)
            out["direct"].append(d)
            out["gateway"].append(g)
            out["added"].append(g - d)
    return out


def _spawn(*args: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    return subprocess.Popen([sys.executable, "-P", __file__, *args], env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-bytes", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--replicas", type=int, default=4, help="replicas the gateway routes to and scrapes")
    parser.add_argument("--runtime", action="store_true", help="a real `kubellm serve` upstream, not the stand-in")
    parser.add_argument("--profile", action="store_true", help="run the gateway under cProfile, print its top")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--serve", choices=("stand-in", "gateway"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "stand-in":
        serve_stand_in(args.port)
        return 0
    if args.serve == "gateway":
        serve_gateway(args.port, args.upstream_port, args.replicas, args.profile)
        return 0
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"seed {seed}, load average {os.getloadavg()[0]:.2f}", flush=True)
    up_port, gw_port = _free_port(), _free_port()
    if args.runtime:  # a real `kubellm serve` (SmolLM2 on the CPU): its own tokenizer, answers and chunking
        command = [str(Path(sys.executable).with_name("kubellm")), "serve", "--model", "builtin:smollm2-135m-instruct"]
        command += ["--served-model-name", SERVED, "--device", "cpu", "--kv-cache-memory", str(64 * 1024 * 1024)]
        command += ["--max-model-len", "2048", "--host", "0.0.0.0", "--port", str(up_port)]
        env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
        stand_in = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        stand_in = _spawn("--serve", "stand-in", "--port", str(up_port))
    gw_args = ["--serve", "gateway", "--port", str(gw_port), "--upstream-port", str(up_port)]
    gw_args += ["--replicas", str(args.replicas)]
    gateway = _spawn(*gw_args, *(["--profile"] if args.profile else []))
    try:
        direct, via = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
        asyncio.run(_wait_up(direct + ("/ready" if args.runtime else "/metrics"), timeout=600))
        asyncio.run(_wait_up(via + "/healthz"))
        prompt = ("cluster node pod " * (args.prompt_bytes // 17 + 1))[: args.prompt_bytes]
        body = json.dumps({"model": SERVED, "prompt": prompt}).encode()
        cpu_before = process_cpu_seconds(gateway.pid)
        times = asyncio.run(paired(direct, via, body, args.requests, seed))
        cpu_used = process_cpu_seconds(gateway.pid) - cpu_before
    finally:
        for proc in (gateway, stand_in):
            proc.send_signal(signal.SIGINT)  # aiohttp's run_app cleans up (and the profile prints) on SIGINT
            proc.wait(timeout=30)
    ms = lambda x: round(1000 * x, 3)  # noqa: E731
    result: dict[str, Any] = {"prompt_bytes": args.prompt_bytes, "pairs": args.requests, "seed": seed}
    result["replicas"] = args.replicas
    for name, values in times.items():
        result[f"{name}_p50_ms"] = ms(statistics.median(values))
        result[f"{name}_p99_ms"] = ms(quantile(values, 0.99))
    # the gateway process's CPU time (user + system) per request through it: what the machine's load does not move
    result["gateway_cpu_ms_per_request"] = ms(cpu_used / (args.requests + 3))
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
