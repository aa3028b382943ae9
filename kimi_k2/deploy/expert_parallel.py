"""Expert parallelism (EP) with torch.distributed: rank r of W holds routed experts [r*E/W, (r+1)*E/W) of every MoE
layer; the rest (embeddings, dense MLP, router, shared expert, lm_head) is replicated, and MLA attention is either
replicated or split by heads over the same ranks (`tensor_parallel.py`).

All ranks see the same tokens (the DistributedRunner feeds every rank the same step, and attention, replicated or
all-reduced, leaves every rank the whole hidden state), so each rank dispatches only its 1/W slice of the tokens and
the slices are all-gathered after the MoE:
    route (replicated gate) -> pairs (token, expert) of my slice, sorted by expert, hence by owning rank
    all_to_all split sizes, then all_to_all tokens + expert ids -> owners run their experts on what they received
    all_to_all results back -> y_t = sum_k w_tk * expert_k(x_t) (fp32, as `MoE`) -> all_gather slices -> + shared(x)
Each rank reads only its own tensors from the checkpoint (through the index and `CheckpointReader`, memory-mapped).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from kimi_k2.checkpoint import CheckpointReader
from kimi_k2.config import K2Config
from kimi_k2.deploy.loading import load_present
from kimi_k2.deploy.tensor_parallel import shard_attention
from kimi_k2.model import K2ForCausalLM
from kimi_k2.model.layers import MLP
from kimi_k2.model.moe import MoE


def expert_range(n_experts: int, rank: int, world: int) -> range:
    """The global ids of the experts rank `rank` of `world` owns."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of size {world}")
    if n_experts % world:
        raise ValueError(f"n_routed_experts={n_experts} is not divisible by the expert-parallel world size {world}")
    per = n_experts // world
    return range(rank * per, (rank + 1) * per)


class EPMoE(nn.Module):
    """A MoE layer whose routed experts are spread over the ranks of `group`; same checkpoint names as `MoE`."""

    def __init__(self, moe: MoE, rank: int, world: int, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        self.n_experts, self.top_k = moe.n_experts, moe.top_k
        self.rank, self.world, self.group = rank, world, group
        self.local = expert_range(self.n_experts, rank, world)
        self.gate = moe.gate
        dim, inter = moe.shared_experts.gate_proj.in_features, moe.experts[0].gate_proj.out_features
        with torch.device(moe.gate.weight.device):
            # keyed by global id, so state_dict names are the checkpoint's `mlp.experts.{e}.*`
            self.experts = nn.ModuleDict({str(e): MLP(dim, inter) for e in self.local})
        self.shared_experts = moe.shared_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], identical on every rank -> [B, S, D]."""
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        N = flat.shape[0]
        chunk = -(-N // self.world)
        mine = flat[self.rank * chunk : (self.rank + 1) * chunk]  # [n, D], n <= chunk
        y = self._dispatch_combine(mine)  # [n, D] fp32
        y = torch.cat([y, y.new_zeros(chunk - y.shape[0], D)])
        parts = [torch.empty_like(y) for _ in range(self.world)]
        dist.all_gather(parts, y, group=self.group)
        y = torch.cat(parts)[:N]
        return y.to(x.dtype).view(B, S, D) + self.shared_experts(x)

    def _dispatch_combine(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, D] -> sum_k w_k expert_k(x) [n, D] fp32, experts computed on their owning ranks."""
        weights, indices, _ = self.gate(x)  # [n, k]
        ids = indices.flatten()  # [n*k]
        order = ids.argsort(stable=True)
        ids_sorted, token_of = ids[order], order // self.top_k
        per_rank = self.n_experts // self.world
        send_counts = torch.bincount(ids_sorted // per_rank, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        x_recv = x.new_empty(sum(recv), x.shape[1])
        dist.all_to_all_single(x_recv, x[token_of].contiguous(), recv, send, group=self.group)
        e_recv = ids.new_empty(sum(recv))
        dist.all_to_all_single(e_recv, ids_sorted, recv, send, group=self.group)
        y_recv = torch.empty_like(x_recv)
        for e in e_recv.unique().tolist():
            rows = (e_recv == e).nonzero().squeeze(1)
            y_recv[rows] = self.experts[str(e)](x_recv[rows])
        y_back = x.new_empty(ids.shape[0], x.shape[1])
        dist.all_to_all_single(y_back, y_recv, send, recv, group=self.group)
        w_sorted = weights.flatten()[order]
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return y.index_add_(0, token_of, (y_back * w_sorted[:, None]).float())


def shard_experts(
    model: K2ForCausalLM, rank: int, world: int, group: dist.ProcessGroup | None = None
) -> K2ForCausalLM:
    """Replace every `MoE` of `model` (best built on the meta device) by an `EPMoE` holding rank's experts."""
    config: K2Config = model.config
    if config.n_routed_experts is not None:
        expert_range(config.n_routed_experts, rank, world)  # validates before anything changes
    for block in model.model.layers:
        if isinstance(block.mlp, MoE):
            block.mlp = EPMoE(block.mlp, rank, world, group)
    return model


def load_expert_parallel(
    directory: str | os.PathLike[str], rank: int, world: int, dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu", group: dist.ProcessGroup | None = None, tp_attention: bool = False,
) -> tuple[K2ForCausalLM, list[str]]:
    """Rank `rank`'s part of the checkpoint in `directory` -> (model, names of the tensors it read).

    tp_attention: also split MLA by heads over the same ranks (`tensor_parallel.TPMLA`) instead of replicating it.
    """
    reader = CheckpointReader(directory)
    config = K2Config.from_pretrained(directory)
    with torch.device("meta"):
        model = shard_experts(K2ForCausalLM(config), rank, world, group)
        slices = shard_attention(model, rank, world, group) if tp_attention else {}
    names = load_present(model, reader, dtype, device, slices)
    return model.eval(), names
