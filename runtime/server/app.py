"""The OpenAI-compatible HTTP / SSE / WebSocket server, on top of ``AsyncEngine``: routes, middleware, probes.

One request's way through::

    middleware (here): log line + error shape ─▶ auth ─▶ drain / loading gate
      ─▶ serving_chat.py / serving_completion.py: parse body ─▶ model name ─▶ tokenize ─▶ check lengths
         ─▶ admission.py (bounded queue, per-key rate limits, charge) ─▶ engine.add_request per prompt
         ─▶ serving.py's fan-in: (choice, delta) ─▶ protocol.py chunks ─▶ sse.py | websocket.py | one JSON body
      ─▶ finally: abort whatever did not finish (a client that went away frees its KV blocks)

Handlers run with aiohttp's handler cancellation on, so a client that disconnects cancels its handler
wherever it waits (queued, prefilling, streaming) and the engine request is aborted at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, web
from pydantic import BaseModel, ValidationError

from kubellm.apikeys import ANONYMOUS, CHALLENGE, MISSING_KEY_CODE, MISSING_KEY_MESSAGE, APIKeyAuth

from . import protocol as p
from .errors import APIError, bad_request, from_http_exception, from_validation_error
from .metrics import CONTENT_TYPE
from .openapi import PROBE_PATHS, PUBLIC_PATHS, ROUTES, build_openapi
from .serving import ServingContext
from .serving_chat import ChatServing
from .serving_completion import CompletionServing
from .settings import ServerSettings
from .websocket import chat_websocket

if TYPE_CHECKING:
    from ..engine.async_engine import AsyncEngine

__all__ = ["OpenAIServer", "ServerSettings"]

log = logging.getLogger("kubellm.server")
request_log = logging.getLogger("kubellm.server.requests")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class OpenAIServer:
    """Routes, middleware and probes; the serving classes do the OpenAI <-> engine translation."""

    def __init__(self, settings: ServerSettings, engine: AsyncEngine | None = None) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name
        self.auth = APIKeyAuth(settings.api_keys, PUBLIC_PATHS)
        self.ctx = ServingContext(settings)
        self.metrics = self.ctx.metrics
        self.admission = self.ctx.admission
        self.chat = ChatServing(self.ctx)
        self.completions = CompletionServing(self.ctx)
        self.created = int(time.time())
        self.websockets: set[web.WebSocketResponse] = set()  # open ones, closed by the server as it leaves
        if engine is not None:
            self.set_engine(engine)

    # ----- lifecycle -----------------------------------------------------------------------------------

    @property
    def engine(self) -> AsyncEngine | None:
        return self.ctx.engine

    def set_engine(self, engine: AsyncEngine) -> None:
        """Mark the model loaded and started: /ready turns true, generation routes open."""
        self.ctx.set_engine(engine)

    @property
    def draining(self) -> bool:
        return self.admission.draining

    @property
    def in_flight(self) -> int:
        return self.admission.in_flight

    def start_draining(self) -> None:
        """SIGTERM: /ready turns false at once and new requests get 503; in-flight ones carry on."""
        self.admission.start_draining()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if the timeout passed first."""
        return await self.admission.wait_idle(timeout)

    def abort_all(self) -> None:
        if self.engine is not None:
            for request_id in list(self.admission.active):
                self.engine.abort(request_id)

    # ----- app -----------------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        # client_max_size: aiohttp enforces the body limit on chunked bodies (no Content-Length) as well.
        app = web.Application(middlewares=[self._middleware], client_max_size=self.settings.max_body_bytes)
        handlers: dict[str, Handler] = {
            "health": self.health,
            "ready": self.ready,
            "metrics": self.prometheus,
            "openapi": self.openapi,
            "list_models": self.list_models,
            "get_model": self.get_model,
            "completions": self.completions.create,
            "chat_completions": self.chat.create,
            "chat_websocket": self.chat_websocket,
            "tokenize": self.tokenize,
            "detokenize": self.detokenize,
        }
        for route in ROUTES:
            app.router.add_route(route.method, route.path, handlers[route.name], name=route.name)
        app.on_shutdown.append(self._close_websockets)
        return app

    async def _close_websockets(self, _app: web.Application) -> None:
        """After the drain: an idle WebSocket would hold the shutdown for aiohttp's whole grace period (60 s);
        close each with 1001 Going Away, which clients read as "reconnect elsewhere"."""
        for ws in list(self.websockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """One log line per request; every error in OpenAI's shape; auth and the drain gate."""
        start = time.monotonic()
        status = 500
        route = request.match_info.route.name or "unmatched"
        try:
            try:
                self._gate(request)
                response = await handler(request)
            except APIError as exc:
                response = exc.to_response()
            except ValidationError as exc:
                response = from_validation_error(exc).to_response()
            except web.HTTPException as exc:
                response = from_http_exception(exc).to_response()
            except Exception:
                log.exception("unhandled error in %s %s", request.method, request.path)
                response = APIError(500, "internal server error", code="internal_error").to_response()
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away; nginx's name for it
            raise
        finally:
            self.metrics.http_request(route, status)
            self._log_request(request, status, time.monotonic() - start)

    def _gate(self, request: web.Request) -> None:
        path = request.path
        if not self.auth.is_exempt(path):
            caller = self.auth.authenticate(request.headers.get("Authorization"))
            if caller is None:
                raise APIError(401, MISSING_KEY_MESSAGE, code=MISSING_KEY_CODE, headers=dict(CHALLENGE))
            request["caller"] = caller
        if path in PUBLIC_PATHS:
            return
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining", headers={"Connection": "close"})
        if self.engine is None and request.match_info.route.name is not None:
            raise APIError(503, "the model is still loading", code="loading", headers={"Retry-After": "5"})

    def _log_request(self, request: web.Request, status: int, duration: float) -> None:
        # Probes and scrapes arrive every few seconds: log them only at debug level.
        level = logging.DEBUG if request.path in PROBE_PATHS and status < 400 else logging.INFO
        if not request_log.isEnabledFor(level):
            return
        line: dict[str, Any] = {
            "request_id": request.get("request_id"),
            "method": request.method,
            "path": request.path,
            "status": status,
            "duration_s": round(duration, 4),
            "caller": request.get("caller", ANONYMOUS),
        }
        trace = request.get("trace")
        if trace is not None:
            line.update(trace.to_log())
        request_log.log(level, json.dumps(line))

    # ----- small routes --------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        if self.engine is None:
            return web.json_response({"status": "loading"}, status=503)
        return web.json_response({"status": "ready"})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(build_openapi())

    def _model_card(self) -> p.ModelCard:
        engine = self.ctx.get_engine()
        return p.ModelCard(
            id=self.model_name, created=self.created, root=str(engine.config.model), max_model_len=engine.max_model_len
        )

    async def list_models(self, request: web.Request) -> web.Response:
        return _json(p.ModelList(data=[self._model_card()]))

    async def get_model(self, request: web.Request) -> web.Response:
        self.ctx.check_model(request.match_info["model"])
        return _json(self._model_card())

    async def tokenize(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        req = await ctx.parse(request, p.TokenizeRequest)
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of 'prompt' and 'messages'", param="prompt")
        if req.messages is not None:
            ids = await ctx.encode(self.chat.render(req.messages, req.add_generation_prompt, None), False)
        else:
            ids = await ctx.encode(req.prompt or "", req.add_special_tokens)
        strs = ctx.tokenizer().convert_ids_to_tokens(ids) if req.return_token_strs else None
        max_model_len = ctx.get_engine().max_model_len
        return _json(p.TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids, token_strs=strs))

    async def detokenize(self, request: web.Request) -> web.Response:
        req = await self.ctx.parse(request, p.DetokenizeRequest)
        self.ctx.check_model(req.model)
        self.ctx.check_token_ids(req.tokens, "tokens")
        return _json(p.DetokenizeResponse(prompt=self.ctx.tokenizer().decode(req.tokens)))

    async def chat_websocket(self, request: web.Request) -> web.WebSocketResponse:
        return await chat_websocket(self.chat, request, self.settings.max_body_bytes, self.websockets)


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), status=status, content_type="application/json")
