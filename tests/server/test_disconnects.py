"""Clients that go away, over raw sockets against the real server: a non-streaming request, a request still in its
prefill, an `n > 1` stream, and a WebSocket closed without a close frame. Each is aborted in the engine (counted in
`vllm:request_success_total{finished_reason="abort"}`, measured as the change across the case) and leaves every
KV block free. The client waits for the server's own view (its metrics) before it drops, never for a guessed time."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.slow

LONG = {"max_tokens": 900, "ignore_eos": True, "temperature": 0}


def aborted(server: Any) -> float:
    return sum(
        v for lab, v in server.metrics().get("vllm:request_success_total", []) if lab["finished_reason"] == "abort"
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def post(server: Any, path: str, body: dict[str, Any]) -> socket.socket:
    """Send an HTTP/1.1 POST and return the open socket without reading the answer."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def running(server: Any) -> bool:
    return server.metric("vllm:num_requests_running") >= 1


def drop(sock: socket.socket) -> None:
    """Close at once: SO_LINGER 0 sends a reset, as a killed client does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def check_aborted_and_free(server: Any, before: float, count: int = 1) -> None:
    server.wait_idle(60.0)  # no request running or waiting, KV usage 0
    assert aborted(server) - before >= count


def test_a_non_streaming_client_that_leaves_is_aborted(server: Any) -> None:
    server.wait_idle()
    before = aborted(server)
    sock = post(server, "/v1/completions", {"prompt": "Once upon a time", **LONG})
    wait_for(lambda: running(server), "the request to run")
    drop(sock)
    check_aborted_and_free(server, before)


def test_a_client_that_leaves_during_the_prefill_is_aborted(server: Any, tokenizer: Any) -> None:
    server.wait_idle()
    before = aborted(server)
    prompt = " ".join(f"word{i}" for i in range(240))  # ~870 tokens: a prefill of a good fraction of a second
    assert 600 < len(tokenizer.encode(prompt)) < 1000
    sock = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 50, "stream": True})
    # gone before any byte of the answer: the prefill is under way or about to be
    wait_for(lambda: running(server) or server.metric("vllm:num_requests_waiting") >= 1, "the request admitted")
    drop(sock)
    check_aborted_and_free(server, before)


def test_an_n3_stream_dropped_mid_way_aborts_every_choice(server: Any) -> None:
    server.wait_idle()
    before = aborted(server)
    sock = post(server, "/v1/completions", {"prompt": "List animals:", "n": 3, "stream": True, **LONG})
    received = b""
    while received.count(b"data: {") < 4:  # several choices under way
        data = sock.recv(65536)
        assert data, received[-500:]
        received += data
    assert b" 200 " in received.split(b"\r\n", 1)[0]
    drop(sock)
    check_aborted_and_free(server, before)


def test_a_websocket_closed_without_a_close_frame_aborts_its_generations(server: Any) -> None:
    async def case() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                "GET /v1/chat/completions/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        assert b" 101 " in (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n", 1)[0]
        for i in range(2):
            request = {"messages": [{"role": "user", "content": f"Story {i}"}], **LONG}
            writer.write(_masked_text(json.dumps({"type": "create", "id": str(i), "request": request})))
        await writer.drain()
        seen = b""
        while seen.count(b'"chunk"') < 4:  # both generations streaming
            seen += await asyncio.wait_for(reader.read(65536), 120)
        transport = writer.transport
        transport.abort()  # TCP gone, no close frame

    server.wait_idle()
    before = aborted(server)
    asyncio.run(case())
    check_aborted_and_free(server, before, count=2)


def _masked_text(text: str) -> bytes:
    """One client-to-server WebSocket text frame (clients must mask, RFC 6455 5.3)."""
    payload = text.encode()
    mask = os.urandom(4)
    head = bytearray([0x81])
    if len(payload) < 126:
        head.append(0x80 | len(payload))
    else:
        head.append(0x80 | 126)
        head += len(payload).to_bytes(2, "big")
    return bytes(head) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
