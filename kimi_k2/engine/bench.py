"""Engine prefill and decode tokens/s at several batch sizes (`kimi-k2 bench`; random prompts, greedy, no EOS)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from torch import nn

from kimi_k2.config import PRESETS, K2Config
from kimi_k2.engine.llm_engine import LLMEngine
from kimi_k2.engine.params import SamplingParams


def load_model(name_or_dir: str, dtype: torch.dtype, seed: int = 0, quantization: str | None = None) -> nn.Module:
    """A model directory, or a preset name with random weights (std 1/sqrt(fan_in), so logits are not flat).

    quantization "int8" / "fp16": the projections hold that format (`kimi_k2.model.quantized`), the rest fp32;
    a directory is then read one tensor at a time, never expanded whole.
    """
    from kimi_k2.model import K2ForCausalLM
    from kimi_k2.model.quantized import load_quantized, quantize_model

    if Path(name_or_dir).is_dir() or name_or_dir not in PRESETS:
        if quantization is not None:
            return load_quantized(name_or_dir, quantization)
        return K2ForCausalLM.from_pretrained(name_or_dir, dtype=dtype)
    torch.manual_seed(seed)
    model = K2ForCausalLM.from_config(K2Config.from_preset(name_or_dir), torch.float32 if quantization else dtype)
    with torch.no_grad():
        for t in model.parameters():
            if t.ndim == 2:
                t.normal_(0.0, t.shape[1] ** -0.5)
    return quantize_model(model, quantization) if quantization else model.eval()


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
