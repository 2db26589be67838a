"""LLM: offline batch generation, the simplest driver of the engine's step loop.

llm = LLM("builtin:smollm2-135m-instruct")
outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .config import EngineConfig
from .engine.llm_engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Messages = list[dict[str, Any]]


def merge_delta(into: RequestOutput, delta: RequestOutput) -> None:
    """Fold a delta into a cumulative output (choices by index)."""
    by_index = {c.index: c for c in into.outputs}
    for choice in delta.outputs:
        mine = by_index.get(choice.index)
        if mine is None:
            mine = type(choice)(choice.index, "", [], [] if choice.logprobs is not None else None)
            into.outputs.append(mine)
            by_index[choice.index] = mine
        mine.text += choice.text
        mine.token_ids = [*mine.token_ids, *choice.token_ids]
        if choice.logprobs is not None:
            mine.logprobs = [*(mine.logprobs or []), *choice.logprobs]
        mine.finish_reason = choice.finish_reason or mine.finish_reason
        mine.stop_reason = choice.stop_reason if choice.stop_reason is not None else mine.stop_reason
    into.outputs.sort(key=lambda c: c.index)
    if delta.prompt_logprobs is not None:
        into.prompt_logprobs = delta.prompt_logprobs
    into.finished = delta.finished
    into.metrics = delta.metrics


class LLM:
    def __init__(self, model: str = EngineConfig.model, **engine_config: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_config))
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]] | list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        on_delta: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; cumulative outputs in input order. ``on_delta`` sees each delta."""
        prompt_list: list[str | list[int]]
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompt_list = [prompts]
        else:
            prompt_list = list(prompts)  # type: ignore[arg-type]
        if isinstance(params, list):
            if len(params) != len(prompt_list):
                raise ValueError(f"params has {len(params)} entries for {len(prompt_list)} prompts")
            params_list = params
        else:
            params_list = [params or SamplingParams()] * len(prompt_list)
        engine = self.engine
        ids = []
        results: dict[str, RequestOutput] = {}
        try:
            for prompt, p in zip(prompt_list, params_list, strict=True):
                request_id = f"llm-{self._next_id}"
                self._next_id += 1
                request = engine.add_request(request_id, prompt, p)
                ids.append(request_id)
                results[request_id] = RequestOutput(request_id, request.prompt_token_ids, [], False, request.metrics)
            while engine.has_unfinished_requests():
                for delta in engine.step():
                    merge_delta(results[delta.request_id], delta)
                    if on_delta is not None:
                        on_delta(delta)
        finally:
            for request_id in ids:
                engine.abort_request(request_id)  # no-op for finished ones; frees blocks after an error
        return [results[i] for i in ids]

    def chat(
        self,
        messages: Messages | list[Messages],
        params: SamplingParams | list[SamplingParams] | None = None,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        conversations: list[Messages] = (
            [messages] if messages and isinstance(messages[0], dict) else messages  # type: ignore[assignment]
        )
        prompts = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, **template_kwargs)
            prompts.append(self.tokenizer.encode(text, add_special_tokens=False))
        return self.generate(prompts, params)
