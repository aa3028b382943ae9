"""The absorbed latent-cache path (prefill, then token-by-token decode) equals the full-sequence forward."""

from __future__ import annotations

import pytest
import torch

from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.dense_cache import DenseLatentCache


def _model(**overrides) -> K2ForCausalLM:
    torch.manual_seed(0)
    model = K2ForCausalLM.from_config(K2Config.from_preset("k2-tiny").replace(**overrides), torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 1.5 / p.shape[1] ** 0.5)
        for layer in model.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
    return model


def _pad(seqs: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
    out = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        out[b, :n] = s[:n]
    return out


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": None, "rope_scaling": None}], ids=["k2-tiny", "plain"])
def test_prefill_then_decode_equals_full_forward(overrides: dict) -> None:
    model = _model(**overrides)
    gen = torch.Generator().manual_seed(3)
    lengths, prompts = [9, 4, 12], [5, 1, 7]  # different lengths: padding is handled by the cache's mask
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=gen) for n in lengths]
    with torch.no_grad():
        full = [model(s[None])[0] for s in seqs]
        cache = DenseLatentCache.for_model(model.config, batch=3, max_len=32)
        cache.begin(prompts)
        logits = model(_pad(seqs, prompts), cache.positions(max(prompts)), cache)
        cache.end()
        for b, n in enumerate(prompts):
            torch.testing.assert_close(logits[b, :n], full[b][:n], atol=1e-4, rtol=0)
        done = list(prompts)
        while any(d < n for d, n in zip(done, lengths, strict=True)):
            n_new = [int(d < n) for d, n in zip(done, lengths, strict=True)]
            step = torch.tensor([[int(seqs[b][done[b]]) if n_new[b] else 0] for b in range(3)])
            cache.begin(n_new)
            logits = model(step, cache.positions(1), cache)
            cache.end()
            for b in range(3):
                if n_new[b]:
                    torch.testing.assert_close(logits[b, 0], full[b][done[b]], atol=1e-4, rtol=0)
                    done[b] += 1
            assert torch.isfinite(logits).all()  # finished sequences' padded rows stay finite
    assert cache.lengths.tolist() == lengths


def test_chunked_prefill_equals_full_forward() -> None:
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        cache = DenseLatentCache.for_model(model.config, batch=2, max_len=20)
        chunks = []
        for lo, hi in [(0, 8), (8, 15), (15, 20)]:
            cache.begin([hi - lo, hi - lo])
            chunks.append(model(ids[:, lo:hi], cache.positions(hi - lo), cache))
            cache.end()
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=0)


def test_cache_rejects_overflow_and_misuse() -> None:
    model = _model()
    cache = DenseLatentCache.for_model(model.config, batch=1, max_len=4)
    with pytest.raises(RuntimeError, match="begin"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    cache.begin([5])
    with pytest.raises(ValueError, match="cannot hold"):
        model(torch.zeros(1, 5, dtype=torch.long), cache.positions(5), cache)
    with pytest.raises(ValueError, match="n_new"):
        cache.begin([1, 1])


def test_bf16_latent_decode_tracks_full_forward() -> None:
    model = _model().to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = DenseLatentCache.for_model(model.config, batch=2, max_len=16, dtype=torch.bfloat16)
        cache.begin([8, 8])
        steps = [model(ids[:, :8], cache.positions(8), cache)]
        cache.end()
        for s in range(8, 16):
            cache.begin([1, 1])
            steps.append(model(ids[:, s : s + 1], cache.positions(1), cache))
            cache.end()
    got = torch.cat(steps, dim=1)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    err = (got - full).abs()
    # bf16 rounding only; it may flip a near-tied expert choice, so compare typical rows, not the worst one
    assert err.median() < 0.02 * full.abs().max()
    assert (got.argmax(-1) == full.argmax(-1)).float().mean() > 0.9
