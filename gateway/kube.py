"""The gateway's API server access: list + watch (an informer's loop, with reconnect and periodic resync) and the
one write it makes, the wake annotation. Credentials come from the kubernetes client's own config loaders
(in a pod: the service account; elsewhere: $KUBECONFIG); the requests themselves go over aiohttp, so a watch is
one coroutine and is cancelled with it.

    list (resourceVersion R) ─▶ replace ─▶ watch from R ─▶ ADDED / MODIFIED / DELETED ─▶ apply
          ▲                                  │ BOOKMARK: R moves on; timeout: watch again from R
          └─ 410 Gone, an error (backoff), or every resync_seconds ◀──┘
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

JSON = dict[str, Any]
log = logging.getLogger("kubellm.gateway.kube")

WATCH_TIMEOUT_SECONDS = 240
MAX_BACKOFF_SECONDS = 10.0
BUSY_RETRY_SECONDS = 1.0  # after a 429 (the API server's usual retryAfterSeconds)
MISSING_RETRY_SECONDS = 30.0  # a collection whose CRD is not installed (missing_ok) is listed again this often
READ_BUFSIZE = 1 << 24  # one watch event is one line: an LLMDeployment with a chat template is large


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


@dataclass
class KubeConfig:
    host: str
    ssl_context: ssl.SSLContext | bool
    authorization: Callable[[], str | None]

    @classmethod
    def load(cls, kubeconfig: str | None = None) -> KubeConfig:
        """In a pod: its service account; else `kubeconfig`, default $KUBECONFIG (or ~/.kube/config)."""
        from kubernetes import client, config

        cfg = client.Configuration()
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        context: ssl.SSLContext | bool = False
        if cfg.verify_ssl:
            context = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.cert_file:
                context.load_cert_chain(cfg.cert_file, cfg.key_file)

        def authorization() -> str | None:
            # As the client's own auth_settings asks for it; in a pod its refresh hook re-reads the rotated token.
            return cfg.get_api_key_with_prefix("BearerToken", alias="authorization")

        return cls(host=cfg.host.rstrip("/"), ssl_context=context, authorization=authorization)


class Kube:
    def __init__(self, config: KubeConfig) -> None:
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.config.ssl_context)
            self._session = aiohttp.ClientSession(connector=connector, read_bufsize=READ_BUFSIZE)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self.config.authorization()
        if token:
            headers["Authorization"] = token
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def list(self, path: str, params: dict[str, str]) -> tuple[list[JSON], str]:
        timeout = aiohttp.ClientTimeout(total=60)
        async with self.session().get(
            self.config.host + path, params=params, headers=self._headers(), timeout=timeout
        ) as response:
            if response.status != 200:
                raise KubeError(response.status, (await response.text())[:500])
            body = await response.json()
        return list(body.get("items") or []), str(body["metadata"]["resourceVersion"])

    async def watch(self, path: str, params: dict[str, str], resource_version: str) -> AsyncIterator[JSON]:
        query = {
            **params,
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_TIMEOUT_SECONDS),
        }
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=WATCH_TIMEOUT_SECONDS + 30)
        async with self.session().get(
            self.config.host + path, params=query, headers=self._headers(), timeout=timeout
        ) as response:
            if response.status != 200:
                raise KubeError(response.status, (await response.text())[:500])
            while line := await response.content.readline():
                if line.strip():
                    yield json.loads(line)

    async def merge_patch(self, path: str, body: JSON) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        headers = self._headers("application/merge-patch+json")
        async with self.session().patch(self.config.host + path, json=body, headers=headers, timeout=timeout) as r:
            if r.status >= 300:
                raise KubeError(r.status, (await r.text())[:500])


class Informer:
    """Keeps `on_replace(items)` / `on_event(type, obj)` fed from one collection (one namespace, or all)."""

    def __init__(
        self,
        kube: Kube,
        path: str,
        *,
        params: dict[str, str] | None = None,
        on_replace: Callable[[list[JSON]], None],
        on_event: Callable[[str, JSON], None],
        resync_seconds: float = 300.0,
        missing_ok: bool = False,
    ) -> None:
        self.kube, self.path, self.params = kube, path, params or {}
        self.on_replace, self.on_event = on_replace, on_event
        self.resync_seconds = resync_seconds
        # missing_ok: a 404 on the list (the CRD is not installed) counts as an empty, synced collection.
        self.missing_ok = missing_ok
        self.synced = asyncio.Event()  # set after the first list

    async def _missing(self, exc: KubeError) -> None:
        if not self.synced.is_set():
            log.warning(
                "%s is not served (%s): taken as empty, listed again every %.0f s",
                self.path,
                exc,
                MISSING_RETRY_SECONDS,
            )
        self.on_replace([])
        self.synced.set()
        await asyncio.sleep(MISSING_RETRY_SECONDS)

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                try:
                    items, version = await self.kube.list(self.path, self.params)
                except KubeError as exc:
                    if not (self.missing_ok and exc.status == 404):
                        raise
                    await self._missing(exc)
                    continue
                self.on_replace(items)
                self.synced.set()
                failures = 0
                await self._watch_until_resync(version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, KubeError) and exc.status == 429:
                    # The API server asks for a moment (a CRD's storage (re)initializing, priority and fairness):
                    # a retry it expects, not a failure.
                    log.info("%s: the API server is busy (429); listing again in %.1f s", self.path, BUSY_RETRY_SECONDS)
                    await asyncio.sleep(BUSY_RETRY_SECONDS)
                    continue
                failures += 1
                delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** min(failures, 5))
                log.warning("watching %s failed (%s); listing again in %.1f s", self.path, exc, delay)
                await asyncio.sleep(delay)

    async def _watch_until_resync(self, version: str) -> None:
        """Watch from `version`, reconnecting on a normal timeout; return when a full list is due (410 Gone: the
        version is too old; or resync_seconds passed)."""
        deadline = time.monotonic() + self.resync_seconds
        while time.monotonic() < deadline:
            async for event in self.kube.watch(self.path, self.params, version):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return
                    raise KubeError(int(obj.get("code") or 500), str(obj.get("message")))
                version = str(obj.get("metadata", {}).get("resourceVersion") or version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_event(kind, obj)
                if time.monotonic() >= deadline:
                    return
