"""POST /v1/chat/completions: chat messages ─▶ one engine request ─▶ a ChatCompletion or its chunk stream.

The chunk sequence is OpenAI's: a role chunk per choice, content deltas, one finish chunk per choice (empty
delta), then a usage chunk when ``stream_options.include_usage``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from . import protocol as p
from .auth import ANONYMOUS
from .errors import APIError, bad_request
from .serving import ServingContext, new_request_id
from .sse import write_sse
from .streams import Choice, Trace, finish_reason
from .structured import constraint_of

if TYPE_CHECKING:
    from ..structured_outputs import CompiledGrammar


@dataclass
class ChatPlan:
    """A validated chat request, ready for the engine."""

    request_id: str
    req: p.ChatCompletionRequest
    prompt: list[int]
    params: SamplingParams
    grammar: CompiledGrammar | None = None


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def render(self, messages: list[p.ChatMessage], add_generation_prompt: bool, kwargs: dict[str, Any] | None) -> str:
        plain: list[dict[str, Any]] = []
        for i, m in enumerate(messages):
            if isinstance(m.content, list) and any(not isinstance(part, p.TextContentPart) for part in m.content):
                raise bad_request("only text content parts are supported", param=f"messages.{i}.content")
            item: dict[str, Any] = {"role": m.role, "content": m.text()}
            if m.name:
                item["name"] = m.name
            plain.append(item)
        try:
            return self.ctx.tokenizer().apply_chat_template(
                plain, add_generation_prompt=add_generation_prompt, **(kwargs or {})
            )
        except APIError:
            raise
        except Exception as exc:  # a template that rejects these messages is the client's error
            raise bad_request(f"cannot apply the chat template to these messages: {exc}", param="messages") from None

    async def plan(self, req: p.ChatCompletionRequest) -> ChatPlan:
        """Check the request, render and tokenize its messages, build its sampling parameters."""
        ctx = self.ctx
        ctx.check_model(req.model)
        request_id = new_request_id("chatcmpl")
        if req.tools and req.tool_choice not in (None, "none"):
            raise bad_request("tool calling is not supported", param="tools")
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        text = self.render(req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        prompt = await ctx.encode(text, False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        limit = ctx.check_length(len(prompt), max_tokens, param, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        constraint = constraint_of(req)
        params = ctx.sampling_params(req, limit, logprobs, constraint)
        return ChatPlan(request_id, req, prompt, params, await ctx.compile(constraint))

    def start(self, plan: ChatPlan) -> list[AsyncIterator[RequestOutput]]:
        return self.ctx.start([plan.request_id], [plan.prompt], [plan.params], plan.req.priority, plan.grammar)

    async def create(self, request: web.Request) -> web.StreamResponse:
        req = await self.ctx.parse(request, p.ChatCompletionRequest)
        plan = await self.plan(req)
        request["request_id"] = plan.request_id
        trace = Trace(prompt_tokens=len(plan.prompt))
        request["trace"] = trace
        with self.ctx.admission.admit(request.get("caller", ANONYMOUS), [plan.request_id], trace):
            streams = self.start(plan)
            created = int(time.time())
            if req.stream:
                opts = req.stream_options
                include_usage = bool(opts and opts.include_usage)
                continuous = bool(opts and opts.include_usage and opts.continuous_usage_stats)
                chunks = self.chunks(plan, created, streams, trace, include_usage, continuous)
                return await write_sse(request, chunks)
            choices = [Choice() for _ in range(req.n)]
            async with contextlib.aclosing(self.ctx.generate([plan.request_id], streams, req.n, trace)) as deltas:
                async for index, delta in deltas:
                    choices[index].add(delta)
        response = self.response(plan, created, choices, trace)
        return web.Response(body=response.model_dump_json().encode(), content_type="application/json")

    def response(self, plan: ChatPlan, created: int, choices: list[Choice], trace: Trace) -> p.ChatCompletionResponse:
        out = [
            p.ChatCompletionChoice(
                index=index,
                message=p.ChatResponseMessage(content="".join(c.text)),
                logprobs=self.ctx.chat_logprobs(c.logprobs) if plan.req.logprobs else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for index, c in enumerate(choices)
        ]
        return p.ChatCompletionResponse(
            id=plan.request_id, created=created, model=self.ctx.model_name, choices=out, usage=trace.usage()
        )

    async def chunks(
        self,
        plan: ChatPlan,
        created: int,
        streams: list[AsyncIterator[RequestOutput]],
        trace: Trace,
        include_usage: bool,
        continuous_usage: bool = False,
    ) -> AsyncGenerator[p.ChatCompletionChunk, None]:
        """OpenAI's chat chunk sequence: a role chunk per choice, content deltas, a finish chunk per choice."""
        n = plan.req.n

        def chunk(
            choices: list[p.ChatCompletionStreamChoice], usage: p.UsageInfo | None = None
        ) -> p.ChatCompletionChunk:
            c = p.ChatCompletionChunk(
                id=plan.request_id,
                object="chat.completion.chunk",
                created=created,
                model=self.ctx.model_name,
                choices=choices,
            )
            if continuous_usage and choices:
                c.usage = trace.usage()  # vLLM's continuous_usage_stats: the counts so far, on every chunk
            elif include_usage:
                c.usage = usage  # assigned: serialized (null on all but the last chunk) only when asked for
            return c

        for index in range(n):
            delta = p.DeltaMessage(role="assistant", content="")
            yield chunk([p.ChatCompletionStreamChoice(index=index, delta=delta, logprobs=None, finish_reason=None)])
        async with contextlib.aclosing(self.ctx.generate([plan.request_id], streams, n, trace)) as deltas:
            async for index, out in deltas:
                lp = self.ctx.chat_logprobs(out.logprobs) if out.logprobs else None
                if out.text or lp is not None:
                    delta = p.DeltaMessage(content=out.text)
                    choice = p.ChatCompletionStreamChoice(index=index, delta=delta, logprobs=lp, finish_reason=None)
                    yield chunk([choice])
                reason = finish_reason(out)
                if reason is not None:
                    choice = p.ChatCompletionStreamChoice(
                        index=index, delta=p.DeltaMessage(), logprobs=None, finish_reason=reason,
                        stop_reason=out.stop_reason,
                    )  # fmt: skip
                    yield chunk([choice])
        if include_usage:
            yield chunk([], trace.usage())
