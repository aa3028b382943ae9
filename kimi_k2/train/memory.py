"""Per-rank training memory: the bytes of parameters, gradients and optimizer state a rank holds, counted from its
tensors' storages (FSDP2's padding included), against the arithmetic of the layout.

Logical total T = sum over parameters of numel * (parameter + gradient + optimizer-state bytes per element):
fp32 master 4 + fp32 gradient 4 + Muon momentum 4 or AdamW moments 8. A data-parallel rank holds T (minus the other
ranks' experts under expert parallelism); an FSDP2 rank holds T / N, plus, during the optimizer step, the whole
matrices it orthogonalizes (`ns_gathered`, U and O of about one largest Muon matrix, `kimi_k2.train.dist_muon`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor


@dataclass
class RankMemory:
    params: int  # bytes this rank holds
    grads: int
    optimizer: int
    ns_gathered: int  # whole matrices gathered for Newton-Schulz, at most at once
    total: int  # logical bytes of parameters + gradients + optimizer state of the whole model (all ranks)
    largest_matrix: int  # bytes of the largest Muon parameter in the NS dtype (U; O is as large)
    world: int

    @property
    def held(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def sharded_target(self) -> int:
        """total / N + one largest matrix's U and O: what an FSDP2 rank should hold at its peak."""
        return self.total // self.world + 2 * self.largest_matrix

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "held": self.held, "sharded_target": self.sharded_target}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def measure(model: nn.Module, optimizer: torch.optim.Optimizer, expert_names: list[str], ep: int,
            world: int) -> RankMemory:
    """Call after backward and the optimizer step, before the gradients are freed. `expert_names`: this rank's
    routed-expert parameters when the experts are split `ep` ways (each rank holds 1/ep of them)."""
    seen: set[int] = set()

    def held(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        s = _local(t).untyped_storage()
        if s.data_ptr() in seen:
            return 0
        seen.add(s.data_ptr())
        return s.nbytes()

    local = set(expert_names)
    names = {id(p): n for n, p in model.named_parameters()}
    params = grads = opt = total = largest = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            params += held(p)
            grads += held(p.grad)
            state = [v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
            opt += sum(held(v) for v in state)
            per_element = p.element_size() * (2 if p.requires_grad else 1) + sum(
                v.element_size() for v in state if v.shape == p.shape)
            total += p.numel() * per_element * (ep if names.get(id(p)) in local else 1)
            if group.get("use_muon"):  # NS gathers whole parameters
                largest = max(largest, p.numel() * group["ns_dtype"].itemsize)
    ns = getattr(getattr(optimizer, "ns_stats", None), "gathered_bytes", 0)
    return RankMemory(params, grads, opt, ns, total, largest, world)
