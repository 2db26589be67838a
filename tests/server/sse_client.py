"""A streaming completion read event by event over its own connection (imported as `server.sse_client`): the tests
that must act between two events of one stream (a signal, a second request) use it."""

from __future__ import annotations

import http.client
import json
from typing import Any


class SSEStream:
    def __init__(self, port: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.conn.request(
            "POST",
            "/v1/completions",
            body=json.dumps({**body, "stream": True}),
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        self.response = self.conn.getresponse()

    def next_event(self) -> bytes:
        """The next non-empty line (b"" once the stream has ended)."""
        line = b""
        while not line.strip():
            line = self.response.readline()
            if not line:
                return b""
        return line.strip()

    def rest(self) -> list[bytes]:
        events = []
        while event := self.next_event():
            events.append(event)
        return events

    def close(self) -> None:
        self.conn.close()
