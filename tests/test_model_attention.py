"""MLA: max-logit tracking for QK-Clip, the explicit path, rope layout."""

from __future__ import annotations

import math

import pytest
import torch

from kimi_k2.config import K2Config
from kimi_k2.model.attention import MLA
from kimi_k2.model.dense_cache import DenseLatentCache
from kimi_k2.model.rope import RotaryEmbedding, apply_rotary_emb


def _mla(**overrides) -> tuple[MLA, K2Config]:
    config = K2Config.from_preset("k2-tiny").replace(**overrides)
    torch.manual_seed(0)
    mla = MLA(config, layer_idx=0)
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0.0, 0.4) if p.ndim == 2 else p.uniform_(0.5, 1.5)
    return mla, config


def _inputs(config: K2Config, B: int = 2, S: int = 11) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(B, S, config.hidden_size, generator=torch.Generator().manual_seed(1))
    cos, sin = RotaryEmbedding(config)(torch.arange(S).expand(B, S), x.dtype)
    return x, cos, sin


def _max_logits_directly(mla: MLA, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    B, S, _ = x.shape
    H, dn = mla.n_heads, mla.qk_nope_head_dim
    q = mla.q_b_proj(mla.q_a_layernorm(mla.q_a_proj(x))).view(B, S, H, -1)
    c, k_pe = mla.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
    k_nope = mla.kv_b_proj(mla.kv_a_layernorm(c)).view(B, S, H, -1)[..., :dn]
    q_pe, k_pe = apply_rotary_emb(q[..., dn:], cos, sin), apply_rotary_emb(k_pe, cos, sin)
    out = torch.full((H,), float("-inf"))
    for s in range(S):
        for t in range(s + 1):  # causal: only keys t <= s
            logit = (q[:, s, :, :dn] * k_nope[:, t]).sum(-1) + (q_pe[:, s] * k_pe[:, t, None]).sum(-1)
            out = torch.maximum(out, (logit * mla.softmax_scale).amax(dim=0))
    return out


def test_tracking_records_per_head_max_over_unmasked_logits() -> None:
    mla, config = _mla()
    x, cos, sin = _inputs(config)
    with torch.no_grad():
        plain = mla(x, cos, sin)
        assert mla.max_logits is None
        mla.track_max_logits = True
        tracked = mla(x, cos, sin)
    torch.testing.assert_close(tracked, plain, atol=1e-5, rtol=1e-5)  # the explicit path computes the same output
    assert mla.max_logits.shape == (config.num_attention_heads,) and mla.max_logits.dtype == torch.float32
    assert not mla.max_logits.requires_grad
    torch.testing.assert_close(mla.max_logits, _max_logits_directly(mla, x, cos, sin), atol=1e-4, rtol=1e-5)


def test_tracking_keeps_gradients_and_latent_path_agrees() -> None:
    mla, config = _mla()
    mla.track_max_logits = True
    x, cos, sin = _inputs(config)
    mla(x, cos, sin).sum().backward()
    assert mla.kv_b_proj.weight.grad is not None and mla.q_a_proj.weight.grad.abs().sum() > 0
    full_max = mla.max_logits.clone()
    cache = DenseLatentCache(1, 2, 16, config.kv_lora_rank, config.qk_rope_head_dim)
    cache.begin([11, 11])
    with torch.no_grad():
        mla(x, cos, sin, cache)
    torch.testing.assert_close(mla.max_logits, full_max, atol=1e-4, rtol=1e-5)


def test_qk_clip_rescaling_scales_max_logit_exactly() -> None:
    """Scaling q_nope and k_nope rows by sqrt(g) and q_rope rows by g scales every logit of the head by g."""
    mla, config = _mla(q_lora_rank=None)
    mla.track_max_logits = True
    x, cos, sin = _inputs(config)
    with torch.no_grad():
        mla(x, cos, sin)
        before = mla.max_logits.clone()
        g, h = 0.3, 1
        dn, dqk, dv = config.qk_nope_head_dim, config.qk_head_dim, config.v_head_dim
        mla.q_proj.weight[h * dqk : h * dqk + dn] *= g**0.5
        mla.q_proj.weight[h * dqk + dn : (h + 1) * dqk] *= g
        mla.kv_b_proj.weight[h * (dn + dv) : h * (dn + dv) + dn] *= g**0.5
        mla(x, cos, sin)
    expected = before.clone()
    expected[h] *= g
    torch.testing.assert_close(mla.max_logits, expected, atol=1e-5, rtol=1e-5)


def test_rope_is_interleaved_pairs_rotated_by_position() -> None:
    config = K2Config.from_preset("k2-tiny")
    rope = RotaryEmbedding(config)
    x = torch.randn(1, 3, 2, config.qk_rope_head_dim)
    pos = torch.tensor([[0, 5, 700]])
    cos, sin = rope(pos, torch.float32)
    y = apply_rotary_emb(x, cos, sin)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    angle = pos[0, :, None, None].double() * rope.inv_freq.double()
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle).to(z.dtype)).flatten(-2)
    torch.testing.assert_close(y, expected.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y[:, 0], x[:, 0])  # position 0 is the identity
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation


def test_yarn_frequencies_interpolate_only_low_frequencies() -> None:
    base = K2Config.from_preset("k2-tiny").replace(qk_rope_head_dim=32)
    plain = RotaryEmbedding(base.replace(rope_scaling=None)).inv_freq
    yarn_cfg = base.replace(rope_scaling={"type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256,
                                          "beta_fast": 32.0, "beta_slow": 1.0})
    yarn = RotaryEmbedding(yarn_cfg)
    ratio = plain / yarn.inv_freq
    assert ratio[0] == 1.0  # the fastest dims extrapolate unchanged
    torch.testing.assert_close(ratio[-1], torch.tensor(16.0))  # the slowest dims are interpolated by `factor`
    assert (ratio[1:] >= ratio[:-1] - 1e-6).all()  # the ramp is monotone
    # without mscale/mscale_all_dim YaRN scales cos/sin by 0.1 ln(factor) + 1 (HF); K2 sets both to 1.0, which moves
    # the whole factor into softmax_scale (x mscale^2) and leaves cos/sin unscaled
    assert yarn.attention_factor == pytest.approx(0.1 * math.log(16.0) + 1.0)
    assert yarn_cfg.softmax_scale == pytest.approx(base.qk_head_dim**-0.5)
    k2_cfg = yarn_cfg.replace(rope_scaling={**yarn_cfg.rope_scaling, "mscale": 1.0, "mscale_all_dim": 1.0})
    assert RotaryEmbedding(k2_cfg).attention_factor == 1.0
    assert k2_cfg.softmax_scale == pytest.approx(base.qk_head_dim**-0.5 * (0.1 * math.log(16.0) + 1.0) ** 2)
