"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, as the runtime answers them."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from kubellm.contract import error_type


class GatewayError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = error_type(self.status)
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)

    def sse_event(self) -> bytes:
        """The error as an SSE event, for a stream whose 200 already went out (a held streaming request)."""
        return f"data: {json.dumps(self.body())}\n\n".encode()
