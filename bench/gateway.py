"""The gateway's routing, measured: prefix-cache hit rate and TTFT of a multi-turn chat workload over 4 replicas
for PrefixHash and LeastLoad (through the gateway) against plain round-robin (client-side rotation over the pods,
what a Service does) and a single replica; and the latency the gateway adds, on /tokenize (cheap on the runtime).

    PYTHONPATH=tests python -P bench/gateway.py [--sessions 8] [--turns 4] [--replicas 4] [--zero]

Last, the time from a first request at zero replicas to its first token, split into wake, operator scale,
schedule, runtime start, its imports, model load, gateway forward and first token (bench/gateway_zero.py); --zero
runs only that and writes bench/results/gateway-zero-<machine>.json.

Setup as tests/gateway: the test control plane, `kubellm operator`, one real `kubellm serve` (SmolLM2-135M, CPU) per
pod on its loopback IP, `kubellm gateway`. Each mode gets a system prompt and documents of its own, so no mode
reuses another's cached blocks; a session opens with a document of its own that its later turns repeat (a shared
system prompt is short), so where a session's turns land decides the hit rate. Hit rate: the runtimes'
vllm:prefix_cache_hits / vllm:prefix_cache_queries over the mode (all pods).
Writes bench/results/gateway-<machine>.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
from cluster import ClusterConfig, ControlPlane, ensure_binaries  # noqa: E402
from e2e.gateway_process import GatewayProcess  # noqa: E402
from e2e.kubelet import RuntimeKubelet  # noqa: E402
from e2e.observer import GROUP, PLURAL, VERSION  # noqa: E402
from e2e.operator_process import OperatorProcess  # noqa: E402
from e2e.procs import MARK_ENV, marked_processes, wait_for  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/machine.py
from gateway_zero import STEPS, measure_zero  # noqa: E402
from machine import cpu_model, machine_name, process_cpu_seconds  # noqa: E402

NAME, SERVED, NAMESPACE = "chat", "chat", "bench-gateway"
WORDS = [
    "cluster",
    "node",
    "pod",
    "replica",
    "token",
    "cache",
    "prefix",
    "model",
    "layer",
    "head",
    "batch",
    "queue",
    "stream",
    "answer",
    "river",
    "stone",
]


def counters(urls: list[str]) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    hits = queries = 0.0
    for url in urls:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            for family in text_string_to_metric_families(r.read().decode()):
                for s in family.samples:
                    if s.name == "vllm:prefix_cache_hits_total":
                        hits += s.value
                    elif s.name == "vllm:prefix_cache_queries_total":
                        queries += s.value
    return hits, queries


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_chats(base_urls: list[str], args: argparse.Namespace, seed: int) -> list[float]:
    """S sessions of T turns (each turn the whole history so far), `concurrency` sessions at once; base_urls is
    rotated per request (one URL: the gateway or a single pod). Returns TTFTs in seconds."""
    import openai

    rng = random.Random(seed)
    system = " ".join(rng.choice(WORDS) for _ in range(args.system_words))
    # each session's own document, which every later turn of it repeats: the prefix a replica can reuse
    documents = [" ".join(rng.choice(WORDS) for _ in range(args.context_words)) for _ in range(args.sessions)]
    clients = [openai.AsyncOpenAI(base_url=u, api_key="unused", max_retries=0, timeout=600) for u in base_urls]
    turn_counter = 0
    ttfts: list[float] = []
    gate = asyncio.Semaphore(args.concurrency)

    async def session(i: int) -> None:
        nonlocal turn_counter
        messages: list[dict[str, str]] = [{"role": "system", "content": system}]
        async with gate:
            for t in range(args.turns):
                opening = f"Session {i}. Read this document: {documents[i]}\n" if t == 0 else ""
                question = f"Turn {t}: " + " ".join(rng.sample(WORDS, 6))
                messages.append({"role": "user", "content": opening + question})
                client = clients[turn_counter % len(clients)]
                turn_counter += 1
                start, first, text = time.monotonic(), None, ""
                stream = await client.chat.completions.create(
                    model=SERVED, messages=messages, max_tokens=args.max_tokens, temperature=0, stream=True
                )
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.monotonic()
                        text += chunk.choices[0].delta.content
                ttfts.append((first or time.monotonic()) - start)
                messages.append({"role": "assistant", "content": text})

    await asyncio.gather(*(session(i) for i in range(args.sessions)))
    for c in clients:
        await c.close()
    return ttfts


async def paired_tokenize(gateway: str, pod: str, prompt: str, rate: float, count: int, seed: int) -> dict[str, Any]:
    """`count` pairs, started open-loop at `rate` pairs/s (so the gateway carries `rate` requests/s): each pair the
    same request straight to the pod and through the gateway, one after the other in an order drawn per pair, so
    both halves meet the same machine load and the same runtime state. Latencies in seconds, by target."""
    import aiohttp

    rng = random.Random(seed)
    body = json.dumps({"model": SERVED, "prompt": prompt}).encode()
    out: dict[str, list[float]] = {"direct": [], "gateway": [], "added": []}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(base: str) -> float:
            start = time.monotonic()
            async with session.post(base + "/tokenize", data=body, headers={"Content-Type": "application/json"}) as r:
                await r.read()
                assert r.status == 200, r.status
            return time.monotonic() - start

        async def pair(gateway_first: bool) -> None:
            if gateway_first:
                via = await one(gateway)
                direct = await one(pod)
            else:
                direct = await one(pod)
                via = await one(gateway)
            out["direct"].append(direct)
            out["gateway"].append(via)
            out["added"].append(via - direct)

        tasks, t0 = [], time.monotonic()
        for i in range(count):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(pair(rng.random() < 0.5)))
        await asyncio.gather(*tasks)
    return out


def added_latency(gateway: GatewayProcess, pod: str, prompt: str, rate: float, count: int) -> dict[str, Any]:
    """The gateway's addition, paired (paired_tokenize): `added_*` are quantiles of the per-pair differences, the
    gateway's own addition at each moment (the earlier method, p99 via the gateway minus p99 direct over two runs
    minutes apart, mixed the load of two different moments into it); and the gateway process's CPU time per request,
    which the machine's other load does not move."""
    seed = random.randrange(2**31)
    assert gateway.proc is not None
    cpu_before = process_cpu_seconds(gateway.proc.pid)
    times = asyncio.run(paired_tokenize(gateway.url, pod, prompt, rate, count, seed))
    cpu = process_cpu_seconds(gateway.proc.pid) - cpu_before
    ms = lambda x: round(1000 * x, 3)  # noqa: E731
    direct, via, added = times["direct"], times["gateway"], times["added"]
    return {
        "rate_per_s": rate,
        "requests": count,
        "prompt_bytes": len(prompt),
        "seed": seed,
        "method": "paired: each request sent straight and through the gateway back to back, order drawn per pair",
        "direct_p50_ms": ms(statistics.median(direct)),
        "direct_p99_ms": ms(quantile(direct, 0.99)),
        "gateway_p50_ms": ms(statistics.median(via)),
        "gateway_p99_ms": ms(quantile(via, 0.99)),
        "added_p50_ms": ms(statistics.median(added)),
        "added_p99_ms": ms(quantile(added, 0.99)),
        # the gateway's scrapes and watches run meanwhile too: this is an upper bound of a request's own CPU
        "gateway_cpu_ms_per_request": ms(cpu / count),
    }


