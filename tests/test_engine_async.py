"""AsyncLLMEngine: concurrent streams, cancellation frees pages, errors at submission, shutdown."""

import asyncio
import random

import pytest
import torch

from kimi_k2.config import K2Config
from kimi_k2.engine import AsyncLLMEngine, EngineConfig, LLMEngine, PromptTooLongError, SamplingParams
from kimi_k2.model import K2ForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny"), dtype=torch.float32).eval()


def make(model):
    return AsyncLLMEngine(LLMEngine(model, config=EngineConfig(page_size=4, num_pages=128, max_model_len=64)))


async def collect(agen):
    return [d async for d in agen]


def test_concurrent_streams_match_offline_generate(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in (3, 12, 25)]
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True, n=2)
    offline = LLMEngine(model, config=EngineConfig(page_size=4, num_pages=128, max_model_len=64)).generate(
        prompts, params)
    engine = make(model)

    async def main():
        return await asyncio.gather(*(collect(engine.generate(p, params)) for p in prompts))

    try:
        streams = asyncio.run(main())
    finally:
        engine.shutdown(drain=True)
    for deltas, ref in zip(streams, offline, strict=True):
        for i in range(2):
            mine = [d for d in deltas if d.index == i]
            assert [t for d in mine for t in d.token_ids] == ref[i].token_ids
            assert mine[-1].finished and mine[-1].finish_reason == "length"
            assert sum(d.finished for d in mine) == 1 and mine[-1].completion_tokens == 7
    stats = engine.stats()
    assert stats["pages_used"] == 0 and stats["running"] == 0 and stats["generation_tokens"] == 42


def test_closing_the_stream_aborts_and_frees_pages(model):
    engine = make(model)

    async def main():
        agen = engine.generate([5, 6, 7, 8, 9], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
        got = [await agen.__anext__() for _ in range(3)]
        await agen.aclose()
        return got

    async def cancelled():
        async def consume():
            async for _ in engine.generate([9, 8, 7], SamplingParams(max_tokens=50, ignore_eos=True)):
                await asyncio.sleep(0)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        got = asyncio.run(main())
        asyncio.run(cancelled())
        engine.shutdown(drain=True)  # returns only once the aborts were applied and nothing is left
    finally:
        engine.shutdown(drain=False)
    assert len(got) == 3 and not any(d.finished for d in got)
    assert engine.stats()["pages_used"] == 0 and not engine.engine.requests


def test_bad_request_raises_before_any_work(model):
    engine = make(model)

    async def main():
        with pytest.raises(PromptTooLongError):
            await collect(engine.generate(list(range(2, 80)), SamplingParams()))
        with pytest.raises(ValueError, match="max_tokens"):
            await collect(engine.generate([1, 2], SamplingParams(max_tokens=0)))

    asyncio.run(main())
    assert engine.thread is None and engine.stats()["prompt_tokens"] == 0
    assert engine.max_model_len == 64


def test_shutdown_without_drain_aborts(model):
    engine = make(model)

    async def main():
        agen = engine.generate([3, 4, 5], SamplingParams(max_tokens=60, ignore_eos=True))
        first = await agen.__anext__()
        await asyncio.to_thread(engine.shutdown, False)
        return first

    first = asyncio.run(main())
    assert not first.finished
    assert engine.stats()["pages_used"] == 0 and engine.thread is None
