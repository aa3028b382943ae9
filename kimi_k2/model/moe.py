"""DeepSeek-V3 MoE: the aux-loss-free router (noaux_tc), routed SwiGLU experts and the shared experts.

Router (DeepSeek-V3 `inference/model.py` `Gate`, HF `DeepseekV3TopkRouter`):
    s = sigmoid(W_g x)  (fp32; softmax for scoring_func="softmax"),   b = e_score_correction_bias
    selection on s + b: per group, score = sum of its top-2 biased scores; keep topk_group groups, set the other
    groups to -inf (the reference; transformers 4.57 sets them to 0, which lets a masked expert win when b < 0);
    take the top num_experts_per_tok experts.
    weights = s of the chosen experts (b is for selection only), / their sum if norm_topk_prob, * routed_scaling_factor.
Output: sum_k w_k * expert_k(x) + shared_experts(x).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import K2Config
from .functional import route, routed_mixture
from .layers import MLP


class Gate(nn.Module):
    def __init__(self, config: K2Config) -> None:
        super().__init__()
        assert config.n_routed_experts is not None and config.num_experts_per_tok is not None
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.scoring_func = config.scoring_func
        self.group_by_top2 = config.topk_method == "noaux_tc"
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, std=config.initializer_range)
        self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Gate:
        """Keep the correction bias fp32 through `.to(dtype)`, as the checkpoint stores it."""
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if new.dtype != torch.float32:
            self.e_score_correction_bias = (new if bias.is_meta or new.is_meta else bias.to(new.device)).float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> weights [N, k] fp32, expert ids [N, k], scores [N, E] fp32 (unbiased, for the balance loss)."""
        return route(F.linear(x.float(), self.weight.float()), self.e_score_correction_bias, self.top_k, self.n_group,
                     self.topk_group, self.group_by_top2, self.scoring_func == "sigmoid", self.norm_topk_prob,
                     self.routed_scaling_factor)


class Experts(nn.ModuleList):
    """The routed SwiGLU experts (`experts.{e}` in checkpoints)."""

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows of x [P, D] grouped by expert in expert order, counts [E] rows per expert -> expert outputs [P, D]."""
        out, start = torch.empty_like(x), 0
        for e, n in enumerate(counts.tolist()):
            if n:
                out[start : start + n] = self[e](x[start : start + n])
                start += n
        return out


class MoE(nn.Module):
    def __init__(self, config: K2Config) -> None:
        super().__init__()
        assert config.n_routed_experts is not None and config.num_experts_per_tok is not None
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.aux_loss_alpha = config.aux_loss_alpha if config.seq_aux else 0.0
        self.gate = Gate(config)
        self.experts = Experts(MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(self.n_experts))
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * (config.n_shared_experts or 1))
        self.last_expert_load: torch.Tensor | None = None  # [E] int64: tokens routed to each expert, last forward
        self.aux_loss: torch.Tensor | None = None  # sequence-wise balance loss of the last training forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]."""
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices, scores = self.gate(flat)
        ids = indices.flatten()  # [N*k]
        # a count per expert without torch.bincount, which reads max(ids) on the host on CUDA (no CUDA graphs then)
        self.last_expert_load = ids.new_zeros(self.n_experts).index_add_(0, ids, torch.ones_like(ids)).detach()
        y = routed_mixture(flat, weights, indices, lambda rows, _: self.experts(rows, self.last_expert_load))
        self.aux_loss = self._balance_loss(scores.view(B, S, -1), indices.view(B, S, -1)) \
            if self.training and self.aux_loss_alpha > 0 else None
        return y.view(B, S, D).to(x.dtype) + self.shared_experts(x)

    def _balance_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return balance_loss(scores, indices, self.n_experts, self.top_k, self.aux_loss_alpha)


def balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_experts: int, top_k: int, alpha: float
                 ) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch.

    scores [B, T, E] (router scores s), indices [B, T, k] (chosen experts);
    f_i = E / (k T) * #tokens of the sequence routed to i;  P_i = mean_t s'_{t,i},  s' = s / sum_j s_j.
    """
    B, T, _ = scores.shape
    load = torch.zeros(B, n_experts, device=scores.device).scatter_add_(
        1, indices.reshape(B, -1), torch.ones(B, T * top_k, device=scores.device))
    f = load * (n_experts / (top_k * T))
    p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
    return alpha * (f * p).sum(dim=-1).mean()
