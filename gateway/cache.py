"""The response cache: exact-match answers for deterministic requests, opt-in per LLMDeployment
(`spec.routing.responseCache`), bounded in bytes, each entry with its model's TTL.

Only a request whose answer cannot differ between two runs is cached: `temperature` 0 (greedy; the engine's greedy
tokens do not depend on the batch) or a fixed integer `seed` (the engine seeds that request's sampler with it). The
key is the model, the path and the request body normalized (keys sorted, no whitespace), so the same request written
differently still hits; `user` is dropped (a label, not an input). Only complete 200 answers are stored, and a
stream is replayed as it came: its Server-Sent Events one write each, `data: [DONE]` last.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import ClientResponse, web

if TYPE_CHECKING:
    from kubellm.gateway.discovery import Model
    from kubellm.gateway.metrics import GatewayMetrics
    from kubellm.gateway.proxy import RequestRecord

CACHE_HEADER = "x-kubellm-cache"  # hit | miss, on the answers of a model with the cache on
CACHEABLE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
UNKEYED_FIELDS = frozenset({"user"})


def cache_key(served_name: str, path: str, body: dict[str, Any]) -> str | None:
    """The entry's key, or None when the request is not deterministic (it is then never cached)."""
    temperature, seed = body.get("temperature"), body.get("seed")
    greedy = isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
    seeded = isinstance(seed, int) and not isinstance(seed, bool)
    if not (greedy or seeded):
        return None
    keyed = {k: v for k, v in body.items() if k not in UNKEYED_FIELDS}
    normalized = json.dumps([served_name, path, keyed], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(normalized.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    content_type: str
    body: bytes
    expires: float  # time.monotonic()

    @property
    def size(self) -> int:
        return len(self.body) + len(self.content_type) + 64  # the key and the bookkeeping, roughly

    def writes(self) -> list[bytes]:
        """The body as it is written back: one Server-Sent Event per write for a stream, else in one piece."""
        if not self.content_type.startswith("text/event-stream"):
            return [self.body]
        return [event + b"\n\n" for event in self.body.split(b"\n\n") if event]


class ResponseCache:
    """LRU by bytes: inserting past `max_bytes` drops the least recently used entries; an answer larger than
    `max_entry_bytes` is not stored at all."""

    def __init__(self, max_bytes: int, max_entry_bytes: int) -> None:
        self.max_bytes, self.max_entry_bytes = max_bytes, max_entry_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float | None = None) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= (time.monotonic() if now is None else now):
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: str, content_type: str, body: bytes, ttl_seconds: float, now: float | None = None) -> bool:
        entry = CachedAnswer(content_type, body, (time.monotonic() if now is None else now) + ttl_seconds)
        if entry.size > min(self.max_entry_bytes, self.max_bytes):
            return False
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry
        self.bytes += entry.size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))
        return True

    def _drop(self, key: str) -> None:
        self.bytes -= self._entries.pop(key).size


class Capture:
    """The answer of a miss, collected while it is relayed; stored only if it ends complete with a 200."""

    def __init__(self, key: str, limit: int, ttl_seconds: float) -> None:
        self.key, self.limit, self.ttl_seconds = key, limit, ttl_seconds
        self.parts: list[bytes] = []
        self.size = 0
        self.overflowed = False

    def add(self, chunk: bytes) -> None:
        if self.overflowed:
            return
        self.size += len(chunk)
        if self.size > self.limit:
            self.overflowed, self.parts = True, []
        else:
            self.parts.append(chunk)


class CacheGate:
    """The forwarder's side of the cache: look a request up (setting up the capture of a miss), replay a hit, and
    store a miss's answer once it was relayed complete."""

    def __init__(self, cache: ResponseCache, metrics: GatewayMetrics) -> None:
        self.cache, self.metrics = cache, metrics

    def lookup(self, path: str, model: Model, body: dict[str, Any], record: RequestRecord) -> CachedAnswer | None:
        """The cached answer of a deterministic request to a model with the cache on; on a miss, set up the capture
        of the answer about to be relayed."""
        if model.cache_ttl_seconds is None or path not in CACHEABLE_PATHS:
            return None
        key = cache_key(model.served_name, path, body)
        if key is None:
            return None
        hit = self.cache.get(key)
        record.cache = "hit" if hit is not None else "miss"
        record.headers[CACHE_HEADER] = record.cache
        self.metrics.cache_requests.labels(model.served_name, record.cache).inc()
        if hit is None:
            record.capture = Capture(key, self.cache.max_entry_bytes, model.cache_ttl_seconds)
        return hit

    async def replay(self, request: web.Request, answer: CachedAnswer, record: RequestRecord) -> web.StreamResponse:
        record.decision = "cache"
        out = web.StreamResponse(status=200, headers={"Content-Type": answer.content_type, **record.headers})
        if answer.content_type.startswith("text/event-stream"):
            out.headers["Cache-Control"] = "no-cache"
        await out.prepare(request)
        for part in answer.writes():
            await out.write(part)
            record.bytes_out += len(part)
        await out.write_eof()
        return out

    def store(self, record: RequestRecord, upstream: ClientResponse) -> None:
        capture = record.capture
        if capture is None or capture.overflowed or upstream.status != 200:
            return
        content_type = upstream.headers.get("Content-Type", "application/json")
        self.cache.put(capture.key, content_type, b"".join(capture.parts), capture.ttl_seconds)
        self.metrics.cache_bytes.set(self.cache.bytes)
