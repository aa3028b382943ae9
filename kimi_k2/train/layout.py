"""How a training run spreads the model over its ranks, from the recipe's [parallel] section and the torchrun world:

    one process                     the model as built
    data parallel (dp_shard = 1)    DDP replicas; train.expert_parallel: routed experts split over all ranks
    FSDP2 (dp_shard = N)            parameters, gradients and optimizer state sharded N ways (kimi_k2.parallel.fsdp),
                                    routed experts split over [parallel] ep ranks (all-to-all dispatch)
Gradient semantics are the same in all: the gradient of the global-batch mean loss, an expert no token reached in
the whole global batch has none (as in one process), and the norm clipped is the global one.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from kimi_k2.parallel import DistInfo, all_reduce_, shard_experts, wrap_data_parallel
from kimi_k2.parallel.fsdp import parallelize
from kimi_k2.parallel.world import TrainMesh, build_train_mesh
from kimi_k2.train.recipe import ParallelSection

EXPERT_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def resolve_param_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def uses_fsdp(parallel: ParallelSection, info: DistInfo) -> bool:
    return (info.world_size if parallel.dp_shard == -1 else parallel.dp_shard) > 1


class Layout:
    def __init__(self, model: nn.Module, parallel: ParallelSection, expert_parallel: bool, info: DistInfo) -> None:
        """Spread `model` (materialized, or on the meta device under FSDP2: sharded first, then materialized and
        loaded by the caller) over the ranks."""
        self.info, self.model = info, model
        dp_shard = info.world_size if parallel.dp_shard == -1 else parallel.dp_shard
        self.fsdp = uses_fsdp(parallel, info)
        self.mesh: TrainMesh | None = None
        self.param_dtype = torch.float32
        self.local_experts: list[str] = []  # this rank's routed-expert parameter names, when they are split
        if self.fsdp:
            self.mesh = build_train_mesh(info, dp_shard, parallel.ep)
            self.param_dtype = resolve_param_dtype(parallel.param_dtype, info.device)
            self.local_experts = parallelize(model, self.mesh, self.param_dtype, parallel.reshard_after_forward,
                                             parallel.activation_checkpointing)
            self.forward_model = model
        else:
            if expert_parallel and info.enabled:
                self.local_experts = shard_experts(model, info.rank, info.world_size)
            self.forward_model = wrap_data_parallel(model, info, ignore=self.local_experts)
        self.ep = (self.mesh.ep if self.mesh is not None else info.world_size) if self.local_experts else 1
        layers = [i for i, block in enumerate(model.model.layers) if hasattr(block.mlp, "experts")]
        moe_index = {layer: j for j, layer in enumerate(layers)}
        # (MoE layer j, expert e, parameter) for the routed experts this rank optimizes
        self.expert_params = [(moe_index[int(m[1])], int(m[2]), p) for n, p in model.named_parameters()
                              if (m := EXPERT_PARAM.match(n))]

    def describe(self) -> dict[str, Any]:
        if self.fsdp:
            return {"layout": "fsdp2", "dp_shard": self.info.world_size, "ep": self.ep,
                    "param_dtype": str(self.param_dtype).removeprefix("torch.")}
        return {"layout": "ddp" if self.info.enabled else "single", "world": self.info.world_size, "ep": self.ep}

    def sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager[Any]:
        """DDP: all-reduce gradients on the last micro-batch only. FSDP2 reduce-scatters every micro-batch into the
        sharded gradient (no unsharded gradient is kept between micro-batches)."""
        if self.info.enabled and not self.fsdp and not last_micro_batch:
            return self.forward_model.no_sync()
        return contextlib.nullcontext()

    def eval_mode(self) -> contextlib.AbstractContextManager[Any]:
        """Evaluation forwards. FSDP2 refills gathered parameters without moving their version counters, so the
        model's inference-only weight caches (built under no_grad) could go stale: FSDP2 evaluates with grad on."""
        return torch.enable_grad() if self.fsdp else torch.no_grad()

    @torch.no_grad()
    def drop_idle_expert_grads(self, load: torch.Tensor) -> None:
        """Experts no token reached in the global batch (load [moe layers, E], all-reduced) get no gradient, as in one
        process; FSDP2 reduce-scatters zeros for them (every rank of a unit must reduce the same tensors)."""
        for j, e, p in self.expert_params:
            if load[j, e] == 0:
                p.grad = None

    def _grads(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                yield name, p.grad

    @torch.no_grad()
    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Scale gradients to a global L2 norm <= max_norm; return the norm before clipping."""
        if not self.local_experts and not self.fsdp:
            return torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], max_norm)
        grads = [(n, g.to_local() if isinstance(g, DTensor) else g) for n, g in self._grads()]
        if self.fsdp:  # every element lives on exactly one rank: the sum of the local squares, summed over ranks
            sq = torch.zeros((), dtype=torch.float64, device=self.info.device)
            for _, g in grads:
                sq += g.double().square().sum()
            norm = all_reduce_(sq, self.info).sqrt().float().cpu()
        else:  # data parallel + experts: replicated gradients are equal on every rank, an expert's is on one rank
            local = set(self.local_experts)
            for n, g in grads:  # summed over every rank's loss by the all-to-all backward; DDP averages the rest
                if n in local:
                    g.div_(self.info.world_size)
            sq = torch.zeros((), dtype=torch.float64)
            sq_experts = torch.zeros((), dtype=torch.float64)
            for n, g in grads:
                if n in local:
                    sq_experts += g.double().square().sum().cpu()
                else:
                    sq += g.double().square().sum().cpu()
            norm = (sq + all_reduce_(sq_experts, self.info)).sqrt().float()
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for _, g in grads:
                g.mul_(coef.to(g))
        return norm
