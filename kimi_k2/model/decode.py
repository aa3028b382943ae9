"""Single-stream decode as one pure function of the weights, for `torch.compile` (inference only, fp32).

`DecodeStep` runs one token of one sequence through the whole model: x = embed(token); per layer the absorbed MLA
over the sequence's cached latents (read from the engine's page pool through its page ids, keys past its length
masked) plus this token's own, then the dense MLP or the MoE; the final norm; lm_head. No shape depends on data (the
k routed experts are read by index from stacked [E, ...] copies), and every size is fixed except the number of pages
and the pool's size, so torch.compile makes one graph for all context lengths. Dense matrix-vector products are
`x [1, in] @ W^T` (BLAS calls in the graph, on the pre-transposed copies the eager path caches too); the experts'
and attention's small products are (W * x).sum(-1) reductions that inductor fuses with the ops around them.
The math is `MLA` (latent path), `MoE` / `Gate` (one token) and `MLP` of the eager model, op for op in fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import K2Config
from .layers import derived, fused_t
from .moe import MoE

DecodeWeights = dict[str, Any]  # {"embed", "norm", "lm_head_t", "inv_freq", "layers": [per-layer dict of tensors]}

# stacked copies of the routed experts (the one extra memory this path needs) are made up to this many bytes
STACK_MAX_BYTES = 256 * 2**20


def _mv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w [..., out, in] @ x [..., in] -> [..., out]."""
    return (w * x.unsqueeze(-2)).sum(-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., d] interleaved pairs (x0 + j x1) rotated by cos + j sin [d/2]."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def _lin(x: torch.Tensor, wt: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, in] @ wt [in, out] (+ bias) -> [1, out]: a matrix-vector product for the BLAS (an extern kernel)."""
    y = x @ wt
    return y if bias is None else y + bias


