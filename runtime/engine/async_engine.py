"""AsyncEngine: the step loop in a worker thread, one asyncio queue per request.

    event loop                                   worker thread
    add_request() ──(commands queue)──────────▶  apply adds/aborts, step(), step(), ...
    async for delta in stream  ◀──call_soon_threadsafe── deltas of each step

The model never runs on the event loop. A consumer that stops iterating (break, aclose, cancellation) aborts
its request; ``abort(request_id)`` may be called from any thread and frees the blocks before the next step.

One thread does all of the engine's torch work, loading included. torch's CPU ops run on OpenMP (libgomp),
which keeps a thread team per calling thread; a second thread with a team of its own (say, the one that loaded
the model) makes libgomp see more threads than cores, and it then stops spinning between parallel regions.
Every op pays a futex wake-up instead: measured on a 2-core EPYC, a SmolLM2 decode step went from 16 to 27 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import EngineConfig
from ..outputs import EngineStats, RequestOutput
from ..sampling_params import SamplingParams
from .llm_engine import LLMEngine

if TYPE_CHECKING:
    from ..models.loader import LoadedModel
    from ..structured_outputs import CompiledGrammar, StructuredOutputsParams

logger = logging.getLogger(__name__)

_FAILED = object()  # queued to every stream when the step loop dies
# an idle engine with remote ranks checks on them this often, so a lost node is noticed without a request
KEEPALIVE_S = 5.0


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    grammar: CompiledGrammar | None = None
    reasoning_end: Callable[[list[int], list[int]], bool] | None = None


@dataclass(frozen=True)
class Abort:
    request_id: str


Command = AddRequest | Abort


class AsyncEngine:
    def __init__(self, config: EngineConfig, *, loaded: LoadedModel | None = None) -> None:
        """Loads the model (blocking, in the engine's own thread; see the module docstring). ``loaded`` skips
        reading the checkpoint again (tests)."""
        self.config = config
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._lock = threading.Lock()  # guards _streams
        self._started = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None
        self.on_failure: list[Callable[[BaseException], None]] = []  # called from the step loop when it dies
        built = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            try:
                self.engine = LLMEngine(config, loaded)
            except BaseException as e:
                failure.append(e)
                return
            finally:
                built.set()
            self._started.wait()
            self._run()

        self._thread: threading.Thread | None = threading.Thread(target=main, name="kubellm-engine", daemon=True)
        self._thread.start()
        built.wait()
        if failure:
            self._thread = None
            raise failure[0]
        self.tokenizer = self.engine.tokenizer
        self.model_name = self.engine.model_name
        self.max_model_len = self.engine.max_model_len
        self.vocab_size = self.engine.model_config.vocab_size
        self.generation_config = self.engine.generation_config
        self._stats = self.engine.stats()

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start stepping. After a shutdown, a new thread takes over (slower on the CPU: see the module docstring)."""
        if self._thread is None:
            self._started.clear()
            self._thread = threading.Thread(target=self._run_when_started, name="kubellm-engine", daemon=True)
            self._thread.start()
        self._stopping = False
        self._started.set()

    def _run_when_started(self) -> None:
        self._started.wait()
        self._run()

    async def shutdown(self) -> None:
        """Abort every request (their streams end with finish_reason "abort") and stop the worker."""
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._started.set()  # a worker that never started exits at once
        self._wakeup.set()
        await asyncio.to_thread(thread.join)
        self._thread = None

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._started.is_set() and self._thread.is_alive()

    # ---- requests -------------------------------------------------------------------------------------
    def compile_grammar(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """Compile a grammar for ``add_request(grammar=...)``. Blocking (milliseconds to a second): call it in a
        thread pool, so that neither the event loop nor the step loop waits on it. Raises GrammarError."""
        return self.engine.compile_grammar(params)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        grammar: CompiledGrammar | None = None,
        reasoning_end: Callable[[list[int], list[int]], bool] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; iterate the result for its deltas. Bad prompts raise ValueError here, at once.
        A request with ``params.structured_outputs`` must bring its ``grammar`` (``compile_grammar``)."""
        if self.error is not None:
            raise RuntimeError(f"the engine has stopped after an error: {self.error!r}")
        if not self.is_running:
            raise RuntimeError("the engine is not started (await engine.start() first)")
        if params.structured_outputs is not None and grammar is None:
            raise ValueError("structured_outputs needs its compiled grammar: call compile_grammar first")
        prompt_token_ids = self.engine.tokenize(prompt)
        self.engine.validate_prompt(prompt_token_ids)
        self.engine.validate_params(params)
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue[Any] = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self._streams[request_id] = (loop, stream)
        self._commands.put(AddRequest(request_id, prompt_token_ids, params, priority, grammar, reasoning_end))
        self._wakeup.set()
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: asyncio.Queue[Any]) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.get()
                if item is _FAILED:
                    raise RuntimeError(f"the engine failed: {self.error!r}")
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, idempotent). Its stream, if still read, ends with finish_reason abort."""
        self._commands.put(Abort(request_id))
        self._wakeup.set()

    def stats(self) -> EngineStats:
        return self._stats

    # ---- the worker thread ----------------------------------------------------------------------------
    def _emit(self, output: RequestOutput | BaseException, request_id: str) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is None:
            return
        loop, stream = target
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            loop.call_soon_threadsafe(stream.put_nowait, output)

    def _apply_commands(self) -> None:
        engine = self.engine
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, AddRequest):
                try:
                    engine.add_request(
                        command.request_id,
                        command.prompt_token_ids,
                        command.params,
                        priority=command.priority,
                        grammar=command.grammar,
                        reasoning_end=command.reasoning_end,
                    )
                except ValueError as e:
                    self._emit(e, command.request_id)
            else:
                out = engine.abort_request(command.request_id)
                if out is not None:
                    self._emit(out, command.request_id)

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                self._apply_commands()
                if self._stopping:
                    for out in engine.abort_all():
                        self._emit(out, out.request_id)
                    self._stats = engine.stats()
                    return
                if not engine.has_unfinished_requests():
                    self._stats = engine.stats()
                    if not self._wakeup.wait(KEEPALIVE_S if engine.runner.group is not None else None):
                        engine.runner.keepalive()  # raises when a rank is gone
                    self._wakeup.clear()
                    continue
                outputs = engine.step()
                self._stats = engine.stats()
                for out in outputs:
                    self._emit(out, out.request_id)
        except BaseException as e:  # a bug or an OOM in the model: fail every stream instead of hanging them
            logger.exception("engine step loop failed")
            self.error = e
            with self._lock:
                targets = list(self._streams.values())
            for loop, stream in targets:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(stream.put_nowait, _FAILED)
            for hook in self.on_failure:
                try:
                    hook(e)
                except Exception:
                    logger.exception("an engine-failure hook failed")
