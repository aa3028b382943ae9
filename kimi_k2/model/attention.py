"""Multi-head Latent Attention (DeepSeek-V2/V3 MLA), with a full-sequence path and an absorbed latent-cache path.

Per token:  q = W_UQ(norm(W_DQ x))  (or W_Q x)           -> per head [q_nope | q_pe]
            [c_kv | k_pe] = kv_a_proj_with_mqa(x);  c_kv = norm(c_kv);  k_pe = rope(k_pe)  (one key for all heads)
            [k_nope | v] = kv_b_proj(c_kv) per head,  k_nope = W_UK c_kv,  v = W_UV c_kv
            logit(s, t) = softmax_scale * (q_nope . k_nope + q_pe . k_pe)
The latent path caches only (c_kv, k_pe) and folds W_UK into the query, W_UV into the output:
            logit = scale * ((W_UK^T q_nope) . c_kv + q_pe . k_pe),   out = W_UV (sum_t p_t c_kv_t)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import K2Config
from .cache import LatentCache
from .layers import Linear, RMSNorm, derived, fused_t, linear_t, use_cache
from .rope import apply_rotary_emb


class MLA(nn.Module):
    def __init__(self, config: K2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.dim = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.softmax_scale = config.softmax_scale
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = Linear(self.dim, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = Linear(self.dim, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(self.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        kv_b_out = self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
        self.kv_b_proj = Linear(self.kv_lora_rank, kv_b_out, bias=False)
        self.o_proj = Linear(self.n_heads * self.v_head_dim, self.dim, bias=bias)
        # QK-Clip: when set, forward records the per-head max pre-softmax logit [n_heads] (fp32, detached)
        self.track_max_logits = False
        self.max_logits: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None
    ) -> torch.Tensor:
        """x [B, S, D], cos/sin [B, S, rope/2] -> [B, S, D]."""
        B, S, _ = x.shape
        first, kv_a = self.q_proj if self.q_lora_rank is None else self.q_a_proj, self.kv_a_proj_with_mqa
        if not use_cache(first.weight, kv_a.weight, None if self.q_lora_rank is None else self.q_b_proj.weight):
            q, kv = first(x), kv_a(x)
            if self.q_lora_rank is not None:
                q = self.q_b_proj(self.q_a_layernorm(q))
        else:  # small-width inference: cached transposed weights (`linear_t`), both projections of x in one matmul
            q, kv = linear_t(x, *fused_t(self, "_x_proj_t", first, kv_a)).split_with_sizes(
                [first.out_features, kv_a.out_features], dim=-1)
            if self.q_lora_rank is not None:
                q = linear_t(self.q_a_layernorm(q), *fused_t(self, "_q_b_t", self.q_b_proj))
        q_nope, q_pe = q.view(B, S, self.n_heads, -1).split_with_sizes(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        freqs = torch.complex(cos, sin) if cos.dtype == torch.float32 else None  # [B, S, rope/2], shared by q, k
        q_pe = apply_rotary_emb(q_pe, cos, sin, freqs)  # [B, S, H, rope]
        c_kv, k_pe = kv.split_with_sizes([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, S, kv_lora_rank]
        k_pe = apply_rotary_emb(k_pe, cos, sin, freqs)  # [B, S, rope]
        if cache is None:
            out = self._attend_full(q_nope, q_pe, c_kv, k_pe)
        else:
            cache.write(self.layer_idx, c_kv, k_pe)
            out = self._attend_latent(q_nope, q_pe, *cache.read(self.layer_idx))
        out = out.flatten(2).to(x.dtype)
        return linear_t(out, *fused_t(self, "_o_t", self.o_proj)) if use_cache(self.o_proj.weight) else self.o_proj(out)

    def _attend_full(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor
    ) -> torch.Tensor:
        """Causal attention over this call's tokens with K/V expanded per head -> [B, S, H, v]."""
        B, S, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, S, qk]
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, -1)], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)  # [B, H, S, v]
        if not self.track_max_logits:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
            return out.transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * self.softmax_scale  # [B, H, S, S]
        causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        self.max_logits = scores.detach().amax(dim=(0, 2, 3)).float()
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
        return (probs @ v).transpose(1, 2)

    def _attend_latent(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_all: torch.Tensor, kpe_all: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Absorbed attention over the cache: c_all [B, T, C], kpe_all [B, T, rope], mask [B, S, T] -> [B, S, H, v].

        Computed in fp32 with per-head batched matmuls: W_UK [H, nope, C] and W_UV^T [H, C, v] are (fp32 views of)
        kv_b_proj.weight, cached for small-width inference until it changes.
        """
        B, S, H, _ = q_nope.shape
        w_uk, w_uv_t = derived(self, "_w_absorb", [self.kv_b_proj.weight], self._absorbed) \
            if use_cache(self.kv_b_proj.weight) else self._absorbed()
        if c_all.dtype != torch.float32 or q_nope.dtype != torch.float32:
            c_all, kpe_all, q_nope, q_pe = c_all.float(), kpe_all.float(), q_nope.float(), q_pe.float()
        q_lat = torch.bmm(q_nope.reshape(B * S, H, -1).transpose(0, 1), w_uk)  # [H, B*S, C]
        q_lat = q_lat.transpose(0, 1).reshape(B, S * H, -1)
        # scale * (q_pe . k_pe + q_lat . c): one bmm into the other
        scores = torch.baddbmm(torch.bmm(q_pe.reshape(B, S * H, -1), kpe_all.transpose(1, 2)),
                               q_lat, c_all.transpose(1, 2), beta=self.softmax_scale, alpha=self.softmax_scale)
        scores = scores.view(B, S, H, -1) + mask[:, :, None, :]  # [B, S, H, T]
        if self.track_max_logits:
            self.max_logits = scores.detach().amax(dim=(0, 1, 3))
        probs = scores.softmax(dim=-1)
        o_lat = torch.bmm(probs.view(B, S * H, -1), c_all)  # [B, S*H, C]
        out = torch.bmm(o_lat.view(B * S, H, -1).transpose(0, 1), w_uv_t)  # [H, B*S, v]
        return out.transpose(0, 1).view(B, S, H, -1)

    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.float().view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :].transpose(1, 2)
