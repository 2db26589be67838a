"""Forward one request to a replica of its model, or hold it while the model has none ready.

    pick (ring / least load) ─▶ connect + send ──▶ relay the response as it arrives (SSE unbuffered)
       ▲                          │ refused, or 503 (loading, draining): eject the replica for eject_seconds,
       │                          ▼ pick again (only before the first byte went to the client)
       └── hold: no ready replica ─▶ count it (bounded: 429), wake a model at zero, wait for a change
                                     (streams: `: waiting for <model>` every keepalive_seconds), 503 past the timeout

A tier of an LLMRoute with a later tier to fall over to (`fall_through`) is never held: with no ready replica (it is
woken if at zero, for the requests after this one) or a 429 before the first byte, forward returns None and the
caller tries the next tier. Nothing is retried once a byte went to the client.

A client that goes away cancels the handler (aiohttp's handler_cancellation): a held request leaves its queue, a
forwarded one closes its upstream connection at once, which is how the runtime learns to abort it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import aiohttp
from aiohttp import web

from kubellm.gateway.access import TAIL_BYTES
from kubellm.gateway.balance import Load, Pick, Ring, Strategy, pick_least, pick_prefix
from kubellm.gateway.cache import CacheGate, Capture, ResponseCache
from kubellm.gateway.discovery import Endpoint, Model, Registry
from kubellm.gateway.errors import GatewayError
from kubellm.gateway.hold import Holds, Waker
from kubellm.gateway.metrics import GatewayMetrics
from kubellm.gateway.scrape import LoadScraper
from kubellm.gateway.settings import GatewaySettings

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp sets itself: never copied across.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
REPLICA_HEADER = "x-kubellm-replica"


@dataclass
class RequestRecord:
    """What one request's log line says."""

    id: str
    route: str
    started: float  # time.monotonic()
    arrived: float = field(default_factory=time.time)  # the same moment on the wall clock, for the log line
    model: str | None = None
    stream: bool = False
    replica: str | None = None
    decision: str | None = None
    retries: int = 0
    held_seconds: float = 0.0
    added_seconds: float | None = None
    status: int | None = None
    bytes_out: int = 0
    attempt_started: float | None = None  # time.monotonic() when the last try on a replica began
    llm_route: str | None = None  # the LLMRoute's model, when the request named one
    tier: str | None = None  # the route's tier tried last (the one that answered, if one did)
    headers: dict[str, str] = field(default_factory=dict)  # added to the response (the route tier's)
    cache: str | None = None  # hit | miss, for a model with the response cache on and a deterministic request
    capture: Capture | None = None  # a miss's answer, collected as it is relayed
    caller: str | None = None  # the API key's id (or anonymous)
    metered: bool = False  # its caller is charged the answer's tokens (a token rate limit is on): keep these two
    tail: bytearray = field(default_factory=bytearray)  # the answer's last bytes, where its usage is
    content_events: int = 0  # data events of a relayed stream
    extra: dict[str, Any] = field(default_factory=dict)


class _Refused(Exception):
    """The replica answered 429 before any byte went to the client, and the request has a next tier."""


async def _on_headers_sent(_: aiohttp.ClientSession, ctx: SimpleNamespace, __: Any) -> None:
    record = ctx.trace_request_ctx
    if isinstance(record, RequestRecord):
        record.added_seconds = time.monotonic() - record.started - record.held_seconds


