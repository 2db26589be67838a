"""Streams one chat completion with the official `openai` client and reports what came back, as JSON on stdout
when run as a script: the quick-start test runs it inside the real node's network namespace (where kube-proxy's
rules route a Service's ClusterIP) and calls stream() directly for a port-forward on the host.

    python tests/node/openai_stream.py BASE_URL MODEL
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

PROMPT = "Say hello to Kubernetes in one sentence."


def stream(base_url: str, model: str, max_tokens: int = 16) -> dict[str, Any]:
    """{"text", "chunks", "finish_reason", "first_token_s", "total_s"} of one streamed chat completion."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=120, max_retries=0)
    start = time.monotonic()
    first: float | None = None
    text, chunks, finish = "", 0, None
    with client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=max_tokens, stream=True
    ) as events:
        for event in events:
            chunks += 1
            for choice in event.choices:
                if choice.delta.content:
                    first = first if first is not None else time.monotonic() - start
                    text += choice.delta.content
                finish = choice.finish_reason or finish
    return {
        "text": text,
        "chunks": chunks,
        "finish_reason": finish,
        "first_token_s": None if first is None else round(first, 3),
        "total_s": round(time.monotonic() - start, 3),
    }


if __name__ == "__main__":
    print(json.dumps(stream(sys.argv[1], sys.argv[2])))
