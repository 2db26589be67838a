"""GET /v1/chat/completions/ws through the gateway: the runtime's WebSocket chat (runtime/server/websocket.py),
proxied to one replica per socket.

A socket is routed by the `request.model` of its first `create` message (the handshake carries no body): that
message picks the replica (the model's strategy, with no prefix key), the gateway opens the upstream socket, sends
the message on, and from then on relays every message both ways as it comes. Later `create` messages must name the
same model and pass the caller's rate limit, or they are answered in-band with an error, as the runtime answers
its own (`{"type": "error", "id", "status", "error"}`). A model with no ready replica is woken and the message
answered with a 503 in-band; the client may send it again. Either side closing closes the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import WSMsgType, web

from kubellm.gateway.errors import GatewayError
from kubellm.gateway.proxy import HOP_BY_HOP
from kubellm.gateway.route import features

if TYPE_CHECKING:
    from kubellm.gateway.app import Gateway
    from kubellm.gateway.discovery import Endpoint, Model

access_log = logging.getLogger("kubellm.gateway.access")
# the client's handshake headers that belong to its own socket, not to the upstream one
_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "host"})


def _create_request(data: str) -> tuple[str | None, dict[str, Any] | None]:
    """(id, request) of a `create` message; (None, None) for anything else (relayed as it is)."""
    try:
        message = json.loads(data)
    except ValueError:
        return None, None
    if not isinstance(message, dict) or message.get("type") != "create" or not isinstance(message.get("request"), dict):
        return None, None
    gen_id = message.get("id")
    return (gen_id if isinstance(gen_id, str) else None), message["request"]


async def _send_error(ws: web.WebSocketResponse, gen_id: str | None, exc: GatewayError) -> None:
    await ws.send_str(json.dumps({"type": "error", "id": gen_id, "status": exc.status, **exc.body()}))


class SocketProxy:
    def __init__(self, gateway: Gateway, request: web.Request, caller: str) -> None:
        self.gateway, self.request, self.caller = gateway, request, caller
        self.model: Model | None = None
        self.relay: asyncio.Task[None] | None = None  # upstream -> client
        self.replica: str | None = None  # the pod the socket goes to

    def _check(self, request_body: dict[str, Any]) -> Model:
        """The model a `create` names (the socket's own, once it has one), within the caller's rate limit."""
        name = request_body.get("model")
        if not isinstance(name, str) or not name:
            raise GatewayError(400, "request.model is required: the served model name to route to", param="model")
        if self.model is not None and name != self.model.served_name:
            raise GatewayError(
                400,
                f"this socket serves {self.model.served_name!r}; open another one for {name!r}",
                param="model",
            )
        model = self.gateway.registry.lookup(name)
        if model is None:
            raise self.gateway.unknown(name)
        self.gateway.access.limit(self.caller, lambda: features("chat", request_body))
        return model

    async def run(self, client: web.WebSocketResponse) -> None:
        upstream: aiohttp.ClientWebSocketResponse | None = None
        try:
            async for msg in client:
                if msg.type != WSMsgType.TEXT:
                    continue  # the runtime answers binary frames with an error; nothing to route by
                gen_id, body = _create_request(msg.data)
                if body is not None:
                    try:
                        model = self._check(body)
                        if upstream is None:
                            upstream = await self._connect(model, client)
                            self.model = model
                    except GatewayError as exc:
                        await _send_error(client, gen_id, exc)
                        continue
                if upstream is None:
                    await _send_error(client, gen_id, GatewayError(400, "the first message must be a create"))
                    continue
                await upstream.send_str(msg.data)
                if body is not None:
                    self._log(gen_id)
        finally:
            if upstream is not None:
                await upstream.close()

    def _log(self, gen_id: str | None) -> None:
        """One JSON line per generation sent upstream, beside the HTTP requests' (the runtime logs how it ended)."""
        assert self.model is not None
        line = {
            "id": gen_id,
            "route": self.request.path,
            "model": self.model.served_name,
            "websocket": True,
            "replica": self.replica,
            "caller": self.caller,
        }
        access_log.info(json.dumps(line))

    async def _connect(self, model: Model, client: web.WebSocketResponse) -> aiohttp.ClientWebSocketResponse:
        forwarder = self.gateway.forwarder
        endpoints = forwarder.ready(model)
        if not endpoints:
            await self.gateway.waker.wake(model)
            raise GatewayError(
                503, f"model {model.served_name!r} has no ready replica yet; send again", headers={"Retry-After": "5"}
            )
        ep, _ = forwarder.pick(model, endpoints, None)
        headers = {
            k: v for k, v in self.request.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() not in _HANDSHAKE
        }
        try:
            upstream = await forwarder.session().ws_connect(
                ep.url.replace("http", "ws", 1) + self.request.path_qs, headers=headers, heartbeat=30.0
            )
        except aiohttp.ClientError as exc:
            raise GatewayError(502, f"replica {ep.id} of {model.served_name!r} failed: {exc}") from exc
        self.replica = ep.id
        self.relay = asyncio.create_task(self._relay_back(upstream, client, ep))
        return upstream

    async def _relay_back(
        self, upstream: aiohttp.ClientWebSocketResponse, client: web.WebSocketResponse, ep: Endpoint
    ) -> None:
        """Upstream to client, with the replica counted busy; the upstream closing closes the client."""
        with self.gateway.forwarder.busy(ep):
            async for msg in upstream:
                if msg.type == WSMsgType.TEXT:
                    await client.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await client.send_bytes(msg.data)
        with contextlib.suppress(ConnectionError):
            await client.close(code=upstream.close_code or aiohttp.WSCloseCode.GOING_AWAY)


async def proxy_websocket(gateway: Gateway, request: web.Request, caller: str) -> web.WebSocketResponse:
    client = web.WebSocketResponse(heartbeat=30.0, max_msg_size=gateway.settings.max_body_bytes)
    await client.prepare(request)
    proxy = SocketProxy(gateway, request, caller)
    try:
        await proxy.run(client)
    finally:
        if proxy.relay is not None:
            proxy.relay.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await proxy.relay
    return client
