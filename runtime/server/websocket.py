"""GET /v1/chat/completions/ws: bidirectional streaming chat over one WebSocket; any generation can be
cancelled mid-way.

Client to server: ``{"type": "create", "id": "<id>", "request": {<chat completion request>}}`` and
``{"type": "cancel", "id": "<id>"}``. Server to client: ``{"type": "chunk", "id", "chunk"}`` (the same chunks
as SSE), then ``{"type": "done", "id", "usage", "finish_reasons"}``, or ``{"type": "cancelled", "id", "usage"}``
after a cancel, or ``{"type": "error", "id", "status", "error"}``. Several generations may run at once on one
socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from aiohttp import WSMsgType, web
from pydantic import ValidationError

from kubellm.apikeys import ANONYMOUS

from . import protocol as p
from .errors import APIError, from_validation_error
from .serving import check_unicode, reject_constant
from .serving_chat import ChatServing
from .sse import chunk_dict, dumps
from .streams import StreamUsage, Trace

log = logging.getLogger("kubellm.server")
request_log = logging.getLogger("kubellm.server.requests")


class ChatSocket:
    """One WebSocket connection: its generations, keyed by the client's ids."""

    def __init__(self, chat: ChatServing, request: web.Request, ws: web.WebSocketResponse) -> None:
        self.chat = chat
        self.request = request
        self.ws = ws
        self.caller = request.get("caller", ANONYMOUS)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            if not self.ws.closed:
                await self.ws.send_str(dumps(message).decode())

    async def send_error(self, gen_id: str | None, exc: APIError) -> None:
        await self.send({"type": "error", "id": gen_id, "status": exc.status, **exc.to_dict()})

    async def generate(self, gen_id: str, body: Any, raw: str) -> None:
        trace = Trace()
        cancelled = False
        try:
            await self.stream_one(gen_id, body, raw, trace)
        except asyncio.CancelledError:
            cancelled = True  # a cancel message (or the socket closing): the stream's abort already ran
        except APIError as exc:
            await self.send_error(gen_id, exc)
        except ConnectionError:
            pass
        except Exception:
            log.exception("websocket generation %s failed", gen_id)
            await self.send_error(gen_id, APIError(500, "internal server error", code="internal_error"))
        finally:
            self.tasks.pop(gen_id, None)
            self._log(gen_id, trace, cancelled)
        if cancelled:
            await self.send({"type": "cancelled", "id": gen_id, "usage": trace.usage().model_dump()})

    async def stream_one(self, gen_id: str, body: Any, raw: str, trace: Trace) -> None:
        if not isinstance(body, dict):
            raise APIError(422, "'request' must be a JSON object", param="request")
        check_unicode(raw, body)
        try:
            req = p.ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        plan = await self.chat.plan(req)
        trace.prompt_tokens = len(plan.prompt)
        with self.chat.ctx.admission.admit(self.caller, [plan.request_id], trace):
            streams = self.chat.start(plan)
            chunks = self.chat.chunks(plan, int(time.time()), streams, trace, StreamUsage())
            async with contextlib.aclosing(chunks) as stream:
                async for chunk in stream:
                    await self.send({"type": "chunk", "id": gen_id, "chunk": chunk_dict(chunk)})
        usage = trace.usage().model_dump()
        await self.send({"type": "done", "id": gen_id, "usage": usage, "finish_reasons": trace.finish_reasons})

    async def on_message(self, msg: Any) -> None:
        if msg.type != WSMsgType.TEXT:
            if msg.type == WSMsgType.BINARY:
                await self.send_error(None, APIError(400, "send JSON text messages", code="invalid_message"))
            return
        try:
            message = json.loads(msg.data, parse_constant=reject_constant)
        except (ValueError, RecursionError):
            await self.send_error(None, APIError(400, "message is not valid JSON", code="invalid_json"))
            return
        if not isinstance(message, dict):
            await self.send_error(None, APIError(422, "message must be a JSON object", code="invalid_message"))
            return
        gen_id = message.get("id")
        kind = message.get("type")
        if not isinstance(gen_id, str) or not gen_id or len(gen_id) > 256:
            await self.send_error(None, APIError(422, "'id' must be a non-empty string", param="id"))
            return
        if kind == "create":
            if gen_id in self.tasks:
                await self.send_error(gen_id, APIError(400, f"a generation with id '{gen_id}' is running", param="id"))
            elif self.chat.ctx.admission.draining:
                await self.send_error(gen_id, APIError(503, "the server is shutting down", code="draining"))
            else:
                self.tasks[gen_id] = asyncio.create_task(self.generate(gen_id, message.get("request"), msg.data))
        elif kind == "cancel":
            task = self.tasks.get(gen_id)
            if task is not None:
                task.cancel()
        else:
            await self.send_error(gen_id, APIError(422, "'type' must be 'create' or 'cancel'", param="type"))

    async def run(self) -> None:
        try:
            async for msg in self.ws:
                await self.on_message(msg)
        finally:
            for task in list(self.tasks.values()):
                task.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    def _log(self, gen_id: str, trace: Trace, cancelled: bool) -> None:
        if request_log.isEnabledFor(logging.INFO):
            line = {
                "request_id": gen_id,
                "method": "WS",
                "path": self.request.path,
                "status": 499 if cancelled else 200,
                "duration_s": round(time.monotonic() - trace.arrival, 4),
                "caller": self.caller,
                **trace.to_log(),
            }
            request_log.info(json.dumps(line))


async def chat_websocket(
    chat: ChatServing, request: web.Request, max_msg_size: int, open_sockets: set[web.WebSocketResponse]
) -> web.WebSocketResponse:
    """open_sockets: the server's register of open sockets (it closes them when it shuts down)."""
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=max_msg_size)
    await ws.prepare(request)
    open_sockets.add(ws)
    try:
        await ChatSocket(chat, request, ws).run()
    finally:
        open_sockets.discard(ws)
    return ws
