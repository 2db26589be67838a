"""POST /v1/completions: one engine request per prompt (a batch of prompts is several) ─▶ a Completion or its
chunk stream. Choice ``j`` of prompt ``i`` is choice index ``i * n + j``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kubellm.apikeys import ANONYMOUS

from ..outputs import RequestOutput, TokenLogprob
from ..sampling_params import SamplingParams
from . import protocol as p
from .errors import bad_request
from .serving import ServingContext, new_request_id
from .sse import write_sse
from .streams import Choice, StreamUsage, Trace, finish_reason
from .structured import constraint_of

if TYPE_CHECKING:
    from ..structured_outputs import CompiledGrammar


@dataclass
class CompletionPlan:
    """A validated completion request, ready for the engine: one engine request per prompt."""

    request_id: str
    req: p.CompletionRequest
    engine_ids: list[str]
    prompts: list[list[int]]
    texts: list[str]  # each prompt's text, for echo ("" for token prompts without echo)
    params: list[SamplingParams]
    grammar: CompiledGrammar | None = None  # the same for every prompt


class CompletionServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def plan(self, req: p.CompletionRequest) -> CompletionPlan:
        ctx = self.ctx
        ctx.check_model(req.model)
        request_id = new_request_id("cmpl")
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of must equal n when given", param="best_of")
        if req.prompt_logprobs is not None and req.stream:
            raise bad_request("prompt_logprobs is not available when stream is true", param="prompt_logprobs")
        # the prompt is scored for echo + logprobs (lm-evaluation-harness) and for vLLM's prompt_logprobs
        wanted = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
        prompt_logprobs = max(wanted) if wanted else None
        if req.max_tokens == 0:
            if prompt_logprobs is None:
                raise bad_request(
                    "max_tokens 0 scores the prompt only: it needs echo with logprobs, or prompt_logprobs",
                    param="max_tokens",
                )
            if req.n != 1:
                raise bad_request("n must be 1 when max_tokens is 0 (nothing is generated)", param="n")
        raw = req.prompt
        if isinstance(raw, str):
            raw_list: list[Any] = [raw]
        elif raw and isinstance(raw[0], int):
            raw_list = [raw]
        else:
            raw_list = list(raw)
        prompts: list[list[int]] = []
        texts: list[str] = []
        for item in raw_list:
            if isinstance(item, str):
                if not item:
                    raise bad_request("prompt must not be empty", param="prompt")
                ids = await ctx.encode(item, True)
                texts.append(item)
            else:
                ids = list(item)
                ctx.check_token_ids(ids, "prompt")
                texts.append(ctx.tokenizer().decode(ids, skip_special_tokens=False) if req.echo else "")
            prompts.append(ids)
        limits = [ctx.check_length(len(ids), req.max_tokens, "max_tokens", "prompt") for ids in prompts]
        constraint = constraint_of(req)
        params = [ctx.sampling_params(req, limit, req.logprobs, constraint, prompt_logprobs) for limit in limits]
        engine_ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        return CompletionPlan(request_id, req, engine_ids, prompts, texts, params, await ctx.compile(constraint))

    async def create(self, request: web.Request) -> web.StreamResponse:
        req = await self.ctx.parse(request, p.CompletionRequest)
        plan = await self.plan(req)
        request["request_id"] = plan.request_id
        trace = Trace(prompt_tokens=sum(len(x) for x in plan.prompts))
        request["trace"] = trace
        with self.ctx.admission.admit(request.get("caller", ANONYMOUS), plan.engine_ids, trace):
            streams = self.ctx.start(plan.engine_ids, plan.prompts, plan.params, req.priority, plan.grammar)
            created = int(time.time())
            if req.stream:
                chunks = self.chunks(plan, created, streams, trace, StreamUsage.of(req.stream_options))
                return await write_sse(request, chunks)
            choices = [Choice() for _ in range(len(plan.prompts) * req.n)]
            async with contextlib.aclosing(self.ctx.generate(plan.engine_ids, streams, req.n, trace)) as deltas:
                async for index, delta in deltas:
                    choices[index].add(delta)
        response = self.response(plan, created, choices, trace)
        return web.Response(body=response.model_dump_json().encode(), content_type="application/json")

    def response(self, plan: CompletionPlan, created: int, choices: list[Choice], trace: Trace) -> p.CompletionResponse:
        req = plan.req
        out = []
        for index, c in enumerate(choices):
            prompt = index // req.n
            prefix = plan.texts[prompt] if req.echo else ""
            logprobs = None
            if req.logprobs is not None:
                logprobs = self.ctx.completion_logprobs(c.logprobs, len(prefix), self.echoed(plan, prompt, trace))
            out.append(
                p.CompletionChoice(
                    index=index,
                    text=prefix + "".join(c.text),
                    logprobs=logprobs,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                    prompt_logprobs=self.ctx.prompt_logprobs(plan.prompts[prompt], trace.prompt_logprobs.get(prompt))
                    if req.prompt_logprobs is not None
                    else None,
                )
            )
        return p.CompletionResponse(
            id=plan.request_id, created=created, model=self.ctx.model_name, choices=out, usage=trace.usage()
        )

    @staticmethod
    def echoed(plan: CompletionPlan, prompt: int, trace: Trace) -> tuple[list[int], list[TokenLogprob | None]] | None:
        """With echo + logprobs: the prompt's token ids and logprobs, which its logprobs start with (None when the
        request ended before the engine scored its prompt)."""
        scored = trace.prompt_logprobs.get(prompt)
        if not plan.req.echo or scored is None:
            return None
        return plan.prompts[prompt], scored

    async def chunks(
        self,
        plan: CompletionPlan,
        created: int,
        streams: list[AsyncIterator[RequestOutput]],
        trace: Trace,
        usage: StreamUsage,
    ) -> AsyncGenerator[p.CompletionChunk, None]:
        req = plan.req
        n = req.n
        num_choices = len(plan.engine_ids) * n

        def chunk(choices: list[p.CompletionChoice]) -> p.CompletionChunk:
            c = p.CompletionChunk(
                id=plan.request_id,
                object="text_completion",
                created=created,
                model=self.ctx.model_name,
                choices=choices,
            )
            usage.stamp(c, trace)
            return c

        offsets = [0] * num_choices

        def echo(index: int) -> p.CompletionChunk:
            text = plan.texts[index // n]
            offsets[index] = len(text)
            lp = None
            if req.logprobs is not None:  # the prompt's logprobs: known once the engine has scored it
                lp = self.ctx.completion_logprobs([], 0, self.echoed(plan, index // n, trace))
            return chunk([p.CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=None)])

        unechoed = set(range(num_choices)) if req.echo else set()
        if req.logprobs is None:
            for index in sorted(unechoed):
                yield echo(index)
            unechoed.clear()
        async with contextlib.aclosing(self.ctx.generate(plan.engine_ids, streams, n, trace)) as deltas:
            async for index, out in deltas:
                if index in unechoed:
                    unechoed.discard(index)
                    yield echo(index)
                reason = finish_reason(out)
                lp = None
                if req.logprobs is not None and out.logprobs:
                    lp = self.ctx.completion_logprobs(out.logprobs, offsets[index])
                offsets[index] += len(out.text)
                if not out.text and lp is None and reason is None:
                    continue
                choice = p.CompletionChoice(index=index, text=out.text, logprobs=lp, finish_reason=reason)
                if reason is not None:
                    choice.stop_reason = out.stop_reason  # assigned: serialized on the finish chunk only
                yield chunk([choice])
        if usage.include:
            yield chunk([])
