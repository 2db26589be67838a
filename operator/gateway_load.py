"""The requests the gateways hold, per LLMDeployment: waiting load that no runtime can report yet.

A gateway holds a request for a model with no Ready replica (at zero, or while its replicas start) and exports the
count as ``kubellm_gateway_held_requests{namespace, llmdeployment}``. At zero the gateway's wake annotation carries
the count; while replicas exist but none is Ready, the autoscaler reads it from here, once per tick for the whole
fleet: a URL's host may name a headless Service, whose every address is one gateway pod (each holds its own share).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from kubellm.contract import METRIC_GATEWAY_HELD

log = logging.getLogger(__name__)

Held = dict[tuple[str, str], float]  # (namespace, LLMDeployment name) -> requests held, all gateways together


def parse_held(text: str) -> Held:
    held: Held = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != METRIC_GATEWAY_HELD or math.isnan(sample.value):
                continue
            key = (sample.labels.get("namespace", ""), sample.labels.get("llmdeployment", ""))
            held[key] = held.get(key, 0.0) + sample.value
    return held


async def _addresses(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class GatewayLoad:
    """Scrapes every gateway pod behind ``urls``; a gateway that cannot be read counts as holding nothing (never a
    reason to scale), and is logged when it starts failing."""

    def __init__(self, urls: Sequence[str], *, timeout_seconds: float) -> None:
        self.urls = tuple(urls)
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._failing: set[str] = set()

    async def _pod_urls(self, url: str) -> list[str]:
        """One URL per address the host resolves to (a headless Service: one per gateway pod)."""
        parts = urlsplit(url)
        try:
            addresses = await _addresses(parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
        except OSError as exc:
            self._note_failure(url, f"resolving {parts.hostname} failed: {exc}")
            return []
        port = f":{parts.port}" if parts.port else ""
        hosts = [f"[{a}]" if ":" in a else a for a in addresses]
        return [urlunsplit((parts.scheme, f"{h}{port}", parts.path, parts.query, "")) for h in hosts]

    async def held(self) -> Held:
        pods = sorted({u for urls in await asyncio.gather(*map(self._pod_urls, self.urls)) for u in urls})
        total: Held = {}
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            results = await asyncio.gather(*(self._one(session, u) for u in pods))
        for one in results:
            for key, value in one.items():
                total[key] = total.get(key, 0.0) + value
        return total

    async def _one(self, session: aiohttp.ClientSession, url: str) -> Held:
        try:
            async with session.get(url) as response:
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}")
                held = parse_held(await response.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._note_failure(url, f"{type(exc).__name__}: {exc}")
            return {}
        self._failing.discard(url)
        return held

    def _note_failure(self, url: str, why: str) -> None:
        if url not in self._failing:
            log.warning("reading the gateway's held requests from %s failed: %s", url, why)
        self._failing.add(url)
