"""Engine prefill and decode tokens/s at several batch sizes (`kimi-k2 bench`; random prompts, greedy, no EOS)."""

from __future__ import annotations

import random
import time

from kimi_k2.engine.llm_engine import LLMEngine
from kimi_k2.engine.params import SamplingParams


def measure(engine: LLMEngine, batch: int, prompt_len: int, new: int, seed: int = 0) -> dict[str, float]:
    """Time `batch` concurrent requests: prefill = until every request has its first token, decode = the rest."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    ids = {engine.add_request([rng.randrange(vocab) for _ in range(prompt_len)], params) for _ in range(batch)}
    started: set[str] = set()
    t0 = time.perf_counter()
    t1 = None
    while engine.has_unfinished():
        for d in engine.step():
            started.add(d.request_id)
        if t1 is None and started >= ids:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    assert t1 is not None
    return {"batch": batch, "prefill_tok_s": batch * prompt_len / (t1 - t0),
            "decode_tok_s": batch * (new - 1) / max(t2 - t1, 1e-9), "total_tok_s": batch * new / (t2 - t0),
            "seconds": t2 - t0}
