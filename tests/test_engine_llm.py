"""LLMEngine end to end on the tiny model: validation, abort, prefix caching, n > 1, seeds, stops, constraints,
preemption, and many requests of random lengths through a small page pool."""

import random

import pytest
import torch

from kimi_k2.config import K2Config
from kimi_k2.engine import EngineConfig, LLMEngine, PromptTooLongError, SamplingParams
from kimi_k2.model import K2ForCausalLM
from kimi_k2.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny"), dtype=torch.float32).eval()


def make_engine(model, **kw):
    kw = {"page_size": 4, "num_pages": 256, "max_model_len": 256, **kw}
    return LLMEngine(model, config=EngineConfig(**kw))


def rand_prompt(rng, n, vocab=512):
    return [rng.randrange(2, vocab) for _ in range(n)]


def assert_greedy(model, prompt, completion, tol=1e-4):
    """Each completion token is the argmax of the full-sequence forward (up to fp32 ties within `tol`)."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + completion]))[0]
    for i, tok in enumerate(completion):
        row = logits[len(prompt) - 1 + i]
        assert float(row[tok]) >= float(row.max()) - tol, (i, tok, int(row.argmax()))


GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_bad_requests_fail_at_submission(model):
    engine = make_engine(model, max_model_len=32, num_pages=8)
    with pytest.raises(PromptTooLongError, match="max_model_len is 32"):
        engine.add_request(list(range(2, 34)), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="outside"):
        engine.add_request([5, 512], GREEDY)
    for bad, name in [(dict(max_tokens=0), "max_tokens"), (dict(temperature=-1.0), "temperature"),
                      (dict(top_p=0.0), "top_p"), (dict(top_k=-1), "top_k"), (dict(min_p=1.5), "min_p"),
                      (dict(n=0), "n"), (dict(presence_penalty=3.0), "presence_penalty"),
                      (dict(logprobs=-1), "logprobs"), (dict(stop=["x"]), "tokenizer"),
                      (dict(stop_token_ids=[10_000]), "stop_token_ids")]:
        with pytest.raises(ValueError, match=name):
            engine.add_request([5, 6], SamplingParams(**bad))
    engine.add_request([5, 6], GREEDY, request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([5, 6], GREEDY, request_id="a")
    assert engine.stats()["waiting"] == 1  # nothing else was queued
    with pytest.raises(ValueError, match="num_pages"):
        make_engine(model, max_model_len=64, num_pages=8)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        make_engine(model, max_model_len=4096)


def test_max_model_len_ends_with_length(model):
    engine = make_engine(model, max_model_len=20, num_pages=5)
    (res,) = engine.generate([rand_prompt(random.Random(0), 17)], SamplingParams(max_tokens=50, ignore_eos=True))[0:1]
    assert res[0].finish_reason == "length" and res[0].completion_tokens == 3


def test_k2_preset_context_is_128k():
    assert EngineConfig(page_size=64).resolve(K2Config.from_preset("kimi-k2-instruct"), torch.bfloat16)[0] == 131072


def test_abort_frees_pages_at_once_and_others_finish(model):
    rng = random.Random(1)
    engine = make_engine(model)
    prompts = [rand_prompt(rng, n) for n in (9, 30, 14)]
    ids = [engine.add_request(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in prompts]
    outs = {i: [] for i in ids}
    for _ in range(3):
        for d in engine.step():
            outs[d.request_id] += d.token_ids
    used = engine.block_manager.num_used_pages
    held = len({p for s in engine.requests[ids[1]].seqs for p in s.block_table})
    assert engine.abort(ids[1]) and not engine.abort(ids[1])
    assert engine.block_manager.num_used_pages == used - held
    deltas = engine.step()
    final = [d for d in deltas if d.request_id == ids[1]]
    for d in deltas:
        outs[d.request_id] += d.token_ids
    assert len(final) == 1 and final[0].finished and final[0].finish_reason == "abort"
    while engine.has_unfinished():
        for d in engine.step():
            outs[d.request_id] += d.token_ids
    for i in (0, 2):
        assert len(outs[ids[i]]) == 12
        assert_greedy(model, prompts[i], outs[ids[i]])
    assert engine.block_manager.num_used_pages == 0


def test_prefix_cache_hits_and_keeps_outputs(model):
    rng = random.Random(2)
    system = rand_prompt(rng, 24)
    turns = [system + rand_prompt(rng, n) for n in (3, 7, 12)]
    cached = make_engine(model)
    first = cached.generate([turns[0]], GREEDY)[0][0]
    assert first.cached_prompt_tokens == 0
    rest = cached.generate(turns[1:], GREEDY)
    assert all(r[0].cached_prompt_tokens == 24 for r in rest)
    # multi-turn: the next prompt is the previous prompt + answer + new user tokens
    follow = turns[0] + first.token_ids + rand_prompt(rng, 5)
    again = cached.generate([follow], GREEDY)[0][0]
    assert again.cached_prompt_tokens >= len(turns[0]) + len(first.token_ids) - 4
    assert cached.stats()["prefix_cache_hit_rate"] > 0.4
    plain = make_engine(model, enable_prefix_caching=False)
    for prompt, res in zip(turns[1:] + [follow], [r[0] for r in rest] + [again], strict=True):
        assert plain.generate([prompt], GREEDY)[0][0].token_ids == res.token_ids
    assert plain.stats()["prefix_cache_hit_rate"] == 0.0


def test_n_samples_seeds_and_logprobs(model):
    prompt = rand_prompt(random.Random(3), 10)
    p = SamplingParams(max_tokens=8, temperature=1.5, seed=11, n=3, ignore_eos=True, logprobs=2)
    a = make_engine(model).generate([prompt], p)[0]
    b = make_engine(model).generate([prompt, prompt[:5]], p)[0]  # different batch neighbours
    assert [r.index for r in a] == [0, 1, 2]
    assert [r.cached_prompt_tokens for r in a] == [0, 8, 8]  # samples 1, 2 reuse sample 0's full prompt pages
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert len({tuple(r.token_ids) for r in a}) > 1
    for r in a:
        assert len(r.logprobs) == 8 and all(len(lp.top) == 2 for lp in r.logprobs)
        assert all(lp.token_id == t for lp, t in zip(r.logprobs, r.token_ids, strict=True))


def test_stop_token_ids_and_eos(model):
    prompt = rand_prompt(random.Random(4), 8)
    free = make_engine(model).generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0][0]
    stop_at = free.token_ids[4]
    first = free.token_ids.index(stop_at)
    res = make_engine(model).generate([prompt], SamplingParams(max_tokens=10, temperature=0,
                                                               stop_token_ids=[stop_at]))[0][0]
    assert res.finish_reason == "stop" and res.token_ids == free.token_ids[:first + 1]
    eos_model_engine = make_engine(model)
    eos_model_engine.eos_token_ids = {stop_at}
    res = eos_model_engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0))[0][0]
    assert res.finish_reason == "stop" and res.token_ids[-1] == stop_at
    res = eos_model_engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0][0]
    assert res.token_ids == free.token_ids


class EvenThenDone:
    def __init__(self):
        self.n = 0

    def allowed(self):
        return torch.arange(512) % 2 == 0

    def advance(self, token_id):
        assert token_id % 2 == 0
        self.n += 1

    def is_finished(self):
        return self.n == 3


def test_constraint_is_honoured(model):
    prompt = rand_prompt(random.Random(5), 6)
    for temp in (0.0, 1.0):
        res = make_engine(model).generate([prompt], SamplingParams(max_tokens=10, temperature=temp,
                                                                   constraint=EvenThenDone))[0][0]
        assert res.finish_reason == "stop" and len(res.token_ids) == 3 and all(t % 2 == 0 for t in res.token_ids)


def many_requests(model, count, seed):
    """`count` requests of random lengths through a pool that holds only a few of them at once."""
    rng = random.Random(seed)
    engine = make_engine(model, page_size=4, num_pages=24, max_model_len=96, max_num_seqs=32,
                         max_num_batched_tokens=64)
    prompts = [rand_prompt(rng, rng.randint(1, 60)) for _ in range(count)]
    params = [SamplingParams(max_tokens=rng.randint(1, 24), temperature=0, ignore_eos=True) for _ in range(count)]
    results = engine.generate(prompts, params)
    for prompt, p, (res,) in zip(prompts, params, results, strict=True):
        assert res.finished and res.finish_reason == "length"
        assert len(res.token_ids) == min(p.max_tokens, 96 - len(prompt))
        assert_greedy(model, prompt, res.token_ids)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["running"] == stats["waiting"] == 0
    assert stats["pages_used"] == 0 and all(pg.ref_count == 0 for pg in engine.block_manager.pages)


def test_many_requests_small_pool(model):
    many_requests(model, 200, seed=6)


@pytest.mark.slow
def test_thousand_requests_small_pool(model):
    many_requests(model, 1000, seed=7)


@pytest.fixture(scope="module")
def tok_model(k2_tokenizer_dir):
    tok = Tokenizer.from_pretrained(k2_tokenizer_dir)
    torch.manual_seed(0)
    cfg = K2Config.from_preset("k2-tiny").replace(vocab_size=tok.n_vocab, eos_token_id=tok.eos_id)
    return K2ForCausalLM.from_config(cfg, dtype=torch.float32).eval(), tok


def test_text_and_stop_strings_with_the_kimi_tokenizer(tok_model):
    model, tok = tok_model
    engine = LLMEngine(model, tok, EngineConfig(page_size=4, num_pages=128, max_model_len=128))
    assert {tok.eos_id, tok.im_end_id} <= engine.eos_token_ids
    prompt = tok.encode("def main():\n    return")
    free = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0][0]
    assert free.text == tok.decode(free.token_ids)
    text = free.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), text
    res = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                   stop=[stop]))[0][0]
    assert res.finish_reason == "stop" and res.text == text[:text.index(stop)]
    assert stop not in res.text and res.token_ids == free.token_ids[:len(res.token_ids)]
    im_end = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0,
                                                      stop_token_ids=[free.token_ids[3]]))[0][0]
    assert im_end.text == tok.decode(im_end.token_ids[:-1])  # the stop token itself is not text
