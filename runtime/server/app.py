"""The OpenAI-compatible HTTP / SSE / WebSocket server, on top of ``AsyncEngine``.

One request's way through::

    middleware: log line + error shape ─▶ auth ─▶ drain / loading gate
      ─▶ handler: parse body (size limit, JSON, pydantic) ─▶ model name ─▶ tokenize ─▶ check lengths
      ─▶ admission (bounded queue, per-key rate limits) ─▶ engine.add_request per prompt
      ─▶ deltas ─▶ SSE chunks | WebSocket messages | one JSON body
      ─▶ finally: abort whatever did not finish (a client that went away frees its KV blocks)

Handlers run with aiohttp's handler cancellation on, so a client that disconnects cancels its handler
wherever it waits (queued, prefilling, streaming) and the engine request is aborted at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ValidationError

from ..outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from ..sampling_params import SamplingParams
from . import protocol as p
from .auth import ANONYMOUS, APIKeyAuth
from .errors import APIError, bad_request, from_http_exception, from_validation_error
from .metrics import CONTENT_TYPE, ServerMetrics
from .openapi import ROUTES, build_openapi
from .ratelimit import RateLimiter

if TYPE_CHECKING:
    from ..engine.async_engine import AsyncEngine

log = logging.getLogger("kubellm.server")
request_log = logging.getLogger("kubellm.server.requests")

ModelT = TypeVar("ModelT", bound=BaseModel)

PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
WEBSOCKET_PATH = "/v1/chat/completions/ws"


@dataclass
class ServerSettings:
    """What the server needs beyond the engine's own configuration."""

    served_model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_queue_len: int = 1024
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None
    max_body_bytes: int = 2 * 1024 * 1024
    drain_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError("served_model_name must not be empty")
        if self.max_queue_len < 1:
            raise ValueError(f"max_queue_len must be at least 1, got {self.max_queue_len}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.drain_timeout < 0:
            raise ValueError(f"drain_timeout must be non-negative, got {self.drain_timeout}")
        for name in ("rate_limit_rpm", "rate_limit_tpm"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be non-negative, got {value}")


@dataclass
class _Trace:
    """One HTTP request's timings and token counts: fed to the metrics and to its log line."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)

    def to_log(self) -> dict[str, Any]:
        ttft = None if self.first_token is None else round(self.first_token - self.arrival, 4)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": ttft,
            "finish_reason": ",".join(sorted(set(self.finish_reasons))) or None,
        }


@dataclass
class _Choice:
    """A choice being accumulated from deltas, for non-streaming answers."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: p.FinishReasonName | None = None
    stop_reason: str | int | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text.append(delta.text)
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = _reason(delta)
            self.stop_reason = delta.stop_reason


def _reason(c: CompletionOutput) -> p.FinishReasonName | None:
    if c.finish_reason is None:
        return None
    return cast(p.FinishReasonName, str(getattr(c.finish_reason, "value", c.finish_reason)))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _refusals_as_400(stream: AsyncIterator[RequestOutput]) -> AsyncGenerator[RequestOutput, None]:
    """The engine's stream, with a lazily raised ``ValueError`` (a prompt it refuses) turned into a 400."""
    try:
        async for out in stream:
            yield out
    except ValueError as exc:
        raise bad_request(str(exc), param="prompt") from None
    finally:
        await _aclose(stream)


async def _aclose(stream: Any) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


class OpenAIServer:
    """Routes, admission control and the translation between OpenAI's schema and the engine's."""

    def __init__(self, settings: ServerSettings, engine: AsyncEngine | None = None) -> None:
        self.settings = settings
        self.engine: AsyncEngine | None = None
        self.model_name = settings.served_model_name
        self.auth = APIKeyAuth(settings.api_keys)
        self.rate_limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
        self.metrics = ServerMetrics(self.model_name, self._stats)
        self.draining = False
        self.in_flight = 0  # engine requests admitted and not finished
        self._active: set[str] = set()  # their engine request ids, to abort at the end of a drain
        self._idle = asyncio.Event()
        self._idle.set()
        self._token_str_cache: dict[int, str] = {}
        self.created = int(time.time())
        if engine is not None:
            self.set_engine(engine)

    # ----- lifecycle -----------------------------------------------------------------------------------

    def set_engine(self, engine: AsyncEngine) -> None:
        """Mark the model loaded and started: /ready turns true, generation routes open."""
        self.engine = engine
        self._token_str_cache.clear()

    def _stats(self) -> EngineStats | None:
        return None if self.engine is None else self.engine.stats()

    def start_draining(self) -> None:
        """SIGTERM: /ready turns false at once and new requests get 503; in-flight ones carry on."""
        if not self.draining:
            log.info("draining: %d requests in flight", self.in_flight)
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def abort_all(self) -> None:
        if self.engine is not None:
            for request_id in list(self._active):
                self.engine.abort(request_id)

    # ----- app -----------------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        # client_max_size: aiohttp enforces the body limit on chunked bodies (no Content-Length) as well.
        app = web.Application(middlewares=[self._middleware], client_max_size=self.settings.max_body_bytes)
        handlers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {
            "health": self.health,
            "ready": self.ready,
            "metrics": self.prometheus,
            "openapi": self.openapi,
            "list_models": self.list_models,
            "get_model": self.get_model,
            "completions": self.create_completion,
            "chat_completions": self.create_chat_completion,
            "chat_websocket": self.chat_websocket,
            "tokenize": self.tokenize,
            "detokenize": self.detokenize,
        }
        for route in ROUTES:
            app.router.add_route(route.method, route.path, handlers[route.name], name=route.name)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """One log line per request; every error in OpenAI's shape; auth and the drain gate."""
        start = time.monotonic()
        status = 500
        route = request.match_info.route.name or "unmatched"
        try:
            try:
                self._gate(request)
                response = await handler(request)
            except APIError as exc:
                response = exc.to_response()
            except ValidationError as exc:
                response = from_validation_error(exc).to_response()
            except web.HTTPException as exc:
                response = from_http_exception(exc).to_response()
            except Exception:
                log.exception("unhandled error in %s %s", request.method, request.path)
                response = APIError(500, "internal server error", code="internal_error").to_response()
            status = response.status
            return response
        except asyncio.CancelledError:
            status = 499  # the client went away; nginx's name for it
            raise
        finally:
            self.metrics.http_request(route, status)
            self._log_request(request, status, time.monotonic() - start)

    def _gate(self, request: web.Request) -> None:
        path = request.path
        if not self.auth.is_exempt(path):
            caller = self.auth.authenticate(request.headers.get("Authorization"))
            if caller is None:
                raise APIError(
                    401,
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": 'Bearer realm="kubellm"'},
                )
            request["caller"] = caller
        if path in PROBE_PATHS or path == "/openapi.json":
            return
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining", headers={"Connection": "close"})
        if self.engine is None and request.match_info.route.name is not None:
            raise APIError(503, "the model is still loading", code="loading", headers={"Retry-After": "5"})

    def _log_request(self, request: web.Request, status: int, duration: float) -> None:
        # Probes and scrapes arrive every few seconds: log them only at debug level.
        level = logging.DEBUG if request.path in PROBE_PATHS and status < 400 else logging.INFO
        if not request_log.isEnabledFor(level):
            return
        line: dict[str, Any] = {
            "request_id": request.get("request_id"),
            "method": request.method,
            "path": request.path,
            "status": status,
            "duration_s": round(duration, 4),
            "caller": request.get("caller", ANONYMOUS),
        }
        trace = request.get("trace")
        if trace is not None:
            line.update(trace.to_log())
        request_log.log(level, json.dumps(line))

    # ----- small routes --------------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        if self.engine is None:
            return web.json_response({"status": "loading"}, status=503)
        return web.json_response({"status": "ready"})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(build_openapi())

    def _model_card(self) -> p.ModelCard:
        engine = self._engine()
        return p.ModelCard(
            id=self.model_name, created=self.created, root=str(engine.config.model), max_model_len=engine.max_model_len
        )

    async def list_models(self, request: web.Request) -> web.Response:
        return _json(p.ModelList(data=[self._model_card()]))

    async def get_model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return _json(self._model_card())

    async def tokenize(self, request: web.Request) -> web.Response:
        req = await self._parse(request, p.TokenizeRequest)
        self._check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of 'prompt' and 'messages'", param="prompt")
        if req.messages is not None:
            ids = await self._encode(self._render_chat(req.messages, req.add_generation_prompt, None), False)
        else:
            ids = await self._encode(req.prompt or "", req.add_special_tokens)
        engine = self._engine()
        strs = self._tokenizer().convert_ids_to_tokens(ids) if req.return_token_strs else None
        return _json(
            p.TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=ids, token_strs=strs)
        )

    async def detokenize(self, request: web.Request) -> web.Response:
        req = await self._parse(request, p.DetokenizeRequest)
        self._check_model(req.model)
        self._check_token_ids(req.tokens, "tokens")
        return _json(p.DetokenizeResponse(prompt=self._tokenizer().decode(req.tokens)))

    # ----- parsing and checks --------------------------------------------------------------------------

    def _engine(self) -> AsyncEngine:
        if self.engine is None:
            raise APIError(503, "the model is still loading", code="loading", headers={"Retry-After": "5"})
        return self.engine

    def _tokenizer(self) -> Any:
        tokenizer = self._engine().tokenizer
        if tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as token ids", param="prompt")
        return tokenizer

    async def _parse(self, request: web.Request, model: type[ModelT]) -> ModelT:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise APIError(
                413, f"request body is {request.content_length} bytes; the limit is {limit}", code="request_too_large"
            )
        body = await request.read()  # aiohttp enforces client_max_size on bodies without a length, too
        try:
            data = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(422, "request body must be a JSON object", code="invalid_body")
        try:
            return model.model_validate(data)
        except RecursionError:
            raise APIError(400, "request body is nested too deeply", code="invalid_body") from None

    def _check_model(self, name: str | None) -> None:
        if name is None:
            return
        aliases = {self.model_name}
        if self.engine is not None:
            aliases.add(self.engine.model_name)
        if name not in aliases:
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def _check_token_ids(self, ids: list[int], param: str) -> None:
        vocab_size = self._tokenizer().vocab_size
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range: the vocabulary has {vocab_size} tokens", param)

    async def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        tokenizer = self._tokenizer()
        if len(text) > 16384:  # long texts take a while: keep the event loop free for other requests
            return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)
        return tokenizer.encode(text, add_special_tokens)

    def _render_chat(
        self, messages: list[p.ChatMessage], add_generation_prompt: bool, kwargs: dict[str, Any] | None
    ) -> str:
        plain: list[dict[str, Any]] = []
        for i, m in enumerate(messages):
            if isinstance(m.content, list) and any(not isinstance(part, p.TextContentPart) for part in m.content):
                raise bad_request("only text content parts are supported", param=f"messages.{i}.content")
            item: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name:
                item["name"] = m.name
            plain.append(item)
        try:
            return self._tokenizer().apply_chat_template(
                plain, add_generation_prompt=add_generation_prompt, **(kwargs or {})
            )
        except APIError:
            raise
        except Exception as exc:  # a template that rejects these messages is the client's error
            raise bad_request(f"cannot apply the chat template to these messages: {exc}", param="messages") from None

    def _check_length(self, prompt_len: int, max_tokens: int | None, param: str, prompt_param: str) -> int:
        """The max_tokens to use: the requested one, or what is left of the context. Too long is a 400."""
        max_model_len = self._engine().max_model_len
        if prompt_len >= max_model_len:
            raise bad_request(
                f"this model's maximum context length is {max_model_len} tokens, but the prompt has "
                f"{prompt_len} tokens; shorten it",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is None:
            return max_model_len - prompt_len
        if prompt_len + max_tokens > max_model_len:
            raise bad_request(
                f"this model's maximum context length is {max_model_len} tokens, but you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} to generate); "
                "reduce the prompt or max_tokens",
                param=param,
                code="context_length_exceeded",
            )
        return max_tokens

    def _sampling_params(
        self, req: p.CompletionRequest | p.ChatCompletionRequest, max_tokens: int, logprobs: int | None
    ) -> SamplingParams:
        engine = self._engine()
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        max_num_seqs = engine.config.max_num_seqs
        if req.n > max_num_seqs:
            raise bad_request(f"n is {req.n}, more than this server runs at once ({max_num_seqs})", param="n")
        top_k = req.top_k or 0
        if top_k < 0 or top_k >= self._tokenizer().vocab_size:
            top_k = 0  # -1 is OpenAI-ecosystem spelling of "off"; k >= vocab is the same as off
        try:
            return SamplingParams(
                n=req.n,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=top_k,
                min_p=req.min_p or 0.0,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                # The engine seeds a 63-bit generator: fold OpenAI's int64 range onto it.
                seed=None if req.seed is None else req.seed % (p.MAX_SEED + 1),
                stop=list(req.stop or []),
                stop_token_ids=list(req.stop_token_ids or []),
                include_stop_str_in_output=req.include_stop_str_in_output,
                max_tokens=max_tokens,
                min_tokens=min(req.min_tokens, max_tokens),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
            )
        except ValueError as exc:
            message = str(exc)
            raise bad_request(message, param=message.split(" ", 1)[0]) from None

    # ----- admission -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _admission(self, caller: str, request_ids: list[str], prompt_tokens: int) -> Iterator[None]:
        """Bounded queue and rate limits; counts the requests in flight for the drain."""
        if self.draining:
            raise APIError(503, "the server is shutting down", code="draining")
        stats = self._engine().stats()
        waiting = max(stats.num_requests_waiting, self.in_flight - stats.num_requests_running)
        if waiting + len(request_ids) > self.settings.max_queue_len:
            raise APIError(
                429,
                f"the server is busy: {waiting} requests are waiting "
                f"(limit {self.settings.max_queue_len}); retry later",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        retry_after = self.rate_limiter.try_acquire(caller, prompt_tokens)
        if retry_after is not None:
            raise APIError(
                429,
                f"rate limit exceeded for this API key; retry in {retry_after:.0f} s",
                code="rate_limit_exceeded",
                headers={"Retry-After": f"{retry_after:.0f}"},
            )
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.in_flight += len(request_ids)
        self._active.update(request_ids)
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= len(request_ids)
            self._active.difference_update(request_ids)
            if self.in_flight == 0:
                self._idle.set()

    # ----- generation ----------------------------------------------------------------------------------

    def _start(
        self, request_ids: list[str], prompts: list[list[int]], params: list[SamplingParams], priority: int = 0
    ) -> list[AsyncIterator[RequestOutput]]:
        """Hand every prompt to the engine; a prompt the engine refuses is a 400 before any header is sent."""
        engine = self._engine()
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for request_id, prompt, sp in zip(request_ids, prompts, params, strict=True):
                stream = engine.add_request(request_id, prompt, sp, priority=priority)
                streams.append(_refusals_as_400(stream))
        except (ValueError, RuntimeError) as exc:
            for request_id in request_ids:
                engine.abort(request_id)
            if isinstance(exc, RuntimeError):  # the engine stopped after an error: nothing this request did
                log.error("engine refused a request: %s", exc)
                raise APIError(503, "the engine is unavailable", code="engine_unavailable") from None
            raise bad_request(str(exc), param="prompt") from None
        return streams

    async def _deltas(
        self, request_ids: list[str], streams: list[AsyncIterator[RequestOutput]], n: int, trace: _Trace
    ) -> AsyncGenerator[tuple[int, CompletionOutput], None]:
        """(choice index, delta) pairs from all the request's engine streams, as they come.

        Choice ``j`` of prompt ``i`` is index ``i * n + j``. Whatever has not finished when this generator
        is closed (client gone, error, cancel) is aborted, which frees its KV blocks within one step.
        """
        engine = self._engine()
        unfinished = set(request_ids)
        try:
            if len(streams) == 1:
                try:
                    async for out in streams[0]:
                        self._observe(trace, out)
                        for c in out.outputs:
                            yield c.index, c
                        if out.finished:
                            unfinished.discard(request_ids[0])
                finally:
                    await _aclose(streams[0])
                return
            queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

            async def pump(i: int) -> None:
                try:
                    async for out in streams[i]:
                        queue.put_nowait((i, out))
                except Exception as exc:
                    queue.put_nowait(exc)
                finally:
                    await _aclose(streams[i])
                    queue.put_nowait(None)

            tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
            try:
                remaining = len(tasks)
                while remaining:
                    item = await queue.get()
                    if item is None:
                        remaining -= 1
                        continue
                    if isinstance(item, BaseException):
                        raise item
                    i, out = item
                    self._observe(trace, out)
                    for c in out.outputs:
                        yield i * n + c.index, c
                    if out.finished:
                        unfinished.discard(request_ids[i])
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for request_id in unfinished:
                engine.abort(request_id)
            if unfinished:
                trace.finish_reasons.append("abort")
                for _ in unfinished:
                    self.metrics.request_finished("abort")

    def _observe(self, trace: _Trace, out: RequestOutput) -> None:
        """Latency histograms and token counters, per engine delta."""
        now = time.monotonic()
        new_tokens = sum(len(c.token_ids) for c in out.outputs)
        if new_tokens:
            if trace.first_token is None:
                trace.first_token = now
                self.metrics.ttft.observe(now - trace.arrival)
            elif trace.last_token is not None:
                self.metrics.itl.observe(now - trace.last_token)
            trace.last_token = now
            trace.completion_tokens += new_tokens
            self.metrics.generation_tokens.inc(new_tokens)
        for c in out.outputs:
            reason = _reason(c)
            if reason is not None:
                trace.finish_reasons.append(reason)
                self.metrics.request_finished(reason)
        if out.finished:
            self.metrics.e2e.observe(now - trace.arrival)

    def _token_str(self, token_id: int) -> str:
        s = self._token_str_cache.get(token_id)
        if s is None:
            s = self._tokenizer().decode([token_id], skip_special_tokens=False)
            self._token_str_cache[token_id] = s
        return s

    def _chat_logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        content = []
        for lp in logprobs:
            token = self._token_str(lp.token_id)
            top = [{"token": (t := self._token_str(tid)), "logprob": v, "bytes": list(t.encode())} for tid, v in lp.top]
            content.append({"token": token, "logprob": lp.logprob, "bytes": list(token.encode()), "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, logprobs: list[TokenLogprob], offset: int) -> dict[str, Any]:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for lp in logprobs:
            token = self._token_str(lp.token_id)
            tokens.append(token)
            token_logprobs.append(lp.logprob)
            top = {self._token_str(tid): v for tid, v in lp.top}
            top.setdefault(token, lp.logprob)
            top_logprobs.append(top)
            text_offset.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }

    async def _generation_request(
        self, request: web.Request, req: p.CompletionRequest | p.ChatCompletionRequest, kind: str
    ) -> tuple[str, list[list[int]], list[SamplingParams], list[str]]:
        """Tokenize, check lengths, build sampling params: (request id, prompts, params, prompt texts)."""
        self._check_model(req.model)
        request_id = f"{kind}-{uuid.uuid4().hex}"
        request["request_id"] = request_id
        texts: list[str] = []
        if isinstance(req, p.ChatCompletionRequest):
            if req.tools and req.tool_choice not in (None, "none"):
                raise bad_request("tool calling is not supported", param="tools")
            if req.response_format is not None and req.response_format.type != "text":
                raise bad_request("only response_format type 'text' is supported", param="response_format")
            if req.top_logprobs is not None and not req.logprobs:
                raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
            text = self._render_chat(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
            prompts = [await self._encode(text, False)]
            texts.append(text)
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            limits = [self._check_length(len(prompts[0]), max_tokens, param, "messages")]
        else:
            if req.suffix:
                raise bad_request("suffix is not supported", param="suffix")
            if req.best_of is not None and req.best_of != req.n:
                raise bad_request("best_of must equal n when given", param="best_of")
            if req.echo and req.logprobs is not None:
                raise bad_request("echo together with logprobs is not supported", param="echo")
            raw = req.prompt
            if isinstance(raw, str):
                raw_list: list[Any] = [raw]
            elif raw and isinstance(raw[0], int):
                raw_list = [raw]
            else:
                raw_list = list(raw)
            prompts = []
            for item in raw_list:
                if isinstance(item, str):
                    if not item:
                        raise bad_request("prompt must not be empty", param="prompt")
                    ids = await self._encode(item, True)
                    texts.append(item)
                else:
                    ids = list(item)
                    self._check_token_ids(ids, "prompt")
                    texts.append(self._tokenizer().decode(ids, skip_special_tokens=False) if req.echo else "")
                prompts.append(ids)
            logprobs = req.logprobs
            limits = [self._check_length(len(ids), req.max_tokens, "max_tokens", "prompt") for ids in prompts]
        params = [self._sampling_params(req, limit, logprobs) for limit in limits]
        return request_id, prompts, params, texts

    async def create_completion(self, request: web.Request) -> web.StreamResponse:
        req = await self._parse(request, p.CompletionRequest)
        request_id, prompts, params, texts = await self._generation_request(request, req, "cmpl")
        trace = _Trace(prompt_tokens=sum(len(x) for x in prompts))
        request["trace"] = trace
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        caller = request.get("caller", ANONYMOUS)
        with self._admission(caller, ids, trace.prompt_tokens):
            try:
                streams = self._start(ids, prompts, params, req.priority)
                created = int(time.time())
                n = req.n
                if req.stream:
                    include_usage = bool(req.stream_options and req.stream_options.include_usage)
                    chunks = self._completion_chunks(
                        request_id,
                        created,
                        ids,
                        streams,
                        n,
                        trace,
                        texts if req.echo else None,
                        include_usage,
                        req.logprobs is not None,
                    )
                    return await self._sse(request, chunks)
                choices = [_Choice() for _ in range(len(prompts) * n)]
                async with contextlib.aclosing(self._deltas(ids, streams, n, trace)) as deltas:
                    async for index, delta in deltas:
                        choices[index].add(delta)
            finally:
                self.rate_limiter.charge(caller, trace.completion_tokens)
        out = []
        for index, c in enumerate(choices):
            prefix = texts[index // n] if req.echo else ""
            logprobs = (
                p.CompletionLogprobs(**self._completion_logprobs(c.logprobs, len(prefix)))
                if req.logprobs is not None
                else None
            )
            out.append(
                p.CompletionChoice(
                    index=index,
                    text=prefix + "".join(c.text),
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
            )
        usage = p.UsageInfo(
            prompt_tokens=trace.prompt_tokens,
            completion_tokens=trace.completion_tokens,
            total_tokens=trace.prompt_tokens + trace.completion_tokens,
        )
        return _json(
            p.CompletionResponse(id=request_id, created=created, model=self.model_name, choices=out, usage=usage)
        )

    async def _completion_chunks(
        self,
        request_id: str,
        created: int,
        ids: list[str],
        streams: list[AsyncIterator[RequestOutput]],
        n: int,
        trace: _Trace,
        echo: list[str] | None,
        include_usage: bool,
        logprobs: bool,
    ) -> AsyncGenerator[dict[str, Any], None]:
        base = {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name}
        extra = {"usage": None} if include_usage else {}
        offsets = [0] * (len(ids) * n)
        if echo is not None:
            for index in range(len(ids) * n):
                offsets[index] = len(echo[index // n])
                choice = {"index": index, "text": echo[index // n], "logprobs": None, "finish_reason": None}
                yield {**base, "choices": [choice], **extra}
        async with contextlib.aclosing(self._deltas(ids, streams, n, trace)) as deltas:
            async for index, delta in deltas:
                reason = _reason(delta)
                lp = None
                if logprobs and delta.logprobs:
                    lp = self._completion_logprobs(delta.logprobs, offsets[index])
                offsets[index] += len(delta.text)
                if not delta.text and lp is None and reason is None:
                    continue
                choice = {"index": index, "text": delta.text, "logprobs": lp, "finish_reason": reason}
                if reason is not None:
                    choice["stop_reason"] = delta.stop_reason
                yield {**base, "choices": [choice], **extra}
        if include_usage:
            yield {**base, "choices": [], "usage": self._usage(trace)}

    def _usage(self, trace: _Trace) -> dict[str, int]:
        return {
            "prompt_tokens": trace.prompt_tokens,
            "completion_tokens": trace.completion_tokens,
            "total_tokens": trace.prompt_tokens + trace.completion_tokens,
        }

    async def create_chat_completion(self, request: web.Request) -> web.StreamResponse:
        req = await self._parse(request, p.ChatCompletionRequest)
        request_id, prompts, params, _ = await self._generation_request(request, req, "chatcmpl")
        trace = _Trace(prompt_tokens=len(prompts[0]))
        request["trace"] = trace
        caller = request.get("caller", ANONYMOUS)
        with self._admission(caller, [request_id], trace.prompt_tokens):
            try:
                streams = self._start([request_id], prompts, params, req.priority)
                created = int(time.time())
                if req.stream:
                    include_usage = bool(req.stream_options and req.stream_options.include_usage)
                    chunks = self._chat_chunks(request_id, created, streams, req.n, trace, include_usage)
                    return await self._sse(request, chunks)
                choices = [_Choice() for _ in range(req.n)]
                async with contextlib.aclosing(self._deltas([request_id], streams, req.n, trace)) as deltas:
                    async for index, delta in deltas:
                        choices[index].add(delta)
            finally:
                self.rate_limiter.charge(caller, trace.completion_tokens)
        out = [
            p.ChatCompletionChoice(
                index=index,
                message=p.ChatResponseMessage(content="".join(c.text)),
                logprobs=p.ChatChoiceLogprobs(**self._chat_logprobs(c.logprobs)) if req.logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for index, c in enumerate(choices)
        ]
        return _json(
            p.ChatCompletionResponse(
                id=request_id,
                created=created,
                model=self.model_name,
                choices=out,
                usage=p.UsageInfo(**self._usage(trace)),
            )
        )

    async def _chat_chunks(
        self,
        request_id: str,
        created: int,
        streams: list[AsyncIterator[RequestOutput]],
        n: int,
        trace: _Trace,
        include_usage: bool,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """OpenAI's chat chunk sequence: a role chunk per choice, content deltas, a finish chunk per choice."""
        base = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        extra = {"usage": None} if include_usage else {}
        for index in range(n):
            choice = {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            yield {**base, "choices": [choice], **extra}
        async with contextlib.aclosing(self._deltas([request_id], streams, n, trace)) as deltas:
            async for index, delta in deltas:
                lp = self._chat_logprobs(delta.logprobs) if delta.logprobs else None
                if delta.text or lp is not None:
                    choice = {"index": index, "delta": {"content": delta.text}, "logprobs": lp, "finish_reason": None}
                    yield {**base, "choices": [choice], **extra}
                reason = _reason(delta)
                if reason is not None:
                    choice = {
                        "index": index,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": reason,
                        "stop_reason": delta.stop_reason,
                    }
                    yield {**base, "choices": [choice], **extra}
        if include_usage:
            yield {**base, "choices": [], "usage": self._usage(trace)}

    async def _sse(self, request: web.Request, chunks: AsyncGenerator[dict[str, Any], None]) -> web.StreamResponse:
        """Server-Sent Events in OpenAI's framing: ``data: {json}\\n\\n`` per chunk, then ``data: [DONE]\\n\\n``."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        try:
            async with contextlib.aclosing(chunks) as stream:
                try:
                    async for chunk in stream:
                        await response.write(b"data: " + _dumps(chunk) + b"\n\n")
                except APIError as exc:
                    await response.write(b"data: " + _dumps(exc.to_dict()) + b"\n\n")
                except ValueError as exc:  # the engine refusing the request lazily
                    await response.write(b"data: " + _dumps(bad_request(str(exc)).to_dict()) + b"\n\n")
                except (ConnectionError, asyncio.CancelledError):
                    raise
                except Exception:  # headers are sent: the error can only travel in-band
                    log.exception("stream %s failed", request.get("request_id"))
                    error = APIError(500, "internal server error", code="internal_error")
                    await response.write(b"data: " + _dumps(error.to_dict()) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away mid-stream; closing the chunk generator aborted its requests
        return response

    # ----- WebSocket -----------------------------------------------------------------------------------

    async def chat_websocket(self, request: web.Request) -> web.WebSocketResponse:
        """Bidirectional streaming chat over one WebSocket; any generation can be cancelled mid-way.

        Client to server: ``{"type": "create", "id": "<id>", "request": {<chat completion request>}}`` and
        ``{"type": "cancel", "id": "<id>"}``. Server to client: ``{"type": "chunk", "id", "chunk"}`` (the same
        chunks as SSE), then ``{"type": "done", "id", "usage", "finish_reasons"}``, or
        ``{"type": "cancelled", "id", "usage"}`` after a cancel, or ``{"type": "error", "id", "status",
        "error"}``. Several generations may run at once on one socket.
        """
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=self.settings.max_body_bytes)
        await ws.prepare(request)
        send_lock = asyncio.Lock()
        tasks: dict[str, asyncio.Task[None]] = {}
        caller = request.get("caller", ANONYMOUS)

        async def send(message: dict[str, Any]) -> None:
            async with send_lock:
                if not ws.closed:
                    await ws.send_str(_dumps(message).decode())

        async def send_error(gen_id: str | None, exc: APIError) -> None:
            await send({"type": "error", "id": gen_id, "status": exc.status, **exc.to_dict()})

        async def generate(gen_id: str, body: Any) -> None:
            trace = _Trace()
            cancelled = False
            try:
                await stream_one(gen_id, body, trace)
            except asyncio.CancelledError:
                cancelled = True  # a cancel message (or the socket closing): the stream's abort already ran
            except APIError as exc:
                await send_error(gen_id, exc)
            except ConnectionError:
                pass
            except Exception:
                log.exception("websocket generation %s failed", gen_id)
                await send_error(gen_id, APIError(500, "internal server error", code="internal_error"))
            finally:
                tasks.pop(gen_id, None)
                self._log_ws(request, gen_id, trace, cancelled)
            if cancelled:
                await send({"type": "cancelled", "id": gen_id, "usage": self._usage(trace)})

        async def stream_one(gen_id: str, body: Any, trace: _Trace) -> None:
            if not isinstance(body, dict):
                raise APIError(422, "'request' must be a JSON object", param="request")
            try:
                req = p.ChatCompletionRequest.model_validate(body)
            except ValidationError as exc:
                raise from_validation_error(exc) from None
            request_id, prompts, params, _ = await self._generation_request(request, req, "chatcmpl")
            trace.prompt_tokens = len(prompts[0])
            with self._admission(caller, [request_id], trace.prompt_tokens):
                try:
                    streams = self._start([request_id], prompts, params, req.priority)
                    chunks = self._chat_chunks(request_id, int(time.time()), streams, req.n, trace, False)
                    async with contextlib.aclosing(chunks) as stream:
                        async for chunk in stream:
                            await send({"type": "chunk", "id": gen_id, "chunk": chunk})
                finally:
                    self.rate_limiter.charge(caller, trace.completion_tokens)
            await send(
                {"type": "done", "id": gen_id, "usage": self._usage(trace), "finish_reasons": trace.finish_reasons}
            )

        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    if msg.type == WSMsgType.BINARY:
                        await send_error(None, APIError(400, "send JSON text messages", code="invalid_message"))
                    continue
                try:
                    message = json.loads(msg.data, parse_constant=_reject_constant)
                except (ValueError, RecursionError):
                    await send_error(None, APIError(400, "message is not valid JSON", code="invalid_json"))
                    continue
                if not isinstance(message, dict):
                    await send_error(None, APIError(422, "message must be a JSON object", code="invalid_message"))
                    continue
                gen_id = message.get("id")
                kind = message.get("type")
                if not isinstance(gen_id, str) or not gen_id or len(gen_id) > 256:
                    await send_error(None, APIError(422, "'id' must be a non-empty string", param="id"))
                    continue
                if kind == "create":
                    if gen_id in tasks:
                        await send_error(
                            gen_id, APIError(400, f"a generation with id '{gen_id}' is running", param="id")
                        )
                    elif self.draining:
                        await send_error(gen_id, APIError(503, "the server is shutting down", code="draining"))
                    else:
                        tasks[gen_id] = asyncio.create_task(generate(gen_id, message.get("request")))
                elif kind == "cancel":
                    task = tasks.get(gen_id)
                    if task is not None:
                        task.cancel()
                else:
                    await send_error(gen_id, APIError(422, "'type' must be 'create' or 'cancel'", param="type"))
        finally:
            for task in list(tasks.values()):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks.values(), return_exceptions=True)
        return ws

    def _log_ws(self, request: web.Request, gen_id: str, trace: _Trace, cancelled: bool) -> None:
        if request_log.isEnabledFor(logging.INFO):
            line = {
                "request_id": gen_id,
                "method": "WS",
                "path": request.path,
                "status": 499 if cancelled else 200,
                "duration_s": round(time.monotonic() - trace.arrival, 4),
                "caller": request.get("caller", ANONYMOUS),
                **trace.to_log(),
            }
            request_log.info(json.dumps(line))


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), status=status, content_type="application/json")
