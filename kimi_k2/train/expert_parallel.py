"""Expert parallelism over the data-parallel ranks: rank r keeps routed experts [r E/W, (r+1) E/W) of every MoE block.

Per MoE forward (DeepSeek-V3 / GShard style dispatch and combine):
  route every local token (the gate is replicated), sort the (token, slot) pairs by expert: they are then grouped by
  owner rank, since each rank owns a contiguous range of experts
  all-to-all the per-expert counts, then the hidden states (autograd-aware: backward is the reverse all-to-all)
  run each local expert once over all rows it received, all-to-all the outputs back, weight them and index_add.
Attention, dense layers, shared experts, router and embeddings stay replicated (data parallel). Expert parameters keep
their global names (`experts.{e}`), so each rank's state dict is a slice of the full one.
Each expert's gradient arrives summed over every rank's loss; the trainer divides it by W to match DDP's average.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from kimi_k2.model.moe import MoE


class ExpertParallelMoE(nn.Module):
    def __init__(self, moe: MoE, rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if moe.n_experts % world_size:
            raise ValueError(f"{moe.n_experts} routed experts do not split evenly over {world_size} ranks")
        self.n_experts, self.top_k, self.aux_loss_alpha = moe.n_experts, moe.top_k, moe.aux_loss_alpha
        self.rank, self.world_size, self.group = rank, world_size, group
        self.n_local = moe.n_experts // world_size
        self.first = rank * self.n_local
        self.gate = moe.gate
        self.experts = nn.ModuleDict({str(e): moe.experts[e] for e in range(self.first, self.first + self.n_local)})
        self.shared_experts = moe.shared_experts
        self.last_expert_load: torch.Tensor | None = None  # [E]: this rank's tokens per expert, last forward
        self.aux_loss: torch.Tensor | None = None

    _balance_loss = MoE._balance_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; every rank of the group must call it the same number of times."""
        B, S, D = x.shape
        W, El = self.world_size, self.n_local
        flat = x.reshape(-1, D)
        weights, indices, scores = self.gate(flat)
        ids = indices.flatten()  # [N*k]
        counts = torch.bincount(ids, minlength=self.n_experts)  # [E]
        self.last_expert_load = counts.detach()
        order = ids.argsort(stable=True)
        token_of = order // self.top_k
        send = flat[token_of]  # [N*k, D], grouped by expert, hence by owner rank
        # recv_counts.view(W, El)[s, j]: rows rank s sends to this rank's local expert j
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send_splits = counts.view(W, El).sum(dim=1).tolist()
        recv_splits = recv_counts.view(W, El).sum(dim=1).tolist()
        recv = dist_nn.all_to_all_single(flat.new_empty(sum(recv_splits), D), send, recv_splits, send_splits,
                                         group=self.group)
        # rows arrive by source rank, then by expert: regroup by expert, run each once, restore the arrival order
        expert_of = torch.repeat_interleave(torch.arange(El).repeat(W), recv_counts.cpu())
        perm = expert_of.argsort(stable=True)
        grouped = recv[perm]
        outs, start = [], 0
        for j, n in enumerate(torch.bincount(expert_of, minlength=El).tolist()):
            if n:
                outs.append(self.experts[str(self.first + j)](grouped[start : start + n]))
                start += n
        out = torch.cat(outs) if outs else grouped
        out = out[perm.argsort()]
        back = dist_nn.all_to_all_single(flat.new_empty(len(send), D), out, send_splits, recv_splits,
                                         group=self.group)
        w_sorted = weights.flatten()[order]
        y = torch.zeros(flat.shape, dtype=torch.float32, device=x.device)
        y.index_add_(0, token_of, (back * w_sorted[:, None]).float())
        self.aux_loss = self._balance_loss(scores.view(B, S, -1), indices.view(B, S, -1)) \
            if self.training and self.aux_loss_alpha > 0 else None
        return y.to(x.dtype).view(B, S, D) + self.shared_experts(x)


def shard_experts(model: nn.Module, rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> list[str]:
    """Swap every MoE block of a K2ForCausalLM for its expert-parallel slice; return the local expert parameter names.

    The full model is built first and the other ranks' experts are dropped (memory is saved after, not during,
    construction).
    """
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE):
            layer.mlp = ExpertParallelMoE(layer.mlp, rank, world_size, group)
    return [name for name, _ in model.named_parameters() if ".mlp.experts." in name]


def gather_full_state_dict(model: nn.Module, world_size: int, group: dist.ProcessGroup | None = None
                           ) -> dict[str, torch.Tensor] | None:
    """On rank 0, the full state dict (every rank's experts merged in); None on the other ranks."""
    local = {k: v.detach().cpu() for k, v in model.state_dict().items() if ".mlp.experts." in k}
    parts: list[dict[str, torch.Tensor]] | None = [{} for _ in range(world_size)] if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0, group=group)
    if parts is None:
        return None
    full = dict(model.state_dict())
    for p in parts:
        full.update(p)
    return full
