"""Page pool, prefix caching and continuous-batching scheduler, driven step by step without a model."""

import random

import pytest

from kimi_k2.engine.block_manager import BlockManager
from kimi_k2.engine.params import SamplingParams
from kimi_k2.engine.scheduler import Scheduler
from kimi_k2.engine.sequence import Sequence, SequenceStatus


def seq(tokens, rid="r", max_tokens=4):
    return Sequence(rid, 0, list(tokens), SamplingParams(max_tokens=max_tokens))


def compute_all(bm: BlockManager, s: Sequence) -> None:
    bm.grow(s, s.num_uncomputed_tokens)
    s.num_computed_tokens = len(s)
    bm.commit(s)


def test_prefix_pages_are_shared_and_refcounted():
    bm = BlockManager(num_pages=8, page_size=4)
    a = seq(range(10))
    bm.match_prefix(a)
    assert a.num_computed_tokens == 0
    compute_all(bm, a)  # pages: [0..3] [4..7] full, [8, 9] partial
    assert bm.num_used_pages == 3
    b = seq(list(range(8)) + [99, 98, 97])
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    assert [bm.pages[p].ref_count for p in a.block_table] == [2, 2, 1]
    c = seq([0, 1, 2, 3, 7, 7, 7, 7, 7])  # second page differs
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:1]
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_used_pages == 0 and len(bm.evictable) == 2  # the two hashed pages stay reusable


def test_one_token_is_always_left_to_compute():
    bm = BlockManager(num_pages=8, page_size=4)
    a = seq(range(8))
    bm.match_prefix(a)
    compute_all(bm, a)
    b = seq(range(8))  # identical 2-page prompt: only the first page may be reused
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4 and b.num_uncomputed_tokens == 4


def test_lru_eviction_prefers_empty_pages_then_oldest():
    bm = BlockManager(num_pages=4, page_size=2)
    old, new = seq([1, 2, 3]), seq([5, 6, 7])
    for s in (old, new):
        bm.match_prefix(s)
        compute_all(bm, s)
    bm.free(old)
    bm.free(new)
    assert bm.num_free_pages == 4 and len(bm.evictable) == 2
    taker = seq(range(100, 106))
    bm.grow(taker, 6)  # 3 pages: 2 empty ones, then the least recently freed hashed page (old's)
    again_old, again_new = seq([1, 2, 3]), seq([5, 6, 7])
    bm.match_prefix(again_old)
    bm.match_prefix(again_new)
    assert again_old.num_computed_tokens == 0 and again_new.num_computed_tokens == 2


def test_prefix_caching_can_be_disabled():
    bm = BlockManager(num_pages=8, page_size=4, enable_prefix_caching=False)
    a = seq(range(10))
    bm.match_prefix(a)
    compute_all(bm, a)
    b = seq(range(10))
    bm.match_prefix(b)
    assert b.num_computed_tokens == 0 and not bm.hash_to_page


def drive(sched: Scheduler, rng: random.Random, max_steps: int = 10_000):
    """Run the scheduler as the engine does, sampling random tokens; returns per-step scheduled lists."""
    steps = []
    while sched.has_unfinished():
        batch = sched.schedule()
        assert batch, "scheduler made no progress"
        steps.append([(s, n) for s, n in batch])
        for s, n in batch:
            s.num_computed_tokens += n
            sched.block_manager.commit(s)
        for s, _ in batch:
            if s.num_computed_tokens == len(s):
                s.token_ids.append(rng.randrange(1000))
                if s.num_completion_tokens >= s.params.max_tokens:
                    sched.finish(s, "length")
        assert len(steps) < max_steps
    return steps


def test_token_budget_chunked_prefill_and_max_num_seqs():
    bm = BlockManager(num_pages=64, page_size=4)
    sched = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=8)
    seqs = [seq(range(i * 50, i * 50 + 3 + 7 * i), rid=str(i), max_tokens=5) for i in range(6)]
    for s in seqs:
        sched.add(s)
    steps = drive(sched, random.Random(0))
    for batch in steps:
        assert sum(n for _, n in batch) <= 8
        assert len(batch) <= 3
    long = seqs[5]  # 38-token prompt: prefilled over several steps
    chunks = [n for batch in steps for s, n in batch if s is long and n > 1]
    assert len(chunks) >= 5 and sum(chunks) >= 38
    assert any(len(batch) > 1 and {n for _, n in batch} > {1} for batch in steps)  # decode + prefill mixed
    assert all(s.status is SequenceStatus.FINISHED and s.num_completion_tokens == 5 for s in seqs)
    assert bm.num_used_pages == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_preemption_under_a_tiny_pool_loses_nothing(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_pages=12, page_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32)
    seqs = [seq([rng.randrange(1000) for _ in range(rng.randint(1, 20))], rid=str(i),
                max_tokens=rng.randint(1, 20)) for i in range(30)]
    for s in seqs:
        sched.add(s)
    drive(sched, rng)
    assert sched.num_preemptions > 0
    assert all(s.is_finished and s.num_completion_tokens == s.params.max_tokens for s in seqs)
    assert bm.num_used_pages == 0
    assert all(p.ref_count == 0 for p in bm.pages)
