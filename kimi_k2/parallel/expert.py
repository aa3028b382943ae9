"""Expert parallelism: rank r of W keeps routed experts [r E/W, (r+1) E/W) of every MoE block (E % W == 0); the
router and the shared expert stay replicated. Used by training (data parallel + EP) and inference (`serve --ep`).

Per forward (DeepSeek-V3 / GShard dispatch and combine):
    route the local tokens, sort the (token, slot) pairs by expert -- hence by owning rank, since ranges are contiguous
    all_to_all the per-expert counts, then the hidden states (autograd-aware: backward is the reverse all_to_all)
    run each local expert once over all rows it received, all_to_all the outputs back
    y_t = sum_k w_tk expert_k(x_t) (fp32, as `MoE`) + shared(x_t)
Two ways to feed it:
- training (data parallel): every rank has its own tokens and dispatches all of them; each local expert's gradient
  arrives summed over every rank's loss (the trainer divides it by W to match DDP's average);
- inference (`same_input=True`): every rank holds the same tokens (replicated or head-parallel attention), so each
  dispatches only its 1/W slice and the slices are all-gathered afterwards.
Expert modules keep their global names (`experts.{e}`), so a rank's state dict is a slice of the full checkpoint's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from kimi_k2.model.moe import MoE, balance_loss


def expert_range(n_experts: int, rank: int, world: int) -> range:
    """The global ids of the experts rank `rank` of `world` owns."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of size {world}")
    if n_experts % world:
        raise ValueError(f"n_routed_experts={n_experts} is not divisible by the expert-parallel world size {world}")
    per = n_experts // world
    return range(rank * per, (rank + 1) * per)


class LocalExperts(nn.ModuleDict):
    """A rank's routed experts, keyed by global id (so their parameters keep the checkpoint's names), run as one
    module: one call per MoE forward whatever the routing, which is what FSDP2 needs to gather (and reduce) them as
    one unit on every rank that holds them."""

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [n, D], rows grouped by local expert in id order, counts[j] rows for the j-th -> outputs [n, D]."""
        outs, start = [], 0
        for expert, n in zip(self.values(), counts, strict=True):
            if n:
                outs.append(expert(x[start : start + n]))
                start += n
        return torch.cat(outs) if outs else x


class ExpertParallelMoE(nn.Module):
    def __init__(self, moe: MoE, rank: int, world: int, group: dist.ProcessGroup | None = None,
                 same_input: bool = False) -> None:
        super().__init__()
        self.local = expert_range(moe.n_experts, rank, world)
        self.n_experts, self.top_k, self.aux_loss_alpha = moe.n_experts, moe.top_k, moe.aux_loss_alpha
        self.rank, self.world, self.group, self.same_input = rank, world, group, same_input
        self.gate = moe.gate
        self.experts = LocalExperts({str(e): moe.experts[e] for e in self.local})
        self.shared_experts = moe.shared_experts
        self.last_expert_load: torch.Tensor | None = None  # [E]: this rank's tokens per expert, last forward
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]; every rank of the group must call it the same number of times."""
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        if not self.same_input:
            y, indices, scores = self._dispatch_combine(flat)
            self.aux_loss = balance_loss(scores.view(B, S, -1), indices.view(B, S, -1), self.n_experts, self.top_k,
                                         self.aux_loss_alpha) if self.training and self.aux_loss_alpha > 0 else None
        else:
            N = flat.shape[0]
            chunk = -(-N // self.world)
            y = self._dispatch_combine(flat[self.rank * chunk : (self.rank + 1) * chunk])[0]
            y = torch.cat([y, y.new_zeros(chunk - y.shape[0], D)])
            parts = [torch.empty_like(y) for _ in range(self.world)]
            dist.all_gather(parts, y, group=self.group)
            y = torch.cat(parts)[:N]
        return y.to(x.dtype).view(B, S, D) + self.shared_experts(x)

    def _group(self) -> dist.ProcessGroup:
        return self.group if self.group is not None else dist.group.WORLD

    def _dispatch_combine(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [n, D] -> (sum_k w_k expert_k(x) [n, D] fp32, expert ids [n, k], router scores [n, E])."""
        W, El = self.world, len(self.local)
        weights, indices, scores = self.gate(x)
        ids = indices.flatten()  # [n*k]
        counts = torch.bincount(ids, minlength=self.n_experts)  # [E]
        self.last_expert_load = counts.detach()
        order = ids.argsort(stable=True)
        token_of = order // self.top_k
        if W == 1:  # every expert is local (FSDP2 without expert parallelism): no exchange
            out = self.experts(x[token_of], counts.tolist())
            y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
            y.index_add_(0, token_of, (out * weights.flatten()[order][:, None]).float())
            return y, indices, scores
        # recv_counts.view(W, El)[s, j]: rows rank s sends to this rank's local expert j
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send_splits = counts.view(W, El).sum(dim=1).tolist()
        recv_splits = recv_counts.view(W, El).sum(dim=1).tolist()
        recv = funcol.all_to_all_single_autograd(x[token_of], recv_splits, send_splits, self._group())
        # rows arrive by source rank, then by expert: regroup by expert, run each once, restore the arrival order
        expert_of = torch.repeat_interleave(torch.arange(El, device=x.device).repeat(W), recv_counts)
        perm = expert_of.argsort(stable=True)
        out = self.experts(recv[perm], torch.bincount(expert_of, minlength=El).tolist())[perm.argsort()]
        back = funcol.all_to_all_single_autograd(out, send_splits, recv_splits, self._group())
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        y.index_add_(0, token_of, (back * weights.flatten()[order][:, None]).float())
        return y, indices, scores


def shard_experts(model: nn.Module, rank: int, world: int, group: dist.ProcessGroup | None = None,
                  same_input: bool = False) -> list[str]:
    """Replace every `MoE` of a K2ForCausalLM by rank's `ExpertParallelMoE` -> the names of its expert parameters.

    Built on the meta device (inference: load after sharding, `load_expert_parallel`), nothing of the other ranks'
    experts is ever allocated; a materialized model (training) drops them here.
    """
    n_experts = model.config.n_routed_experts
    if n_experts is not None:
        expert_range(n_experts, rank, world)  # validates before anything changes
    for block in model.model.layers:
        if isinstance(block.mlp, MoE):
            block.mlp = ExpertParallelMoE(block.mlp, rank, world, group, same_input)
    return [name for name, _ in model.named_parameters() if ".mlp.experts." in name]


def gather_full_state_dict(model: nn.Module, group: dist.ProcessGroup | None = None
                           ) -> dict[str, torch.Tensor] | None:
    """On the group's first rank, the full state dict (every rank's experts merged in); None on the other ranks."""
    local = {k: v.detach().cpu() for k, v in model.state_dict().items() if ".mlp.experts." in k}
    first = dist.get_rank(group) == 0
    parts: list[dict[str, torch.Tensor]] | None = [{} for _ in range(dist.get_world_size(group))] if first else None
    dist.gather_object(local, parts, group=group, group_dst=0)
    if parts is None:
        return None
    full = dict(model.state_dict())
    for p in parts:
        full.update(p)
    return full