def owner_url(gateway: GatewayProcess, pods: list[Any], prompt: str) -> str:
    """The URL of the pod the gateway sends `prompt` to (its x-kubellm-replica header names the pod)."""
    body = json.dumps({"model": SERVED, "prompt": prompt}).encode()
    request = urllib.request.Request(gateway.url + "/tokenize", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        replica = r.headers["x-kubellm-replica"]
    (pod,) = [p for p in pods if p.name == replica]
    return str(pod.url(""))


def set_strategy(custom: Any, gateway: GatewayProcess, strategy: str) -> None:
    patch = {"spec": {"routing": {"strategy": strategy}}}
    custom.patch_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, NAME, patch)

    def seen() -> bool:
        with urllib.request.urlopen(gateway.url + "/v1/models", timeout=5) as r:
            return bool(json.load(r)["data"][0]["kubellm"]["routing"] == strategy)

    wait_for(seen, timeout=30, what=f"the gateway to route by {strategy}")


def spec(replicas: int) -> dict[str, Any]:
    return {
        "model": {"source": "builtin:smollm2-135m-instruct", "maxModelLen": 2048, "servedModelName": SERVED},
        "replicas": replicas,
        "resources": {"gpus": 0},
        "engine": {
            "maxNumSeqs": 4,
            "maxNumBatchedTokens": 512,
            "extraArgs": ["--device", "cpu", "--kv-cache-memory", str(64 * 1024 * 1024)],
        },
    }


