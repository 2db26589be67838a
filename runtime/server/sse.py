"""Server-Sent Events in OpenAI's framing: ``data: {json}\\n\\n`` per chunk, then ``data: [DONE]\\n\\n``.

Chunks are the pydantic models of protocol.py, serialized with the fields their builder set (``exclude_unset``),
so a chunk carries ``finish_reason: null`` where OpenAI's does and no ``tool_calls`` key where it has none.
Once the headers are sent an error can only travel in-band, as one ``data:`` frame in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from .errors import APIError, bad_request

log = logging.getLogger("kubellm.server")


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def chunk_bytes(chunk: BaseModel) -> bytes:
    return chunk.model_dump_json(exclude_unset=True).encode()


def chunk_dict(chunk: BaseModel) -> dict[str, Any]:
    return chunk.model_dump(mode="json", exclude_unset=True)


def _frame(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


async def write_sse(request: web.Request, chunks: AsyncGenerator[BaseModel, None]) -> web.StreamResponse:
    """Stream ``chunks`` as SSE; closing the generator (always, also on a client gone) aborts its requests."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    try:
        async with contextlib.aclosing(chunks) as stream:
            try:
                async for chunk in stream:
                    await response.write(_frame(chunk_bytes(chunk)))
            except APIError as exc:
                await response.write(_frame(dumps(exc.to_dict())))
            except ValueError as exc:  # the engine refusing the request lazily
                await response.write(_frame(dumps(bad_request(str(exc)).to_dict())))
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception:  # headers are sent: the error can only travel in-band
                log.exception("stream %s failed", request.get("request_id"))
                error = APIError(500, "internal server error", code="internal_error")
                await response.write(_frame(dumps(error.to_dict())))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away mid-stream; closing the chunk generator aborted its requests
    return response
