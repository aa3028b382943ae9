"""Expert parallelism over the data-parallel ranks (`kimi_k2.model.expert_parallel`): rank r keeps routed experts
[r E/W, (r+1) E/W) of every MoE block and dispatches its own tokens to their owners.
Attention, dense layers, shared experts, router and embeddings stay replicated (data parallel). Expert parameters keep
their global names (`experts.{e}`), so each rank's state dict is a slice of the full one.
Each expert's gradient arrives summed over every rank's loss; the trainer divides it by W to match DDP's average.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kimi_k2.model import expert_parallel as model_expert_parallel


def shard_experts(model: nn.Module, rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> list[str]:
    """Swap every MoE block of a K2ForCausalLM for its expert-parallel slice; return the local expert parameter names.

    The full model is built first and the other ranks' experts are dropped (memory is saved after, not during,
    construction).
    """
    model_expert_parallel.shard_experts(model, rank, world_size, group)
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
