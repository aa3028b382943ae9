"""AsyncLLMEngine: concurrent streams, cancellation frees pages, errors at submission, shutdown, per-request
failures, deadlines and the bound on waiting requests."""

import asyncio
import random
import threading
import time

import pytest
import torch

from kimi_k2.config import K2Config
from kimi_k2.engine import AsyncLLMEngine, EngineConfig, LLMEngine, PromptTooLongError, SamplingParams
from kimi_k2.engine.async_engine import EngineOverloadedError, RequestFailedError, RequestTimeoutError
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


class Even:
    """A TokenConstraint: even token ids only; `fail_after` tokens later it allows none (a broken grammar)."""

    def __init__(self, fail_after: int | None = None, vocab: int = 1024):
        self.mask = torch.arange(vocab) % 2 == 0
        self.n = 0
        self.fail_after = fail_after

    def allowed(self):
        if self.fail_after is not None and self.n >= self.fail_after:
            return torch.zeros_like(self.mask)
        return self.mask

    def advance(self, token_id):
        self.n += 1

    def is_finished(self):
        return False


def test_a_failing_constraint_or_operation_fails_only_its_request(model):
    """A constraint that allows no token mid-batch, and one whose factory raises on the engine thread, fail only
    their own request: the others in the same batch finish, and the engine keeps serving."""
    engine = make(model)

    def broken_factory():
        raise RuntimeError("cannot build this constraint")

    async def main():
        ok = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        runs = [collect(engine.generate([5, 6, 7], ok)),
                collect(engine.generate([5, 6, 8], SamplingParams(max_tokens=12, ignore_eos=True,
                                                                  constraint=lambda: Even(fail_after=3)))),
                collect(engine.generate([5, 6, 9], SamplingParams(max_tokens=12, constraint=broken_factory))),
                collect(engine.generate([4, 6, 9], ok))]
        results = await asyncio.gather(*runs, return_exceptions=True)
        again = await collect(engine.generate([1, 2, 3], ok))
        return results, again

    try:
        (good, dead, broken, good2), again = asyncio.run(main())
    finally:
        engine.shutdown(drain=False)
    assert isinstance(dead, RequestFailedError) and "allows no token" in str(dead)
    assert isinstance(broken, RequestFailedError) and "cannot build this constraint" in str(broken)
    for deltas in (good, good2, again):
        assert deltas[-1].finish_reason == "length" and deltas[-1].completion_tokens == 12
    assert engine.stats()["pages_used"] == 0 and not engine.engine.requests


def test_deadline_aborts_and_frees_pages(model):
    engine = make(model)

    class Slow(Even):
        def allowed(self):
            time.sleep(0.02)
            return self.mask

    async def main():
        with pytest.raises(RequestTimeoutError, match="time limit after 0 generated"):
            await collect(engine.generate([3, 4], SamplingParams(max_tokens=5), deadline=time.monotonic()))
        got = []
        with pytest.raises(RequestTimeoutError) as e:
            async for d in engine.generate([3, 4], SamplingParams(max_tokens=60, ignore_eos=True, constraint=Slow),
                                           deadline=time.monotonic() + 0.3):
                got.append(d)
        return got, e.value

    try:
        got, err = asyncio.run(main())
        engine.shutdown(drain=True)
    finally:
        engine.shutdown(drain=False)
    assert 0 < len(got) < 60 and err.completion_tokens == got[-1].completion_tokens
    assert engine.stats()["pages_used"] == 0 and not engine.engine.requests


def test_waiting_requests_are_bounded(model):
    """max_waiting: beyond that many requests waiting for their first token, generate raises at once."""
    gate = threading.Event()
    engine = AsyncLLMEngine(LLMEngine(model, config=EngineConfig(page_size=4, num_pages=128, max_model_len=64)),
                            max_waiting=2)

    def gated():  # the engine thread blocks here while adding the first request: both stay waiting
        gate.wait(30)
        return Even()

    async def main():
        p = SamplingParams(max_tokens=3, ignore_eos=True)
        first = asyncio.ensure_future(collect(engine.generate([1, 2], SamplingParams(max_tokens=3, constraint=gated))))
        second = asyncio.ensure_future(collect(engine.generate([1, 3], p)))
        while engine.num_waiting < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineOverloadedError, match="2 requests are already waiting"):
            await collect(engine.generate([1, 4], p))
        gate.set()
        return await first, await second, await collect(engine.generate([1, 5], p))

    try:
        results = asyncio.run(main())
    finally:
        gate.set()
        engine.shutdown(drain=False)
    assert [r[-1].completion_tokens for r in results] == [3, 3, 3]