def measure(args: argparse.Namespace, cp: ControlPlane, tmp: Path, tag: str) -> dict[str, Any]:
    from kubernetes import client

    api = cp.api_client()
    custom: Any = client.CustomObjectsApi(api)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMDeployment", "metadata": {"name": NAME}}
    custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, {**body, "spec": spec(args.replicas)})
    logs = tmp / "runtimes"
    logs.mkdir()
    env = {**cp.env(), MARK_ENV: tag}
    gateway = GatewayProcess(NAMESPACE, env, tmp / "gateway.log").start()
    out: dict[str, Any] = {"modes": {}}
    try:
        with RuntimeKubelet(api, NAMESPACE, NAME, logs, cp.env(), tag=tag, max_pods=args.replicas) as kubelet:
            pods = wait_for(lambda: len(s := kubelet.serving()) == args.replicas and s, timeout=900, what="replicas")
            urls = [p.url("") for p in pods]
            wait_for(
                lambda: (
                    json.load(urllib.request.urlopen(gateway.url + "/v1/models", timeout=5))["data"][0]["kubellm"][
                        "ready_replicas"
                    ]
                    == args.replicas
                ),
                timeout=60,
                what="the gateway to see every replica",
            )
            modes = [
                ("single_replica", [urls[0] + "/v1"], None),
                ("round_robin", [u + "/v1" for u in urls], None),
                ("PrefixHash", [gateway.url + "/v1"], "PrefixHash"),
                ("LeastLoad", [gateway.url + "/v1"], "LeastLoad"),
            ]
            for seed, (mode, bases, strategy) in enumerate(modes if not args.skip_chats else []):
                if strategy:
                    set_strategy(custom, gateway, strategy)
                before = counters(urls)
                started = time.monotonic()
                ttfts = asyncio.run(run_chats(bases, args, seed=1000 + seed))
                after = counters(urls)
                hits, queries = after[0] - before[0], after[1] - before[1]
                out["modes"][mode] = {
                    "requests": len(ttfts),
                    "wall_s": round(time.monotonic() - started, 1),
                    "prefix_cache_hit_rate": round(hits / queries, 4) if queries else None,
                    "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
                    "ttft_p99_ms": round(1000 * quantile(ttfts, 0.99), 1),
                }
                print(mode, out["modes"][mode], flush=True)
            # PrefixHash: one prompt, one owner; its pairs' direct halves go to that same pod (a request the load
            # bound spills goes to another, alike)
            set_strategy(custom, gateway, "PrefixHash")
            small = "Count the replicas of this cluster, please."
            pod = owner_url(gateway, pods, small)
            out["added_latency_small"] = added_latency(gateway, pod, small, args.rate, args.latency_requests)
            print("added latency (small prompt)", out["added_latency_small"], flush=True)
            big = ("cluster node pod " * 20_000)[:200_000]
            pod = owner_url(gateway, pods, big)
            out["added_latency_200kb"] = added_latency(gateway, pod, big, args.big_rate, args.big_requests)
            print("added latency (200 KB prompt)", out["added_latency_200kb"], flush=True)
    finally:
        gateway.stop()
        api.close()
    return out


ADDED_LATENCY = (
    "POST /tokenize through the gateway (PrefixHash) vs straight to the pod it routes the prompt to, open loop, "
    "paired per request (added_*: quantiles of the per-pair differences)"
)