class Forwarder:
    def __init__(
        self,
        settings: GatewaySettings,
        registry: Registry,
        scraper: LoadScraper,
        metrics: GatewayMetrics,
        holds: Holds,
        waker: Waker,
    ) -> None:
        self.settings, self.registry, self.scraper, self.metrics = settings, registry, scraper, metrics
        self.holds, self.waker = holds, waker
        self.in_flight: dict[str, int] = defaultdict(int)  # by endpoint url
        self.ejected: dict[str, float] = {}  # endpoint url -> monotonic time it may be tried again
        self._rings: dict[tuple[str, ...], Ring] = {}
        self._turn = 0
        self._session: aiohttp.ClientSession | None = None
        self.cache = CacheGate(ResponseCache(settings.cache_max_bytes, settings.cache_max_entry_bytes), metrics)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            trace = aiohttp.TraceConfig()
            trace.on_request_headers_sent.append(_on_headers_sent)
            self._session = aiohttp.ClientSession(
                # Bytes pass through as the runtime wrote them (compressed or not); no total timeout: a stream
                # lasts as long as it lasts.
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_seconds),
                connector=aiohttp.TCPConnector(limit=0),
                trace_configs=[trace],
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- picking ------------------------------------------------------------------------------------------------

    def _loads(self, endpoints: list[Endpoint]) -> dict[str, Load]:
        loads = {}
        for ep in endpoints:
            runtime = self.scraper.get(ep.url)
            loads[ep.id] = Load(
                in_flight=self.in_flight.get(ep.url, 0),
                waiting=runtime.waiting if runtime else 0.0,
                kv_usage=runtime.kv_usage if runtime else 0.0,
            )
        return loads

    def pick(self, model: Model, endpoints: list[Endpoint], key: bytes | None) -> tuple[Endpoint, Pick]:
        by_id = {ep.id: ep for ep in endpoints}
        loads = self._loads(endpoints)
        if model.strategy is Strategy.PREFIX_HASH and key is not None:
            ids = tuple(sorted(by_id))
            ring = self._rings.get(ids)
            if ring is None:
                if len(self._rings) > 256:
                    self._rings.clear()
                ring = self._rings[ids] = Ring(ids)
            choice = pick_prefix(ring, key, loads, self.settings.load_factor)
        else:
            self._turn += 1
            choice = pick_least(list(by_id), loads, self._turn)
        self.metrics.decisions.labels(model.served_name, model.strategy.value, choice.decision.value).inc()
        return by_id[choice.replica], choice

    @contextlib.contextmanager
    def busy(self, ep: Endpoint) -> Iterator[None]:
        """Count one request in flight on `ep` for the block (the loads the picks read)."""
        self.in_flight[ep.url] += 1
        try:
            yield
        finally:
            self.in_flight[ep.url] -= 1
            if not self.in_flight[ep.url]:
                del self.in_flight[ep.url]

    def ready(self, model: Model) -> list[Endpoint]:
        now = time.monotonic()
        return [ep for ep in self.registry.endpoints(model) if self.ejected.get(ep.url, 0.0) <= now]

    def _eject(self, ep: Endpoint, model: Model, reason: str, record: RequestRecord) -> None:
        self.ejected[ep.url] = time.monotonic() + self.settings.eject_seconds
        self.metrics.retries.labels(model.served_name, reason).inc()
        record.retries += 1

    # -- forwarding ---------------------------------------------------------------------------------------------

    async def forward(
        self,
        request: web.Request,
        model: Model,
        upstream: tuple[bytes, dict[str, Any]],
        key: bytes | None,
        record: RequestRecord,
        *,
        fall_through: bool = False,
    ) -> web.StreamResponse | None:
        """The response relayed from a replica of `model` (or its error after a hold, or its cached answer); None
        only with `fall_through`, when the model has no ready replica or refused the request with a 429.
        upstream: the body to send, as bytes and as the document they encode (the cache keys on the document)."""
        body, document = upstream
        cached = self.cache.lookup(request.path, model, document, record)
        if cached is not None:
            return await self.cache.replay(request, cached, record)
        try:
            return await self._forward(request, model, body, key, record, fall_through)
        except _Refused:
            return None

    async def _forward(
        self,
        request: web.Request,
        model: Model,
        body: bytes,
        key: bytes | None,
        record: RequestRecord,
        fall_through: bool,
    ) -> web.StreamResponse | None:
        deadline = record.started + self.settings.hold_timeout_seconds
        # A request may be held more than once: a replica that turns Ready and then refuses it (kwok marks pods
        # Ready before their runtime listens) is ejected, and with none left the request waits again. Its held time
        # is the sum (the added latency excludes all of it), observed once; the keepalives keep their own pace.
        held_since: float | None = None
        was_held = False
        next_keepalive = deadline
        stream_out: web.StreamResponse | None = None  # a held stream's 200, sent with its first keepalive
        try:
            with contextlib.ExitStack() as stack:
                while True:
                    changed = self.registry.changed()
                    current = self.registry.lookup(model.served_name)
                    if current is None:
                        if fall_through:  # a route's tier deleted under it: the next tier serves
                            return None
                        raise GatewayError(404, f"model {model.served_name!r} was deleted", param="model")
                    model = current
                    endpoints = self.ready(model)
                    if endpoints:
                        if held_since is not None:
                            record.held_seconds += time.monotonic() - held_since
                            stack.close()
                            held_since = None
                        ep, choice = self.pick(model, endpoints, key)
                        record.replica, record.decision = ep.id, choice.decision.value
                        response = await self._attempt(request, ep, model, body, record, stream_out, fall_through)
                        if response is not None:
                            return response
                        continue
                    if fall_through:
                        await self.waker.wake(model)
                        return None
                    if held_since is None:
                        stack.enter_context(self.holds.hold(model))  # 429 when the model's queue is full
                        held_since = time.monotonic()
                        if not was_held:
                            next_keepalive = held_since + self.settings.keepalive_seconds
                        was_held = True
                    await self.waker.wake(model)
                    now = time.monotonic()
                    if now >= deadline:
                        self.metrics.rejected.labels(model.served_name, "timeout").inc()
                        error = GatewayError(
                            503,
                            f"model {model.served_name!r} has no ready replica after waiting "
                            f"{now - record.started:.0f} s (the gateway holds requests up to "
                            f"{self.settings.hold_timeout_seconds:.0f} s while it starts)",
                            code="model_unavailable",
                            headers={"Retry-After": str(self.settings.retry_after_seconds)},
                        )
                        if stream_out is None:
                            raise error
                        await stream_out.write(error.sse_event())
                        return stream_out
                    wakeups = [deadline, next_keepalive if record.stream else deadline]
                    wakeups += [t for t in self.ejected.values() if t > now]
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), max(0.0, min(wakeups) - now))
                    if record.stream and time.monotonic() >= next_keepalive:
                        stream_out = stream_out or await self._start_stream(request, record)
                        await stream_out.write(f": waiting for {model.served_name}\n\n".encode())
                        next_keepalive = time.monotonic() + self.settings.keepalive_seconds
        finally:
            if held_since is not None:  # it timed out, or its client went away, while held
                record.held_seconds += time.monotonic() - held_since
            if was_held:
                self.metrics.hold_seconds.labels(model.served_name).observe(record.held_seconds)

    async def _start_stream(self, request: web.Request, record: RequestRecord) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **record.headers}
        out = web.StreamResponse(status=200, headers=headers)
        await out.prepare(request)
        return out

    async def _attempt(
        self,
        request: web.Request,
        ep: Endpoint,
        model: Model,
        body: bytes,
        record: RequestRecord,
        stream_out: web.StreamResponse | None,
        fall_through: bool = False,
    ) -> web.StreamResponse | None:
        """One try on one replica: the relayed response, or None when it failed before anything was answered;
        _Refused on a 429 when there is a next tier."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if request.remote:
            headers["X-Forwarded-For"] = request.remote
        url = ep.url + request.path_qs
        record.attempt_started = time.monotonic()
        with self.busy(ep):
            try:
                upstream = await self.session().request(
                    request.method, url, data=body, headers=headers, trace_request_ctx=record
                )
            except aiohttp.ClientConnectorError:
                self._eject(ep, model, "connect", record)
                return None
            except aiohttp.ClientError as exc:
                raise GatewayError(502, f"replica {ep.id} of {model.served_name!r} failed: {exc}") from exc
            if upstream.status == 503:  # loading or draining: it did no work; another replica may
                await upstream.read()
                upstream.release()
                self._eject(ep, model, "unavailable", record)
                return None
            if upstream.status == 429 and fall_through:  # full, or over a rate limit: the next tier may not be
                await upstream.read()
                upstream.release()
                self.metrics.retries.labels(model.served_name, "refused").inc()
                record.retries += 1
                raise _Refused
            return await self._relay(request, upstream, ep, record, stream_out)

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        ep: Endpoint,
        record: RequestRecord,
        stream_out: web.StreamResponse | None,
    ) -> web.StreamResponse:
        finished = False
        try:
            if stream_out is not None and upstream.status != 200:
                # The 200 of a held stream went out with its keepalives: the error becomes an SSE event.
                data = await upstream.read()
                await stream_out.write(b"data: " + data.replace(b"\n", b"") + b"\n\n")
                finished = True
                return stream_out
            out = stream_out
            if out is None:
                out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in HOP_BY_HOP:
                        out.headers.add(name, value)
                if upstream.content_length is not None:
                    out.content_length = upstream.content_length
                out.headers[REPLICA_HEADER] = ep.id
                out.headers.update(record.headers)
                await out.prepare(request)
            # what is done per chunk beyond writing it is paid on every byte of a 200 KB answer: only what is used
            events = upstream.content_type == "text/event-stream"
            async for chunk in upstream.content.iter_any():
                await out.write(chunk)
                record.bytes_out += len(chunk)
                if record.capture is not None:
                    record.capture.add(chunk)
                if record.metered:
                    if events:
                        record.content_events += chunk.count(b"data: {")
                    record.tail += chunk[-TAIL_BYTES:]
                    del record.tail[:-TAIL_BYTES]
            await out.write_eof()
            finished = True
            self.cache.store(record, upstream)
            return out
        finally:
            if finished:
                upstream.release()
            else:  # the client left (or wrote no more): drop the upstream connection, the runtime aborts
                upstream.close()
