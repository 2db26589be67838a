"""POST /v1/chat/completions: chat messages ─▶ one engine request ─▶ a ChatCompletion or its chunk stream.

The chunk sequence is OpenAI's: a role chunk per choice, content deltas, one finish chunk per choice (empty
delta), then a usage chunk when ``stream_options.include_usage``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kubellm.apikeys import ANONYMOUS

from ..outputs import RequestOutput
from ..reasoning import get_reasoning_parser
from ..sampling_params import SamplingParams
from ..tool_parsers import get_tool_parser, template_supports_tools
from . import protocol as p
from .chat_output import ChoiceOutput, merge
from .errors import APIError, bad_request
from .serving import ServingContext, new_request_id
from .sse import write_sse
from .streams import Choice, StreamUsage, Trace, finish_reason
from .structured import constraint_of
from .tools import ToolPlan, new_parser, plan_tools, template_messages

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
    tools: ToolPlan = field(default_factory=ToolPlan)


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def render(
        self,
        messages: list[p.ChatMessage],
        add_generation_prompt: bool,
        kwargs: dict[str, Any] | None,
        tools: ToolPlan | None = None,
    ) -> str:
        tokenizer = self.ctx.tokenizer()
        native = template_supports_tools(tokenizer.chat_template)
        plain, template_tools = template_messages(messages, tools or ToolPlan(), native)
        try:
            return tokenizer.apply_chat_template(
                plain, add_generation_prompt=add_generation_prompt, tools=template_tools, **(kwargs or {})
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
        unsupported = req.unsupported_field()
        if unsupported is not None:
            raise bad_request(f"{unsupported} is not supported by this server", param=unsupported)
        tools = plan_tools(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
        if req.prompt_logprobs is not None and req.stream:
            raise bad_request("prompt_logprobs is not available when stream is true", param="prompt_logprobs")
        text = self.render(req.messages, req.add_generation_prompt, req.chat_template_kwargs, tools)
        prompt = await ctx.encode(text, False)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        limit = ctx.check_length(len(prompt), max_tokens, param, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        constraint = constraint_of(req)
        if tools.constraint is not None:
            if constraint is not None:
                raise bad_request(
                    f"{constraint.param} cannot be combined with tool_choice '{tools.mode}'", param=constraint.param
                )
            constraint = tools.constraint
        params = ctx.sampling_params(req, limit, logprobs, constraint, req.prompt_logprobs)
        parser_name = ctx.settings.tool_call_parser
        template = ctx.tokenizer().chat_template
        if (
            tools.mode == "auto"
            and parser_name is not None
            and get_tool_parser(parser_name, template).needs_special_tokens
        ):
            params.skip_special_tokens = False  # the parser reads [TOOL_CALLS] / <|python_tag|>
        return ChatPlan(request_id, req, prompt, params, await ctx.compile(constraint), tools)

    def start(self, plan: ChatPlan) -> list[AsyncIterator[RequestOutput]]:
        reasoning_end = None
        name = self.ctx.settings.reasoning_parser
        if plan.grammar is not None and name is not None:
            reasoning_end = get_reasoning_parser(name)(self.ctx.tokenizer()).is_reasoning_end
        return self.ctx.start(
            [plan.request_id], [plan.prompt], [plan.params], plan.req.priority, plan.grammar, reasoning_end
        )

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
                chunks = self.chunks(plan, created, streams, trace, StreamUsage.of(req.stream_options))
                return await write_sse(request, chunks)
            choices = [Choice() for _ in range(req.n)]
            async with contextlib.aclosing(self.ctx.generate([plan.request_id], streams, req.n, trace)) as deltas:
                async for index, delta in deltas:
                    choices[index].add(delta)
        response = self.response(plan, created, choices, trace)
        return web.Response(body=response.model_dump_json().encode(), content_type="application/json")

    def response(self, plan: ChatPlan, created: int, choices: list[Choice], trace: Trace) -> p.ChatCompletionResponse:
        out = []
        for index, c in enumerate(choices):
            machine = self.choice_output(plan)
            first = machine.feed("".join(c.text))
            last, reason = machine.finish(c.finish_reason)
            message = merge([d for d in (first, last) if d is not None])
            assert isinstance(message, p.ChatResponseMessage)
            if message.content is None and not message.tool_calls and not message.reasoning_content:
                message.content = ""
            out.append(
                p.ChatCompletionChoice(
                    index=index,
                    message=message,
                    logprobs=self.ctx.chat_logprobs(c.logprobs) if plan.req.logprobs else None,
                    finish_reason=reason,
                    stop_reason=c.stop_reason,
                )
            )
        return p.ChatCompletionResponse(
            id=plan.request_id,
            created=created,
            model=self.ctx.model_name,
            choices=out,
            usage=trace.usage(),
            prompt_logprobs=self.ctx.prompt_logprobs(plan.prompt, trace.prompt_logprobs.get(0)),
        )

    def choice_output(self, plan: ChatPlan) -> ChoiceOutput:
        """The text-to-message machine of one choice: reasoning, then tool calls, then content."""
        settings = self.ctx.settings
        tokenizer = self.ctx.tokenizer()
        reasoning = None
        if settings.reasoning_parser is not None:
            reasoning = get_reasoning_parser(settings.reasoning_parser)(tokenizer)
        parser = new_parser(plan.tools, settings.tool_call_parser, tokenizer.chat_template)
        return ChoiceOutput(plan.tools, parser, reasoning)

    async def chunks(
        self,
        plan: ChatPlan,
        created: int,
        streams: list[AsyncIterator[RequestOutput]],
        trace: Trace,
        usage: StreamUsage,
    ) -> AsyncGenerator[p.ChatCompletionChunk, None]:
        """OpenAI's chat chunk sequence: a role chunk per choice, content deltas, a finish chunk per choice."""
        n = plan.req.n

        def chunk(choices: list[p.ChatCompletionStreamChoice]) -> p.ChatCompletionChunk:
            c = p.ChatCompletionChunk(
                id=plan.request_id,
                object="chat.completion.chunk",
                created=created,
                model=self.ctx.model_name,
                choices=choices,
            )
            usage.stamp(c, trace)
            return c

        for index in range(n):
            delta = p.DeltaMessage(role="assistant", content="")
            yield chunk([p.ChatCompletionStreamChoice(index=index, delta=delta, logprobs=None, finish_reason=None)])
        machines = [self.choice_output(plan) for _ in range(n)]
        async with contextlib.aclosing(self.ctx.generate([plan.request_id], streams, n, trace)) as deltas:
            async for index, out in deltas:
                lp = self.ctx.chat_logprobs(out.logprobs) if out.logprobs else None
                fed = machines[index].feed(out.text)
                if fed is None and lp is not None:
                    fed = p.DeltaMessage(content="")  # logprobs of tokens whose text is held back
                if fed is not None:
                    choice = p.ChatCompletionStreamChoice(index=index, delta=fed, logprobs=lp, finish_reason=None)
                    yield chunk([choice])
                if out.finish_reason is not None:
                    rest, reason = machines[index].finish(finish_reason(out))
                    if rest is not None:
                        choice = p.ChatCompletionStreamChoice(
                            index=index, delta=rest, logprobs=None, finish_reason=None
                        )
                        yield chunk([choice])
                    choice = p.ChatCompletionStreamChoice(
                        index=index, delta=p.DeltaMessage(), logprobs=None, finish_reason=reason,
                        stop_reason=out.stop_reason,
                    )  # fmt: skip
                    yield chunk([choice])
        if usage.include:
            yield chunk([])