def workload(args: argparse.Namespace) -> dict[str, Any]:
    zero = {
        "model": "builtin:smollm2-135m-instruct, CPU, maxNumSeqs 4, 64 MiB KV cache per replica, OMP_NUM_THREADS 1",
        "zero_to_first_token": "one streaming chat request to an LLMDeployment at 0 replicas (minReplicas 0), the "
        "same engine settings, max_tokens 16; timeline_s: seconds after the client sent it, each moment from the part "
        "that saw it (bench/gateway_zero.py); steps: the differences of its STEPS",
    }
    if args.zero:
        return zero
    if args.skip_chats:
        return {**zero, "replicas": args.replicas, "added_latency": ADDED_LATENCY}
    return {
        **zero,
        "replicas": args.replicas,
        "chat": f"{args.sessions} sessions x {args.turns} turns, {args.concurrency} sessions at once, a shared "
        f"{args.system_words}-word system prompt per mode, each session opening with a {args.context_words}-word "
        f"document of its own (repeated by its later turns), max_tokens {args.max_tokens}, streaming",
        "round_robin": "client-side rotation over the pods (what a Service does)",
        "added_latency": ADDED_LATENCY,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=4, help="sessions in flight at once")
    parser.add_argument("--system-words", type=int, default=30, help="the system prompt all sessions share")
    parser.add_argument("--context-words", type=int, default=250, help="each session's own opening document")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s for the added-latency run")
    parser.add_argument("--latency-requests", type=int, default=1000)
    parser.add_argument("--big-rate", type=float, default=5.0)
    parser.add_argument("--big-requests", type=int, default=50)
    parser.add_argument("--pod-cidr", default="127.26.0.0/16")
    parser.add_argument(
        "--skip-chats",
        action="store_true",
        help="no multi-turn chat modes (hit rates, TTFT): the added latency and the zero split only, to their own file",
    )
    parser.add_argument(
        "--zero",
        action="store_true",
        help="only the zero -> first token split (bench/gateway_zero.py), to its own file",
    )
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    binaries = ensure_binaries()
    tag = f"bench-gateway-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="kubellm-bench-gateway-") as tmp_dir:
        tmp = Path(tmp_dir)
        cp = ControlPlane(binaries, ClusterConfig(pod_cidr=args.pod_cidr), tmp / "cluster").start()
        op: OperatorProcess | None = None
        try:
            cp.kubectl("create", "namespace", NAMESPACE)
            cp.kubectl("wait", "--for=create", "serviceaccount/default", "-n", NAMESPACE, "--timeout=30s", timeout=40)
            op = OperatorProcess(NAMESPACE, {**cp.env(), MARK_ENV: tag}, tmp / "operator.log").start()
            numbers = {} if args.zero else measure(args, cp, tmp, tag)
            zero_env = {**cp.env(), MARK_ENV: tag}
            numbers["zero_to_first_token"] = measure_zero(cp, NAMESPACE, spec(0), tmp, zero_env, tag)
            print("zero -> first token", json.dumps(numbers["zero_to_first_token"], indent=1), flush=True)
        finally:
            if op is not None:
                op.stop()
            cp.stop()
    load_at_end = os.getloadavg()[0]
    if marked_processes(tag):
        print(f"processes left behind: {marked_processes(tag)}", file=sys.stderr)
        return 1
    result = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1m_at_start": round(load_at_start, 2),
            "load_avg_1m_at_end": round(load_at_end, 2),
        },
        "workload": workload(args),
        **numbers,
    }
    name = "gateway-zero" if args.zero else "gateway-latency" if args.skip_chats else "gateway"
    out_path = REPO_ROOT / "bench" / "results" / f"{name}-{machine_name()}.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\ngateway bench -> {out_path}")
    print(f"  {'mode':<16} {'hit rate':>9} {'TTFT p50':>10} {'TTFT p99':>10}")
    for mode, m in numbers.get("modes", {}).items():
        print(f"  {mode:<16} {m['prefix_cache_hit_rate']!s:>9} {m['ttft_p50_ms']:>8.1f}ms {m['ttft_p99_ms']:>8.1f}ms")
    zero = numbers["zero_to_first_token"]
    print(f"  zero -> first token: {zero['total_to_first_token_s']} s")
    for step, start, end in STEPS:
        print(f"    {step:<16} {zero['steps'].get(f'{step}_s')!s:>8} s   ({start} -> {end})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
