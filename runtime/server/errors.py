"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with the right HTTP status.

Handlers raise ``APIError`` (or one of its helpers); the error middleware in app.py turns it, any aiohttp
HTTP exception and any pydantic ``ValidationError`` into a JSON response. Value errors (a parameter out of
range, a prompt longer than the context) are 400; structural errors (a missing field, a wrong type) are 422.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from kubellm.contract import error_type

from .protocol import ErrorInfo, ErrorResponse

# pydantic error types that mean "the value is of the right type but not allowed": a 400, as OpenAI answers.
_VALUE_ERROR_TYPES = frozenset(
    {
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "multiple_of",
        "finite_number",
        "too_short",
        "too_long",
        "string_too_short",
        "string_too_long",
        "value_error",
        "assertion_error",
        "literal_error",
        "enum",
        "union_tag_invalid",
    }
)


class APIError(Exception):
    """An error answered to the client; ``headers`` carries e.g. ``Retry-After`` or ``WWW-Authenticate``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or error_type(status)
        self.headers = headers or {}

    def info(self) -> ErrorInfo:
        return ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)

    def to_dict(self) -> dict[str, Any]:
        return ErrorResponse(error=self.info()).model_dump()

    def to_response(self) -> web.Response:
        return web.json_response(self.to_dict(), status=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error, as a 400 (bad value) or 422 (bad structure) naming the field."""
    errors = exc.errors(include_url=False)
    if not errors:
        return APIError(422, "invalid request body")
    first = errors[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    message = str(first.get("msg", "invalid value"))
    if first.get("type") == "value_error" and message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    status = 400 if first.get("type") in _VALUE_ERROR_TYPES else 422
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    text = f"{param}: {message}{more}" if param else f"{message}{more}"
    return APIError(status, text, param=param, code=str(first.get("type")))


def from_http_exception(exc: web.HTTPException) -> APIError:
    status = exc.status
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "error"
    message = exc.text if exc.text and not exc.text.startswith(f"{status}:") else phrase
    if status == 404:
        message = "no such route; see GET /openapi.json for the routes this server has"
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return APIError(status, message, code=phrase.lower().replace(" ", "_"), headers=headers)
