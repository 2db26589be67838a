"""AsyncEngine: streamed deltas add up to the offline result, the event loop stays free, aborts free blocks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.engine.async_engine import AsyncEngine
from kubellm.runtime.engine.llm_engine import LLMEngine
from kubellm.runtime.models.loader import LoadedModel
from kubellm.runtime.outputs import FinishReason, RequestOutput
from kubellm.runtime.sampling_params import SamplingParams


@pytest.fixture
async def engine(smollm2: LoadedModel) -> AsyncIterator[AsyncEngine]:
    config = EngineConfig(model=smollm2.name, dtype="float32", device="cpu", kv_cache_memory_bytes=32 << 20)
    eng = AsyncEngine(config, loaded=smollm2)
    await eng.start()
    yield eng
    await eng.shutdown()


async def wait_until(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.01)


async def collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    return [delta async for delta in stream]


async def test_stream_deltas_add_up_and_the_loop_stays_free(engine: AsyncEngine) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    tick_task = asyncio.create_task(ticker())
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["The weather today is", "My favourite food is"]
    streams = [engine.add_request(f"s{i}", p, params) for i, p in enumerate(prompts)]
    results = await asyncio.gather(*(collect(s) for s in streams))
    tick_task.cancel()
    assert ticks > 10  # the event loop ran while the model worked

    sync = engine.engine  # same weights: compare with a plain offline run afterwards
    for deltas in results:
        assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])
        assert deltas[-1].outputs[0].finish_reason is FinishReason.LENGTH
        assert sum(len(d.outputs[0].token_ids) for d in deltas if d.outputs) == 12
    texts = ["".join(c.text for d in deltas for c in d.outputs) for deltas in results]
    tokens = [[t for d in deltas for c in d.outputs for t in c.token_ids] for deltas in results]
    assert sync.tokenizer is not None
    for text, toks in zip(texts, tokens, strict=True):
        assert text == sync.tokenizer.decode(toks)
    await wait_until(lambda: engine.stats().num_requests_running == 0)
    sync.block_manager.check_all_free()


async def test_closing_the_stream_aborts_the_request(engine: AsyncEngine) -> None:
    stream = engine.add_request("c", "Count from one to a hundred:", SamplingParams(max_tokens=200, ignore_eos=True))
    first = await stream.__anext__()
    assert not first.finished
    assert engine.stats().kv_cache_usage > 0
    await stream.aclose()
    await wait_until(lambda: engine.stats().kv_cache_usage == 0 and engine.stats().num_requests_running == 0)


async def test_abort_from_outside_ends_the_stream(engine: AsyncEngine) -> None:
    stream = engine.add_request("x", "Tell me everything about", SamplingParams(max_tokens=200, ignore_eos=True))
    await stream.__anext__()
    engine.abort("x")
    engine.abort("x")  # idempotent
    rest = await asyncio.wait_for(collect(stream), 60)
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason is FinishReason.ABORT


async def test_bad_prompts_raise_at_once(engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("e", [], SamplingParams())
    too_long = list(range(engine.max_model_len + 1))
    with pytest.raises(ValueError, match=f"max_model_len is {engine.max_model_len}"):
        engine.add_request("l", too_long, SamplingParams())
    assert engine.model_name == "smollm2-135m-instruct"


async def test_shutdown_aborts_running_requests(smollm2: LoadedModel) -> None:
    config = EngineConfig(model=smollm2.name, dtype="float32", device="cpu", kv_cache_memory_bytes=32 << 20)
    eng = AsyncEngine(config, loaded=smollm2)
    await eng.start()
    stream = eng.add_request("s", "Once upon a time", SamplingParams(max_tokens=500, ignore_eos=True))
    await stream.__anext__()
    await eng.shutdown()
    rest = await asyncio.wait_for(collect(stream), 60)
    assert rest[-1].outputs[0].finish_reason is FinishReason.ABORT
    assert not eng.is_running


async def test_one_thread_loads_and_steps(smollm2: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is built in the thread that later steps it (one OpenMP team: see async_engine's docstring)."""
    threads: dict[str, set[int]] = {"init": set(), "step": set()}
    real_init, real_step = LLMEngine.__init__, LLMEngine.step

    def init(self: LLMEngine, *args: object, **kwargs: object) -> None:
        threads["init"].add(threading.get_ident())
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]

    def step(self: LLMEngine) -> list[RequestOutput]:
        threads["step"].add(threading.get_ident())
        return real_step(self)

    monkeypatch.setattr(LLMEngine, "__init__", init)
    monkeypatch.setattr(LLMEngine, "step", step)
    config = EngineConfig(model=smollm2.name, dtype="float32", device="cpu", kv_cache_memory_bytes=32 << 20)
    eng = AsyncEngine(config, loaded=smollm2)
    await eng.start()
    outputs = await asyncio.wait_for(collect(eng.add_request("t", "Hi", SamplingParams(max_tokens=3))), 60)
    await eng.shutdown()
    assert outputs[-1].finished
    assert len(threads["init"]) == 1 and threads["init"] == threads["step"]
    assert threading.get_ident() not in threads["init"]


async def test_a_failed_load_raises_from_the_constructor(smollm2: LoadedModel) -> None:
    config = EngineConfig(model=smollm2.name, dtype="float32", device="cpu", max_model_len=1 << 20)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        AsyncEngine(config, loaded=smollm2)
