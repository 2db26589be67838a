"""The WebSocket chat endpoint: concurrent generations on one socket, a cancel mid-way, errors in-band."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

PATH = "/v1/chat/completions/ws"


async def _next(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), timeout=120)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return dict(json.loads(msg.data))


async def test_websocket_generations_and_mid_way_cancel(server: Any) -> None:
    long_request = {
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 400,
        "temperature": 0,
        "ignore_eos": True,
    }
    short_request = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 3, "temperature": 0}
    async with aiohttp.ClientSession() as session, session.ws_connect(server.url(PATH)) as ws:
        await ws.send_json({"type": "create", "id": "long", "request": long_request})
        await ws.send_json({"type": "create", "id": "short", "request": short_request})
        content: dict[str, list[str]] = {"long": [], "short": []}
        done: dict[str, dict[str, Any]] = {}
        cancel_sent = False
        while "long" not in done:
            msg = await _next(ws)
            assert msg["type"] in ("chunk", "done", "cancelled"), msg
            if msg["type"] == "chunk":
                chunk = msg["chunk"]
                assert chunk["object"] == "chat.completion.chunk"
                for ch in chunk["choices"]:
                    content[msg["id"]].append(ch["delta"].get("content") or "")
                # Cancel the long one once it has produced some text (and the short one is finished).
                if msg["id"] == "long" and "short" in done and len(content["long"]) > 3 and not cancel_sent:
                    await ws.send_json({"type": "cancel", "id": "long"})
                    cancel_sent = True
            else:
                done[msg["id"]] = msg
        assert done["short"]["type"] == "done"
        assert done["short"]["usage"]["completion_tokens"] == 3 or done["short"]["finish_reasons"] == ["stop"]
        assert "".join(content["short"])
        assert cancel_sent and done["long"]["type"] == "cancelled"
        generated = done["long"]["usage"]["completion_tokens"]
        assert 0 < generated < 400
        # The socket still works after a cancel, and bad messages get in-band errors with a status.
        await ws.send_str("not json")
        err = await _next(ws)
        assert err["type"] == "error" and err["status"] == 400 and err["error"]["message"]
        await ws.send_json({"type": "create", "id": "bad", "request": {"messages": [], "max_tokens": 1}})
        err = await _next(ws)
        assert err["type"] == "error" and err["id"] == "bad" and err["status"] == 400
        assert err["error"]["param"] == "messages"
        await ws.send_json({"type": "create", "id": "again", "request": short_request})
        last: dict[str, Any] = {}
        while last.get("type") != "done":
            last = await _next(ws)
        assert last["id"] == "again"
    # The cancelled generation freed its KV blocks.
    await asyncio.to_thread(server.wait_idle)
