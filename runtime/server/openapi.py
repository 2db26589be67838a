"""The route table and the OpenAPI 3.1 document built from it and the pydantic models in protocol.py.

app.py registers exactly the routes listed here, so /openapi.json cannot drift from what the server serves;
the auth-exempt paths (``PUBLIC_PATHS``) and the probe paths (``PROBE_PATHS``: logged at debug level, open while
loading or draining) are read from the same table.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from . import protocol as p


@dataclass(frozen=True)
class Route:
    name: str  # the handler's name in app.py
    method: str
    path: str
    summary: str
    request: type[BaseModel] | None = None
    response: type[BaseModel] | None = None
    stream: type[BaseModel] | None = None  # the SSE chunk model when the request asks for ``stream: true``
    errors: tuple[int, ...] = ()
    content_type: str = "application/json"
    public: bool = False  # exempt from API keys, open while the model loads and while draining
    probe: bool = False  # kubelet probes and Prometheus scrapes: logged at debug level


_GENERATION_ERRORS = (400, 401, 404, 413, 422, 429, 503)

ROUTES: tuple[Route, ...] = (
    Route("health", "GET", "/health", "Liveness: the process answers.", public=True, probe=True),
    Route(
        "ready",
        "GET",
        "/ready",
        "Readiness: the model is loaded and the server is not draining.",
        errors=(503,),
        public=True,
        probe=True,
    ),
    Route(
        "metrics",
        "GET",
        "/metrics",
        "Prometheus metrics (vLLM names).",
        content_type="text/plain",
        public=True,
        probe=True,
    ),
    Route("openapi", "GET", "/openapi.json", "This document.", public=True),
    Route("list_models", "GET", "/v1/models", "The served model.", response=p.ModelList, errors=(401, 503)),
    Route("get_model", "GET", "/v1/models/{model}", "One model by id.", response=p.ModelCard, errors=(401, 404, 503)),
    Route(
        "completions",
        "POST",
        "/v1/completions",
        "Text completion (SSE when stream is true).",
        request=p.CompletionRequest,
        response=p.CompletionResponse,
        stream=p.CompletionChunk,
        errors=_GENERATION_ERRORS,
    ),
    Route(
        "chat_completions",
        "POST",
        "/v1/chat/completions",
        "Chat completion (SSE when stream is true).",
        request=p.ChatCompletionRequest,
        response=p.ChatCompletionResponse,
        stream=p.ChatCompletionChunk,
        errors=_GENERATION_ERRORS,
    ),
    Route(
        "chat_websocket",
        "GET",
        "/v1/chat/completions/ws",
        "WebSocket chat: send {type: create, id, request} or {type: cancel, id}; receive chunk, done, "
        "cancelled and error messages.",
        errors=(401, 503),
    ),
    Route(
        "tokenize",
        "POST",
        "/tokenize",
        "Token ids of a prompt or of chat messages.",
        request=p.TokenizeRequest,
        response=p.TokenizeResponse,
        errors=(400, 401, 404, 413, 422, 503),
    ),
    Route(
        "detokenize",
        "POST",
        "/detokenize",
        "Text of token ids.",
        request=p.DetokenizeRequest,
        response=p.DetokenizeResponse,
        errors=(400, 401, 404, 413, 422, 503),
    ),
)

PUBLIC_PATHS = frozenset(r.path for r in ROUTES if r.public)
PROBE_PATHS = frozenset(r.path for r in ROUTES if r.probe)


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


@functools.cache
def build_openapi() -> dict[str, Any]:
    components: dict[str, Any] = {}
    error_ref = _schema(p.ErrorResponse, components)
    paths: dict[str, Any] = {}
    for route in ROUTES:
        op: dict[str, Any] = {"operationId": route.name, "summary": route.summary, "responses": {}}
        if route.request is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _schema(route.request, components)}},
            }
        ok: dict[str, Any] = {"description": "OK"}
        if route.response is not None:
            ok["content"] = {"application/json": {"schema": _schema(route.response, components)}}
        elif route.content_type != "application/json":
            ok["content"] = {route.content_type: {"schema": {"type": "string"}}}
        else:
            ok["content"] = {"application/json": {"schema": {"type": "object"}}}
        if route.stream is not None:
            ok["content"]["text/event-stream"] = {
                "schema": {"type": "string", "description": "data: <chunk JSON>\\n\\n per chunk, then data: [DONE]"},
                "x-chunk-schema": _schema(route.stream, components),
            }
        if route.name == "chat_websocket":
            op["responses"]["101"] = {"description": "Switching to the WebSocket protocol"}
        else:
            op["responses"]["200"] = ok
        for status in route.errors:
            op["responses"][str(status)] = {
                "description": "Error",
                "content": {"application/json": {"schema": error_ref}},
            }
        if not route.public:
            op["security"] = [{"bearer": []}]
        if "{model}" in route.path:
            op["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "kubellm OpenAI-compatible API", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
