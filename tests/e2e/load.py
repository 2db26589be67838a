"""Load: concurrent streaming completions against one runtime, with the official openai client.

Each of `concurrency` clients sends one streaming request after the other until `stop()`, which cancels them:
their connections close and the runtime aborts what they had in flight or queued.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field


@dataclass
class LoadStats:
    requests_started: int = 0
    requests_finished: int = 0
    chunks: int = 0
    errors: list[str] = field(default_factory=list)


class StreamingLoad:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        concurrency: int,
        max_tokens: int,
        prompt: str = "Write a long story about a lighthouse keeper:",
    ) -> None:
        self.base_url, self.model, self.concurrency, self.max_tokens, self.prompt = (
            base_url,
            model,
            concurrency,
            max_tokens,
            prompt,
        )
        self.stats = LoadStats()
        self.started_at: float | None = None
        self.stopped_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def start(self) -> StreamingLoad:
        self.started_at = time.monotonic()
        self._thread.start()
        self._ready.wait(timeout=30)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._main is not None and not self._main.done():
            self._loop.call_soon_threadsafe(self._main.cancel)
        self._thread.join(timeout=timeout)
        self.stopped_at = time.monotonic()
        if self._thread.is_alive():
            raise AssertionError(f"the load's clients did not stop within {timeout:.0f} s")

    def __enter__(self) -> StreamingLoad:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.run(self._main_coro())

    async def _main_coro(self) -> None:
        import openai

        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0, timeout=600)
        self._ready.set()
        try:
            await asyncio.gather(*(self._client(client) for _ in range(self.concurrency)))
        except asyncio.CancelledError:
            pass
        finally:
            await client.close()

    async def _client(self, client: object) -> None:
        import openai

        assert isinstance(client, openai.AsyncOpenAI)
        while True:
            self.stats.requests_started += 1
            try:
                stream = await client.completions.create(
                    model=self.model, prompt=self.prompt, max_tokens=self.max_tokens, temperature=0.8, stream=True
                )
                async with stream:
                    async for _chunk in stream:
                        self.stats.chunks += 1
                self.stats.requests_finished += 1
            except openai.APIError as exc:
                self.stats.errors.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.2)  # back off from a server that refuses (e.g. draining)
