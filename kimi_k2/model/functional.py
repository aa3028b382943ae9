"""The model's math as plain functions, one place per formula: the modules (layers.py, attention.py, moe.py) and the
compiled single-stream decode (decode.py) both call these. Rotary embedding lives in rope.py.

    rms_norm:          y = w * x / sqrt(mean(x^2) + eps)                        (fp32 inside, as HF DeepseekV3)
    swiglu:            silu(gate) * up
    route:             DeepSeek-V3 aux-loss-free router (`Gate`), see moe.py
    routed_mixture:    sum_k w_k expert_{id_k}(x), each expert run once over the rows routed to it, see moe.py
    expert_mlp:        SwiGLU experts read by id from [E, 2I, D] gate|up and [E, D, I] down stacks
    latent_attention:  absorbed MLA over a latent cache, see attention.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..ops.quantize import linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalized in fp32 and cast back before the weight (HF DeepseekV3RMSNorm)."""
    if x.dtype == torch.float32 == weight.dtype:
        return F.rms_norm(x, weight.shape, weight, eps)  # one kernel, the same math in fp32
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def route(
    logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1,
    group_by_top2: bool = True, sigmoid: bool = True, norm_topk_prob: bool = True, scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [N, E] (fp32), correction bias [E] -> (weights [N, k] fp32, expert ids [N, k], scores [N, E]).

    s = sigmoid(logits) (softmax for scoring_func="softmax"); experts are chosen on s + bias, per group scored by the
    sum of its top-2 (noaux_tc) or its max, the groups outside the best topk_group set to -inf; weights are the
    chosen s (bias only selects), / their sum if norm_topk_prob, * routed_scaling_factor.
    """
    scores = logits.sigmoid() if sigmoid else logits.softmax(dim=-1)
    with torch.no_grad():
        biased = scores + bias
        if n_group > 1:
            grouped = biased.unflatten(-1, (n_group, -1))  # [N, G, E/G]
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1) if group_by_top2 \
                else grouped.amax(dim=-1)
            keep = group_scores.topk(topk_group, dim=-1).indices  # [N, topk_group]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(-1, keep, False)
            biased = grouped.masked_fill(dropped[..., None], float("-inf")).flatten(-2)
        indices = biased.topk(top_k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, indices, scores


def routed_mixture(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """x [N, D], router weights / expert ids [N, k] -> sum_k weights[:, k] * expert_{ids[:, k]}(x) [N, D] (fp32).

    The (token, slot) pairs are sorted by expert (stable), so experts(rows [N*k, D], their expert ids [N*k], sorted)
    runs each expert once on all of its rows; its outputs go back to (token, slot) order by a permutation.
    """
    N, k = ids.shape
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    out = experts(x[order // k], flat[order])
    routed = torch.empty_like(out).index_copy_(0, order, out)
    return torch.bmm(weights.unsqueeze(1), routed.view(N, k, -1).float()).squeeze(1)


def expert_mlp(x: torch.Tensor, ids: torch.Tensor, gate_up: tuple[torch.Tensor, torch.Tensor | None],
               down: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """SwiGLU experts by id: x [P, D] (row i for expert ids[i]); gate_up = (W [E, 2I, D], scales or None),
    down = (W [E, D, I], scales or None), weights in any `kimi_k2.ops.quantize.linear` format -> [P, D] fp32."""
    return linear(swiglu(*linear(x, *gate_up, ids).chunk(2, dim=-1)), *down, ids)


def absorb(kv_b_weight: torch.Tensor, n_heads: int, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj.weight [H * (nope + v), C] -> W_UK [H, nope, C] and W_UV^T [H, C, v], fp32 views (no copy in fp32)."""
    w = kv_b_weight.float().view(n_heads, -1, kv_b_weight.shape[-1])
    return w[:, :nope], w[:, nope:].transpose(1, 2)


def latent_attention(
    q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, mask: torch.Tensor,
    w_uk: torch.Tensor, w_uv_t: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA in fp32: q_nope [B, S, H, nope], q_pe [B, S, H, R], c_kv [B, T, C], k_pe [B, T, R], additive mask
    [B, S, T] -> (out [B, S, H, v], pre-softmax logits [B, S, H, T]).

        logit = scale * ((W_UK^T q_nope) . c_kv + q_pe . k_pe),   out = W_UV (sum_t p_t c_kv_t)
    """
    B, S, H, _ = q_nope.shape
    c_kv, k_pe, q_nope, q_pe = c_kv.float(), k_pe.float(), q_nope.float(), q_pe.float()
    if torch.compiler.is_compiling():  # as broadcast reductions, which inductor fuses with the ops around them
        q_lat = (q_nope.unsqueeze(-1) * w_uk).sum(-2)  # [B, S, H, C]
        scores = ((q_lat.unsqueeze(-2) * c_kv[:, None, None]).sum(-1)
                  + (q_pe.unsqueeze(-2) * k_pe[:, None, None]).sum(-1)) * scale + mask[:, :, None, :]
        o_lat = (scores.softmax(dim=-1).unsqueeze(-1) * c_kv[:, None, None]).sum(-2)  # [B, S, H, C]
        return (o_lat.unsqueeze(-1) * w_uv_t).sum(-2), scores
    q_lat = torch.bmm(q_nope.reshape(B * S, H, -1).transpose(0, 1), w_uk)  # [H, B*S, C]
    q_lat = q_lat.transpose(0, 1).reshape(B, S * H, -1)
    # scale * (q_pe . k_pe + q_lat . c): one bmm into the other
    scores = torch.baddbmm(torch.bmm(q_pe.reshape(B, S * H, -1), k_pe.transpose(1, 2)),
                           q_lat, c_kv.transpose(1, 2), beta=scale, alpha=scale)
    scores = scores.view(B, S, H, -1) + mask[:, :, None, :]  # [B, S, H, T]
    probs = scores.softmax(dim=-1)
    o_lat = torch.bmm(probs.view(B, S * H, -1), c_kv)  # [B, S*H, C]
    out = torch.bmm(o_lat.view(B * S, H, -1).transpose(0, 1), w_uv_t)  # [H, B*S, v]
    return out.transpose(0, 1).reshape(B, S, H, -1), scores
