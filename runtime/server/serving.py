"""What chat and completion serving share: the engine handle, request checks, tokenization, sampling
parameters, handing prompts to the engine and reading their deltas back (the one fan-in), logprob rendering.

    ServingContext
      parse_body ─▶ check_model ─▶ encode ─▶ check_length ─▶ sampling_params
      ─▶ (Admission.admit) ─▶ start: engine.add_request per prompt ─▶ generate: (choice index, delta) pairs
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from kubellm.ratelimit import RateLimiter

from ..outputs import CompletionOutput, EngineStats, RequestOutput, TokenLogprob
from ..sampling_params import SamplingParams
from ..structured_outputs import GrammarError
from . import protocol as p
from .admission import Admission
from .errors import APIError, bad_request
from .metrics import ServerMetrics
from .settings import ServerSettings
from .streams import Trace, finish_reason, merge, refusals_as_400
from .structured import Constraint

if TYPE_CHECKING:
    from ..engine.async_engine import AsyncEngine
    from ..structured_outputs import CompiledGrammar

log = logging.getLogger("kubellm.server")

ModelT = TypeVar("ModelT", bound=BaseModel)


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): json.loads pairs them, but a lone one stays in the str, and
# no tokenizer (nor UTF-8) can take it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def check_unicode(raw: bytes | str, data: Any) -> None:
    """400 naming the field when a string of the parsed body holds an unpaired surrogate (only searched for when
    the raw body has a surrogate escape at all, so ordinary bodies cost one regex scan)."""
    if _SURROGATE_ESCAPE.search(raw.encode() if isinstance(raw, str) else raw) is None:
        return
    path = _unpaired_surrogate(data, ())
    if path is not None:
        param = ".".join(str(p) for p in path) or None
        raise APIError(
            400,
            f"{param or 'request body'}: an unpaired UTF-16 surrogate escape is not a character",
            param=param,
            code="invalid_unicode",
        )


def _unpaired_surrogate(value: Any, path: tuple[str | int, ...]) -> tuple[str | int, ...] | None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items: Any = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and _unpaired_surrogate(key, path) is not None:
            return (*path, key)
        found = _unpaired_surrogate(item, (*path, key))
        if found is not None:
            return found
    return None


async def parse_body(request: web.Request, model: type[ModelT], limit: int) -> ModelT:
    """The JSON body as ``model``: 413 over ``limit`` bytes, 400 for bad JSON, 422 for a non-object."""
    if request.content_length is not None and request.content_length > limit:
        raise APIError(
            413, f"request body is {request.content_length} bytes; the limit is {limit}", code="request_too_large"
        )
    body = await request.read()  # aiohttp enforces client_max_size on bodies without a length, too
    try:
        data = json.loads(body, parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(422, "request body must be a JSON object", code="invalid_body")
    check_unicode(body, data)
    try:
        return model.model_validate(data)
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_body") from None


def new_request_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


class ServingContext:
    """The state chat and completion serving share; one per server."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name
        self.engine: AsyncEngine | None = None
        self._token_str_cache: dict[int, str] = {}
        self.metrics = ServerMetrics(self.model_name, self.stats)
        self.rate_limiter = RateLimiter(settings.rate_limit_rpm, settings.rate_limit_tpm)
        self.admission = Admission(
            settings.max_queue_len, self.rate_limiter, self.metrics, lambda: self.get_engine().stats()
        )
        # grammar compiles run here: neither the event loop nor the engine's step loop waits on one
        self._grammar_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kubellm-grammar")

    def set_engine(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._token_str_cache.clear()

    # ----- the engine and its tokenizer ----------------------------------------------------------------

    def stats(self) -> EngineStats | None:
        return None if self.engine is None else self.engine.stats()

    def get_engine(self) -> AsyncEngine:
        if self.engine is None:
            raise APIError(503, "the model is still loading", code="loading", headers={"Retry-After": "5"})
        return self.engine

    def tokenizer(self) -> Any:
        tokenizer = self.get_engine().tokenizer
        if tokenizer is None:
            raise bad_request("this model has no tokenizer: send prompts as token ids", param="prompt")
        return tokenizer

    async def parse(self, request: web.Request, model: type[ModelT]) -> ModelT:
        return await parse_body(request, model, self.settings.max_body_bytes)

    # ----- checks --------------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
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

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab_size = self.tokenizer().vocab_size
        bad = next((t for t in ids if t >= vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is out of range: the vocabulary has {vocab_size} tokens", param)

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        tokenizer = self.tokenizer()
        if len(text) > 16384:  # long texts take a while: keep the event loop free for other requests
            return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)
        return tokenizer.encode(text, add_special_tokens)

    def check_length(self, prompt_len: int, max_tokens: int | None, param: str, prompt_param: str) -> int:
        """The max_tokens to use: the requested one, or what is left of the context. Too long is a 400."""
        max_model_len = self.get_engine().max_model_len
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

    def sampling_params(
        self,
        req: p.CompletionRequest | p.ChatCompletionRequest,
        max_tokens: int,
        logprobs: int | None,
        constraint: Constraint | None = None,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """The engine's parameters for ``req``; what the request omits comes from the model's
        generation_config.json (temperature, top_p, top_k, repetition_penalty), else the neutral value."""
        engine = self.get_engine()
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
        max_num_seqs = engine.config.max_num_seqs
        if req.n > max_num_seqs:
            raise bad_request(f"n is {req.n}, more than this server runs at once ({max_num_seqs})", param="n")
        defaults = self.generation_defaults()
        top_k = req.top_k if req.top_k is not None else int(defaults.get("top_k", 0))
        if top_k < 0 or top_k >= self.tokenizer().vocab_size:
            top_k = 0  # -1 is OpenAI-ecosystem spelling of "off"; k >= vocab is the same as off

        def pick(value: float | None, name: str, neutral: float) -> float:
            return value if value is not None else float(defaults.get(name, neutral))

        try:
            params = SamplingParams(
                n=req.n,
                temperature=pick(req.temperature, "temperature", 1.0),
                top_p=pick(req.top_p, "top_p", 1.0),
                top_k=top_k,
                min_p=req.min_p or 0.0,
                repetition_penalty=pick(req.repetition_penalty, "repetition_penalty", 1.0),
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
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=req.skip_special_tokens,
                logit_bias=dict(req.logit_bias) if req.logit_bias else None,  # type: ignore[arg-type]
                allowed_token_ids=list(req.allowed_token_ids) if req.allowed_token_ids is not None else None,
                bad_words=list(req.bad_words or []),
                structured_outputs=None if constraint is None else constraint.params,
            )
            params.verify_vocab(engine.vocab_size)
        except ValueError as exc:
            message = str(exc)
            raise bad_request(message, param=message.split(" ", 1)[0]) from None
        return params

    def generation_defaults(self) -> dict[str, float]:
        """The sampling defaults of the model's generation_config.json, for the fields a request omits."""
        config = getattr(self.get_engine(), "generation_config", None) or {}
        out: dict[str, float] = {}
        for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            value = config.get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out[name] = value
        if config.get("do_sample") is False:
            out["temperature"] = 0.0  # transformers' greedy default
        return out

    async def compile(self, constraint: Constraint | None) -> CompiledGrammar | None:
        """The request's grammar, compiled in the grammar pool; an invalid one is a 400 naming its field."""
        if constraint is None:
            return None
        engine = self.get_engine()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._grammar_pool, engine.compile_grammar, constraint.params)
        except GrammarError as exc:
            raise bad_request(exc.message, param=constraint.param, code="invalid_grammar") from None

    # ----- generation ----------------------------------------------------------------------------------

    def start(
        self,
        request_ids: list[str],
        prompts: list[list[int]],
        params: list[SamplingParams],
        priority: int = 0,
        grammar: CompiledGrammar | None = None,
        reasoning_end: Callable[[list[int], list[int]], bool] | None = None,
    ) -> list[AsyncIterator[RequestOutput]]:
        """Hand every prompt to the engine; a prompt the engine refuses is a 400 before any header is sent."""
        engine = self.get_engine()
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for request_id, prompt, sp in zip(request_ids, prompts, params, strict=True):
                stream = engine.add_request(
                    request_id, prompt, sp, priority=priority, grammar=grammar, reasoning_end=reasoning_end
                )
                streams.append(refusals_as_400(stream))
        except (ValueError, RuntimeError) as exc:
            for request_id in request_ids:
                engine.abort(request_id)
            if isinstance(exc, RuntimeError):  # the engine stopped after an error: nothing this request did
                log.error("engine refused a request: %s", exc)
                raise APIError(503, "the engine is unavailable", code="engine_unavailable") from None
            raise bad_request(str(exc), param="prompt") from None
        return streams

    async def generate(
        self, request_ids: list[str], streams: list[AsyncIterator[RequestOutput]], n: int, trace: Trace
    ) -> AsyncGenerator[tuple[int, CompletionOutput], None]:
        """(choice index, delta) pairs from all the request's engine streams, as they come.

        Choice ``j`` of prompt ``i`` is index ``i * n + j``. Whatever has not finished when this generator
        is closed (client gone, error, cancel) is aborted, which frees its KV blocks within one step.
        """
        engine = self.get_engine()
        unfinished = set(request_ids)
        try:
            async for i, out in merge(streams):
                self.observe(trace, out)
                trace.cached_tokens[out.request_id] = out.metrics.num_cached_tokens
                if out.prompt_logprobs is not None:
                    trace.prompt_logprobs[i] = out.prompt_logprobs
                for c in out.outputs:
                    yield i * n + c.index, c
                if out.finished:
                    unfinished.discard(request_ids[i])
        finally:
            for request_id in unfinished:
                engine.abort(request_id)
            if unfinished:
                trace.finish_reasons.append("abort")
                for _ in unfinished:
                    self.metrics.request_finished("abort")

    def observe(self, trace: Trace, out: RequestOutput) -> None:
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
            reason = finish_reason(c)
            if reason is not None:
                trace.finish_reasons.append(reason)
                self.metrics.request_finished(reason)
        if out.finished:
            self.metrics.e2e.observe(now - trace.arrival)

    # ----- logprobs ------------------------------------------------------------------------------------

    def token_str(self, token_id: int) -> str:
        s = self._token_str_cache.get(token_id)
        if s is None:
            s = self.tokenizer().decode([token_id], skip_special_tokens=False)
            self._token_str_cache[token_id] = s
        return s

    def chat_logprobs(self, logprobs: list[TokenLogprob]) -> p.ChatChoiceLogprobs:
        content = []
        for lp in logprobs:
            token = self.token_str(lp.token_id)
            top = [
                p.TopLogprob(token=(t := self.token_str(tid)), logprob=v, bytes=list(t.encode())) for tid, v in lp.top
            ]
            content.append(
                p.ChatTokenLogprob(token=token, logprob=lp.logprob, bytes=list(token.encode()), top_logprobs=top)
            )
        return p.ChatChoiceLogprobs(content=content, refusal=None)

    def completion_logprobs(
        self,
        logprobs: list[TokenLogprob],
        offset: int,
        prompt: tuple[list[int], list[TokenLogprob | None]] | None = None,
    ) -> p.CompletionLogprobs:
        """The legacy shape, the generated tokens' text offsets from ``offset``; with ``prompt`` (echo: its token ids
        and their logprobs), the prompt's tokens first, from offset 0, the first of them without a logprob (nothing
        before it scores it)."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []
        scored = [] if prompt is None else list(zip(*prompt, strict=True))
        at = 0
        for i, (token_id, lp) in enumerate([*scored, *((lp.token_id, lp) for lp in logprobs)]):
            token = self.token_str(token_id)
            if i == len(scored):
                at = offset
            tokens.append(token)
            text_offset.append(at)
            at += len(token)
            if lp is None:
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(lp.logprob)
            top = {self.token_str(tid): v for tid, v in lp.top}
            top.setdefault(token, lp.logprob)
            top_logprobs.append(top)
        # passed, not appended to defaults: stream chunks serialize only the fields that were set
        return p.CompletionLogprobs(
            tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs, text_offset=text_offset
        )

    def prompt_logprobs(
        self, prompt_ids: list[int], scored: list[TokenLogprob | None] | None
    ) -> list[dict[str, p.PromptLogprob] | None] | None:
        """vLLM's ``prompt_logprobs``: per prompt position {token id: logprob, rank, text} of the prompt token and
        its top alternatives (None for the first position)."""
        if scored is None:
            return None
        out: list[dict[str, p.PromptLogprob] | None] = []
        for token_id, lp in zip(prompt_ids, scored, strict=True):
            if lp is None:
                out.append(None)
                continue
            entry = {
                str(tid): p.PromptLogprob(logprob=v, rank=rank, decoded_token=self.token_str(tid))
                for rank, (tid, v) in enumerate(lp.top, start=1)
            }
            entry.setdefault(
                str(token_id), p.PromptLogprob(logprob=lp.logprob, rank=lp.rank, decoded_token=self.token_str(token_id))
            )
            out.append(entry)
        return out
