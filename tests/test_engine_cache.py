"""The paged MLA latent cache: decode through pages (absorbed attention) equals the full-sequence forward."""

import random

import pytest
import torch

from kimi_k2.config import K2Config
from kimi_k2.engine import EngineConfig, LLMEngine
from kimi_k2.engine.block_manager import BlockManager
from kimi_k2.engine.engine_config import latent_bytes_per_token, per_head_bytes_per_token
from kimi_k2.engine.model_runner import ModelRunner
from kimi_k2.engine.paged_cache import LatentPool
from kimi_k2.engine.params import SamplingParams
from kimi_k2.engine.sequence import Sequence
from kimi_k2.model import K2ForCausalLM


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny"), dtype=torch.float32).eval()


def full_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0, -1]


def test_paged_decode_equals_full_forward(tiny_model):
    """Sequences of different lengths, prefilled in uneven chunks, then decoded together, pages scattered."""
    cfg = tiny_model.config
    rng = random.Random(0)
    bm = BlockManager(num_pages=64, page_size=4)
    bm.free_ids = type(bm.free_ids)(rng.sample(range(64), 64))  # block tables point all over the pool
    pool = LatentPool(cfg, 64, 4, torch.float32)
    runner = ModelRunner(tiny_model, pool)
    seqs = [Sequence(str(i), 0, [rng.randrange(cfg.vocab_size) for _ in range(n)], SamplingParams())
            for i, n in enumerate([3, 11, 6, 17])]
    for s in seqs:
        bm.match_prefix(s)
    worst = 0.0
    checked = 0
    for step in range(14):
        batch = []
        for s in seqs:
            n = min(s.num_uncomputed_tokens, rng.choice([1, 2, 5]) if step < 4 else s.num_uncomputed_tokens)
            bm.grow(s, n)
            batch.append((s, n))
        out_seqs, logits = runner.run(batch)
        for s, n in batch:
            s.num_computed_tokens += n
        for s, row in zip(out_seqs, logits, strict=True):
            worst = max(worst, float((row - full_logits(tiny_model, s.token_ids)).abs().max()))
            checked += 1
            s.token_ids.append(rng.randrange(cfg.vocab_size))
    assert checked >= 40
    assert worst < 1e-4, worst


def test_engine_greedy_matches_recomputed_greedy(tiny_model):
    cfg = tiny_model.config
    rng = random.Random(1)
    prompts = [[rng.randrange(2, cfg.vocab_size) for _ in range(n)] for n in (1, 5, 9, 23, 40)]
    engine = LLMEngine(tiny_model, config=EngineConfig(page_size=4, num_pages=300, max_num_batched_tokens=16))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
    results = engine.generate(prompts, params)
    for prompt, (res,) in zip(prompts, results, strict=True):
        ids = list(prompt)
        for tok, lp in zip(res.token_ids, res.logprobs, strict=True):
            ref = full_logits(tiny_model, ids)
            assert tok == int(ref.argmax())
            assert lp.logprob == pytest.approx(float(ref.log_softmax(-1)[tok]), abs=1e-4)
            ids.append(tok)
        assert res.finish_reason == "length" and res.completion_tokens == 8
    assert engine.block_manager.num_used_pages == 0


def test_cache_bytes_per_token_is_the_mla_formula(tiny_model):
    engine = LLMEngine(tiny_model, config=EngineConfig(page_size=4, num_pages=300))
    cfg = tiny_model.config
    assert engine.stats()["cache_bytes_per_token"] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * \
        cfg.num_hidden_layers * 4
    assert engine.pool.kv.shape == (cfg.num_hidden_layers, 300 * 4, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    k2 = K2Config.from_preset("kimi-k2-instruct")
    assert latent_bytes_per_token(k2, torch.bfloat16) == 576 * 61 * 2 == 70272
    ratio = per_head_bytes_per_token(k2, torch.bfloat16) / latent_bytes_per_token(k2, torch.bfloat16)
    assert 35 < ratio < 36