class DecodeStep:
    """step(weights, token, position, pages, kv) for one model config and page size (Python constants).

    kv [L, num_pages * page_size, kv_lora_rank + qk_rope_head_dim] is the engine's latent page pool: row
    page * page_size + offset holds one token's [c_kv | k_pe]. token [1] int64; position: 0-d int64, the number of
    tokens of the sequence already in kv, held by the pages [P] int64 in order (P * page_size > position; keys at
    positions >= position are masked). Returns fp32 logits [1, vocab] and this token's latents [L, C + R], for the
    caller to store at the token's slot; kv is not written.
    """

    def __init__(self, config: K2Config, attention_factor: float, page_size: int) -> None:
        c = config
        self.page_size = page_size
        self.eps, self.scale, self.attention_factor = c.rms_norm_eps, c.softmax_scale, attention_factor
        self.n_heads, self.nope, self.rope, self.v_dim = (c.num_attention_heads, c.qk_nope_head_dim,
                                                          c.qk_rope_head_dim, c.v_head_dim)
        self.kv_lora_rank, self.q_lora = c.kv_lora_rank, c.q_lora_rank is not None
        self.q_dim = c.q_lora_rank if self.q_lora else c.num_attention_heads * c.qk_head_dim
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.sigmoid, self.group_by_top2 = c.scoring_func == "sigmoid", c.topk_method == "noaux_tc"
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor

    def __call__(self, w: DecodeWeights, token: torch.Tensor, position: torch.Tensor, pages: torch.Tensor,
                 kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = w["embed"][token]  # [1, D]: vectors keep a leading 1, so the BLAS gets plain row-major operands
        freqs = position.float() * w["inv_freq"]  # [rope/2]
        cos, sin = freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
        offsets = torch.arange(self.page_size, device=pages.device)
        slots = (pages[:, None] * self.page_size + offsets).flatten()  # [T = P * page_size]
        masked = torch.arange(slots.shape[0], device=pages.device) >= position  # [T]: not cached yet
        latents = []
        for i, lw in enumerate(w["layers"]):
            out, latent = self._mla(lw, _rms_norm(x, lw["input_norm"], self.eps), cos, sin, kv[i][slots], masked)
            x = x + out
            h = _rms_norm(x, lw["post_norm"], self.eps)
            x = x + (self._moe(lw, h) if "router_t" in lw else self._mlp(lw["gate_up_t"], lw["down_t"], h))
            latents.append(latent)
        return _lin(_rms_norm(x, w["norm"], self.eps), w["lm_head_t"]), torch.cat(latents)

    def _mla(self, w: dict[str, torch.Tensor], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             cached: torch.Tensor, masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [1, D], cached [T, C + R], masked [T] -> attention output [1, D], this token's [c_kv | k_pe] [1, C + R]."""
        H, C = self.n_heads, self.kv_lora_rank
        q, kv = _lin(x, w["x_proj_t"], w.get("x_proj_bias")).split_with_sizes([self.q_dim, C + self.rope], dim=-1)
        if self.q_lora:
            q = _lin(_rms_norm(q, w["q_a_norm"], self.eps), w["q_b_t"])
        q_nope, q_pe = q.view(H, -1).split_with_sizes([self.nope, self.rope], dim=-1)
        q_pe = _rope(q_pe, cos, sin)  # [H, R]
        c_kv, k_pe = kv.split_with_sizes([C, self.rope], dim=-1)
        c_kv, k_pe = _rms_norm(c_kv, w["kv_a_norm"], self.eps), _rope(k_pe, cos, sin)  # [1, C], [1, R]
        kv_b = w["kv_b"].view(H, self.nope + self.v_dim, C)
        q_lat = (q_nope.unsqueeze(-1) * kv_b[:, : self.nope]).sum(1)  # W_UK^T q_nope: [H, C]
        # logit = scale * (q_lat . c_kv + q_pe . k_pe), over the cached tokens and this one
        scores = torch.cat([(_mv(cached[:, :C], q_lat) + _mv(cached[:, C:], q_pe)).masked_fill(masked, -torch.inf),
                            (q_lat * c_kv).sum(-1, keepdim=True) + (q_pe * k_pe).sum(-1, keepdim=True)], dim=-1)
        probs = (scores * self.scale).softmax(dim=-1)  # [H, T + 1]
        o_lat = probs[:, :-1] @ cached[:, :C] + probs[:, -1:] * c_kv  # [H, C]
        out = _mv(kv_b[:, self.nope :], o_lat)  # W_UV o_lat: [H, v]
        return _lin(out.reshape(1, -1), w["o_t"], w.get("o_bias")), torch.cat([c_kv, k_pe], dim=-1)

    @staticmethod
    def _mlp(gate_up_t: torch.Tensor, down_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU through the BLAS: gate_up_t [D, 2I] ([gate; up] transposed), down_t [I, D], x [1, D] -> [1, D]."""
        gate, up = _lin(x, gate_up_t).chunk(2, dim=-1)
        return _lin(F.silu(gate) * up, down_t)

    def _moe(self, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """`Gate` + `MoE` for one token: x [1, D] -> [1, D]."""
        logits = _lin(x, w["router_t"])[0]  # [E]
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)
        biased = scores + w["router_bias"]
        if self.n_group > 1:
            grouped = biased.view(self.n_group, -1)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1) if self.group_by_top2 \
                else grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).index_fill(0, keep, False)
            biased = grouped.masked_fill(dropped[:, None], float("-inf")).flatten()
        ids = biased.topk(self.top_k).indices  # [k]
        weights = scores[ids]
        if self.norm_topk_prob:
            weights = weights / (weights.sum() + 1e-20)
        # the k experts as reductions over their rows of the stacked copies (no gathered copy of the weights)
        gate, up = _mv(w["experts_gate_up"][ids], x).chunk(2, dim=-1)  # [k, I]
        routed = _mv(w["experts_down"][ids], F.silu(gate) * up)  # [k, D]
        y = (weights[:, None] * self.routed_scaling_factor * routed).sum(0, keepdim=True)
        return y + self._mlp(w["shared_gate_up_t"], w["shared_down_t"], x)


def _stacked_experts(moe: MoE) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, 2I, D] ([gate; up] per expert) and [E, D, I] copies of the routed experts, cached until one changes."""
    sources = [t for e in moe.experts for t in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in moe.experts])
        return gate_up, torch.stack([e.down_proj.weight for e in moe.experts])

    return derived(moe, "_stacked_experts", sources, build)  # type: ignore[return-value]


def check_decode_model(model: nn.Module) -> None:
    """Raise ValueError if `DecodeStep` cannot serve `model` (it supports plain fp32 K2ForCausalLM models)."""
    dtype = model.lm_head.weight.dtype
    if dtype != torch.float32:
        raise ValueError(f"compiled decode supports float32 models only, this one is {dtype}")
    stacked = 0
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        if hasattr(mlp, "experts") and not isinstance(mlp, MoE):
            raise ValueError(f"compiled decode needs plain MoE layers; layer {i} is {type(mlp).__name__}")
        if isinstance(mlp, MoE):
            stacked += sum(p.nbytes for p in mlp.experts.parameters())
    if stacked > STACK_MAX_BYTES:
        raise ValueError(f"compiled decode keeps stacked copies of the routed experts: {stacked / 2**20:.0f} MiB "
                         f"exceeds STACK_MAX_BYTES = {STACK_MAX_BYTES / 2**20:.0f} MiB")


def decode_weights(model: nn.Module) -> DecodeWeights:
    """The tensors `DecodeStep` reads: the model's own, and the transposed / fused / stacked copies of them that the
    eager inference path also uses (`fused_t`, shared with it through `derived`) plus the stacked routed experts."""
    layers = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        first = attn.q_proj if attn.q_lora_rank is None else attn.q_a_proj
        x_proj_t, x_proj_bias = fused_t(attn, "_x_proj_t", first, attn.kv_a_proj_with_mqa)
        w = {"input_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight,
             "x_proj_t": x_proj_t, "kv_a_norm": attn.kv_a_layernorm.weight, "kv_b": attn.kv_b_proj.weight}
        w["o_t"], o_bias = fused_t(attn, "_o_t", attn.o_proj)
        w.update({k: v for k, v in (("x_proj_bias", x_proj_bias), ("o_bias", o_bias)) if v is not None})
        if attn.q_lora_rank is not None:
            w.update(q_a_norm=attn.q_a_layernorm.weight, q_b_t=fused_t(attn, "_q_b_t", attn.q_b_proj)[0])
        if isinstance(mlp, MoE):
            gate, shared = mlp.gate, mlp.shared_experts
            w.update(router_t=derived(gate, "_w_t", [gate.weight], lambda g=gate: g.weight.float().t().contiguous()),
                     router_bias=gate.e_score_correction_bias,
                     shared_gate_up_t=fused_t(shared, "_gate_up_t", shared.gate_proj, shared.up_proj)[0],
                     shared_down_t=fused_t(shared, "_down_t", shared.down_proj)[0])
            w["experts_gate_up"], w["experts_down"] = _stacked_experts(mlp)
        else:
            w.update(gate_up_t=fused_t(mlp, "_gate_up_t", mlp.gate_proj, mlp.up_proj)[0],
                     down_t=fused_t(mlp, "_down_t", mlp.down_proj)[0])
        layers.append(w)
    m = model.model
    return {"embed": m.embed_tokens.weight, "norm": m.norm.weight, "lm_head_t": model.lm_head.weight.t(),
            "inv_freq": m.rotary.inv_freq, "layers": layers}
