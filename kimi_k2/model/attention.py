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
from ..ops.quantize import float_weight
from .cache import LatentCache
from .functional import absorb, latent_attention
from .layers import Linear, RMSNorm
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
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        kv = self.kv_a_proj_with_mqa(x)
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
            attend = getattr(cache, "attend", None)  # a paged decode kernel over the cache (the engine's, on CUDA)
            if attend is not None and not self.track_max_logits:
                out = self._attend_kernel(q_nope, q_pe, attend)
            else:
                out = self._attend_latent(q_nope, q_pe, *cache.read(self.layer_idx))
        return self.o_proj(out.flatten(2).to(x.dtype))

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

    def _attend_kernel(self, q_nope: torch.Tensor, q_pe: torch.Tensor, attend) -> torch.Tensor:
        """The absorbed form with the cache's kernel for sum_t p_t c_kv_t: q_lat = W_UK^T q_nope, out = W_UV o_lat."""
        B, S, H, _ = q_nope.shape
        w_uk, w_uv_t = absorb(self.kv_b_proj.weight, self.n_heads, self.qk_nope_head_dim)
        q_lat = torch.einsum("bshn,hnc->bshc", q_nope.float(), w_uk)
        o_lat = attend(self.layer_idx, q_lat.flatten(0, 1), q_pe.flatten(0, 1).float(), self.softmax_scale)
        return torch.einsum("bshc,hcv->bshv", o_lat.view(B, S, H, -1).float(), w_uv_t)

    def _attend_latent(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_all: torch.Tensor, kpe_all: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Absorbed attention over the cache: c_all [B, T, C], kpe_all [B, T, rope], mask [B, S, T] -> [B, S, H, v]."""
        w_uk, w_uv_t = absorb(float_weight(self.kv_b_proj), self.n_heads, self.qk_nope_head_dim)
        out, scores = latent_attention(q_nope, q_pe, c_all, kpe_all, mask, w_uk, w_uv_t, self.softmax_scale)
        if self.track_max_logits:
            self.max_logits = scores.detach().amax(dim=(0, 1, 3))
        return out
