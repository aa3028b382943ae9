"""Rotary embedding of the decoupled rope part of MLA, with YaRN frequency interpolation.

Layout is DeepSeek's interleaved one: the pair (x[2i], x[2i+1]) is the complex number x[2i] + j*x[2i+1], rotated by
position * inv_freq[i] (DeepSeek-V3 `inference/model.py` `apply_rotary_emb`; HF `apply_rotary_pos_emb_interleave`).

YaRN (arXiv 2309.00071; DeepSeek-V3 `precompute_freqs_cis`, HF `_compute_yarn_parameters`): with
d(r) = dim * ln(L_orig / (2*pi*r)) / (2 ln theta), dims below floor(d(beta_fast)) keep their frequency, dims above
ceil(d(beta_slow)) are divided by `factor`, and a linear ramp blends in between. cos/sin are multiplied by
attention_factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim) (1.0 for K2); the mscale_all_dim^2 part
lives in `K2Config.softmax_scale`.
"""

from __future__ import annotations

import math

import torch

from ..config import K2Config


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_parameters(config: K2Config) -> tuple[torch.Tensor, float]:
    """inv_freq [qk_rope_head_dim / 2] (fp32, cpu) and the cos/sin attention factor."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    rs = config.rope_scaling
    if rs is None or rs.get("type", rs.get("rope_type")) != "yarn":
        return inv_freq, 1.0
    factor = float(rs["factor"])
    original = rs.get("original_max_position_embeddings") or config.max_position_embeddings
    beta_fast, beta_slow = rs.get("beta_fast") or 32.0, rs.get("beta_slow") or 1.0
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq, float(attention_factor)


class RotaryEmbedding:
    """cos/sin for any positions. No module state (safe on the meta device); inv_freq is cached per device."""

    def __init__(self, config: K2Config) -> None:
        self.inv_freq, self.attention_factor = rope_parameters(config)
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, S] -> cos, sin [B, S, rope_dim / 2] in `dtype` (computed in fp32)."""
        inv_freq = self._by_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._by_device[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * inv_freq
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)


def apply_rotary_emb(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, freqs: torch.Tensor | None = None
) -> torch.Tensor:
    """x [B, S, H, d] or [B, S, d] (interleaved pairs), cos/sin [B, S, d/2] -> x rotated, same shape and layout.

    (x0 + j x1)(cos + j sin) = (x0 cos - x1 sin) + j (x0 sin + x1 cos). In fp32 it is one complex multiply by
    freqs = cos + j sin [B, S, d/2] (pass it to share it between calls); other dtypes compute in x.dtype, as HF does,
    and so does a torch.compile'd caller (inductor fuses the real form into the ops around it).
    """
    if x.ndim == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
        freqs = None if freqs is None else freqs[:, :, None]
    if x.dtype != torch.float32 or cos.dtype != torch.float32 or torch.compiler.is_compiling():
        pairs = x.unflatten(-1, (-1, 2))
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    if x.stride(-1) != 1 or x.storage_offset() % 2 or any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()  # view_as_complex needs (re, im) pairs adjacent and pair-aligned
    freqs = torch.complex(cos, sin) if freqs is None else freqs
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * freqs).flatten(-2)
