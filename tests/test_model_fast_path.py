"""The inference paths (latent cache with absorbed weights, grouped MoE, complex rope) against the autograd path of
the same model: same logits, never stale after a weight change, nothing new in the state_dict."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import random_tiny_model

from kimi_k2.config import K2Config
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.dense_cache import DenseLatentCache
from kimi_k2.model.moe import MoE
from kimi_k2.model.rope import apply_rotary_emb

VARIANTS = {
    "q-lora": {},
    "no-q-lora-bias": {"q_lora_rank": None, "attention_bias": True},
    "grouped-router": {"n_group": 2, "topk_group": 1},
}


def _decode(model: K2ForCausalLM, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Prefill `prefill` tokens, then one token per step through the latent cache -> logits [B, S, V]."""
    B, S = ids.shape
    cache = DenseLatentCache.for_model(model.config, B, S)
    cache.begin([prefill] * B)
    out = [model(ids[:, :prefill], cache.positions(prefill), cache)]
    cache.end()
    for i in range(prefill, S):
        cache.begin([1] * B)
        out.append(model(ids[:, i : i + 1], cache.positions(1), cache))
        cache.end()
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch", [1, 2])
def test_inference_paths_equal_autograd_path(variant: str, batch: int) -> None:
    model = random_tiny_model(**VARIANTS[variant])
    ids = torch.randint(0, model.config.vocab_size, (batch, 9), generator=torch.Generator().manual_seed(1))
    reference = model(ids).detach()  # grad enabled: separate projections, no caches
    with torch.no_grad():
        full = model(ids)
        decoded = _decode(model, ids, prefill=5)
    torch.testing.assert_close(full, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(decoded, reference, rtol=0, atol=1e-5)


def test_cached_weights_follow_in_place_updates_and_reloads() -> None:
    model = random_tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids)
        for name, p in model.named_parameters():  # an optimizer-like in-place step on every fused / absorbed source
            if name.endswith(("q_a_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight", "gate_proj.weight",
                              "up_proj.weight")):
                p.mul_(1.5)
        after = model(ids)
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, model(ids).detach(), rtol=0, atol=1e-5)
    other = random_tiny_model(q_lora_rank=model.config.q_lora_rank)
    with torch.no_grad():
        other.model.layers[0].mlp.gate_proj.weight.zero_()
    model.load_state_dict(other.state_dict())  # copy_ into the same tensors
    with torch.no_grad():
        torch.testing.assert_close(model(ids), other(ids), rtol=0, atol=1e-5)
    model.double()  # new tensors: every cache rebuilds in the new dtype
    with torch.no_grad():
        assert model(ids).dtype == torch.float32  # logits are always fp32
        torch.testing.assert_close(model(ids), other.double()(ids), rtol=0, atol=1e-9)


def test_state_dict_is_unchanged_by_inference() -> None:
    model = random_tiny_model()
    names = list(model.state_dict())
    with torch.no_grad():
        _decode(model, torch.zeros(1, 4, dtype=torch.long), prefill=2)
    assert list(model.state_dict()) == names
    assert all(not t.requires_grad or t.grad is None for t in model.parameters())


def test_one_token_moe_equals_batched_moe() -> None:
    moe = next(m for m in random_tiny_model().modules() if isinstance(m, MoE))
    x = torch.randn(3, 1, moe.gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        grouped = moe(x.view(1, 3, -1)).view(3, 1, -1)  # 3 tokens grouped by expert
        grouped_load = moe.last_expert_load.clone()
        rows, load = [], torch.zeros_like(grouped_load)
        for t in range(3):
            rows.append(moe(x[t : t + 1]))  # one token at a time
            load += moe.last_expert_load
            assert moe.last_expert_load.dtype == torch.long and int(moe.last_expert_load.sum()) == moe.top_k
    torch.testing.assert_close(torch.cat(rows), grouped, rtol=0, atol=1e-5)
    assert torch.equal(load, grouped_load)


def test_rotate_handles_unaligned_views() -> None:
    """A rope slice at an odd offset cannot be viewed as complex in place: it is copied, with the same result."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 4, 9, generator=g)
    x = base[..., 1:]  # [2, 3, 4, 8], storage offset 1
    angle = torch.randn(2, 3, 4, generator=g)
    pairs = x.unflatten(-1, (-1, 2))
    x0, x1, cos, sin = pairs[..., 0], pairs[..., 1], angle.cos()[:, :, None], angle.sin()[:, :, None]
    want = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    torch.testing.assert_close(apply_rotary_emb(x, angle.cos(), angle.sin()), want)


def test_weights_made_in_inference_mode_are_never_served_stale() -> None:
    """Inference tensors have no version counter: an in-place change must still reach the next forward."""
    config = K2Config.from_preset("k2-tiny")
    ids = torch.randint(0, config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        model = K2ForCausalLM.from_config(config, torch.float32).eval()
        before = model(ids)
        for p in model.parameters():
            p.mul_(1.1)
        after = model(ids)
    fresh = K2ForCausalLM.from_config(config, torch.float32).eval()
    fresh.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})  # normal tensors, same values
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, fresh(ids).detach(), rtol=0, atol=1e-5)
