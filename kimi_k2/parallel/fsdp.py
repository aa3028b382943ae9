"""FSDP2 (`torch.distributed.fsdp.fully_shard`) over a `TrainMesh`, with the routed experts expert-parallel.

Sharding (ZeRO-3): each parameter is a DTensor sharded by rows (Shard(0)) over its mesh; a module's parameters are
all-gathered just before its forward (and again in backward) and its gradients reduce-scattered right after.
Units, innermost first:
    each MoE block's LocalExperts   over mesh.efsdp (the ranks holding the same experts), one all-gather per forward
    each decoder Block              over mesh.dp (all ranks): attention, router, shared experts, dense MLP, norms
    the root                        over mesh.dp: embeddings, final norm, lm_head
Gradients: FSDP averages over the unit's ranks. Non-expert parameters see each rank's loss once, so the average over
the N ranks is the global mean. A routed expert's gradient already arrives summed over its ep ranks through the
all-to-all backward, so its unit divides by N instead of N / ep. Experts a rank's tokens never reach get a zero
gradient in the reduce-scatter (every rank of a unit must reduce the same tensors).
Mixed precision: the sharded (master) parameters stay fp32, the gathered copies the forward and backward use are
`param_dtype`, gradients are reduced in fp32 (`MixedPrecisionPolicy`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from kimi_k2.checkpoint import CheckpointError, CheckpointReader, Slice
from kimi_k2.parallel.expert import ExpertParallelMoE, shard_experts
from kimi_k2.parallel.world import TrainMesh


def parallelize(model: nn.Module, mesh: TrainMesh, param_dtype: torch.dtype = torch.float32,
                reshard_after_forward: bool = True, activation_checkpointing: bool = False) -> list[str]:
    """Make `model` (a K2ForCausalLM, materialized or on the meta device) expert parallel and FSDP2-sharded in place
    -> the names of this rank's routed-expert parameters."""
    local_experts = shard_experts(model, mesh.ep_rank, mesh.ep, mesh.ep_group)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.model.layers:
        if activation_checkpointing:
            checkpoint_activations(block)
        if isinstance(block.mlp, ExpertParallelMoE):
            experts = fully_shard(block.mlp.experts, mesh=mesh.efsdp, mp_policy=policy,
                                  reshard_after_forward=reshard_after_forward)
            if mesh.efsdp.size() != mesh.world:  # the all-to-all already summed over the ep ranks
                experts.set_gradient_divide_factor(float(mesh.world))
                # a divide factor otherwise needs PREMUL_SUM (NCCL only); on one rank torch 2.13 would divide twice
                experts.set_force_sum_reduction_for_comms(mesh.efsdp.size() > 1)
            experts.set_reduce_scatter_unused_params(True)
        fully_shard(block, mesh=mesh.dp, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh.dp, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return local_experts


def checkpoint_activations(block: nn.Module) -> None:
    """Keep only the block's input for backward and recompute its forward there (torch.utils.checkpoint,
    non-reentrant). The forward is patched on the instance, so parameter names stay the checkpoint's; the recompute
    repeats the block's collectives (all-to-all, FSDP all-gathers) on every rank alike."""
    forward = block.forward

    def checkpointed(*args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def row_counts(rows: int, world: int) -> list[int]:
    """Rows of each rank's Shard(0) piece of a tensor with `rows` rows (torch.chunk's split: ceil(rows / world) each,
    the last ones short or empty)."""
    per = -(-rows // world) if rows else 0
    return [max(0, min(per, rows - r * per)) for r in range(world)]


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's rows of `t`, the global index of the first): a plain tensor is all its rows; a DTensor must be
    row-sharded over a 1-D mesh (as FSDP2 shards) or replicated."""
    if not isinstance(t, DTensor):
        return t, 0
    if t.device_mesh.ndim != 1:
        raise ValueError(f"expected a DTensor on a 1-D mesh, got mesh {t.device_mesh}")
    local = t.to_local()
    if not isinstance(t.placements[0], Shard):
        return local, 0
    if t.placements[0].dim != 0:
        raise ValueError(f"expected a row-sharded (Shard(0)) DTensor, got {t.placements}")
    counts = row_counts(t.shape[0], t.device_mesh.size())
    return local, sum(counts[: t.device_mesh.get_local_rank()])


def shard_group(t: torch.Tensor) -> dist.ProcessGroup | None:
    """The process group `t`'s rows are split over; None for a plain (whole, or replicated) tensor."""
    if isinstance(t, DTensor) and isinstance(t.placements[0], Shard):
        return t.device_mesh.get_group(0)
    return None


def load_sharded(model: nn.Module, directory: str) -> list[str]:
    """Fill a model sharded on the meta device and then materialized (`parallelize`, `to_empty`) from an HF
    checkpoint: each rank reads only the rows it holds of each tensor (block-FP8: the 128-row blocks holding them,
    dequantized) and only its own routed experts -> the tensor names read. Nothing is gathered."""
    reader = CheckpointReader(directory)
    outs: dict[str, torch.Tensor] = {}
    parts: dict[str, Slice] = {}
    for name, t in model.state_dict().items():
        if name not in reader:
            raise CheckpointError(f"checkpoint {directory} lacks {name}")
        if tuple(t.shape) != reader.shape(name):
            raise CheckpointError(f"shape mismatch for {name}: checkpoint {reader.shape(name)}, model {tuple(t.shape)}")
        local, start = local_rows(t)
        if local.numel():
            outs[name] = local
            if isinstance(t, DTensor):
                parts[name] = Slice(0, start, start + local.shape[0])
    reader.read_into(outs, parts)
    return list(outs)


def stream_full_state_dict(model: nn.Module, names: list[str]) -> Iterator[tuple[str, torch.Tensor | None]]:
    """The full tensors of `model`'s state dict, one at a time, in the order of `names` (the unsharded model's):
    (name, tensor) on rank 0, (name, None) elsewhere. Every rank must consume the whole iterator.

    A row-sharded tensor is all-gathered by the ranks holding it (`full_tensor`); a tensor rank 0 does not hold (a
    routed expert of another expert-parallel rank) is sent to it by the lowest rank holding it. Rank 0 so holds one
    full tensor at a time, never the whole model.
    """
    local = model.state_dict()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    meta = {n: (tuple(t.shape), t.dtype) for n, t in local.items()}
    every: list[dict[str, tuple[tuple[int, ...], torch.dtype]]] = [meta]
    if world > 1:
        every = [{} for _ in range(world)]
        dist.all_gather_object(every, meta)
    for name in names:
        holders = [r for r in range(world) if name in every[r]]
        if not holders:
            raise KeyError(f"no rank holds {name}")
        full = None
        if rank in holders:
            t = local[name]
            full = t.full_tensor() if isinstance(t, DTensor) else t
        if holders[0] != 0:
            if rank == holders[0]:
                dist.send(full.contiguous(), dst=0)
            elif rank == 0:
                shape, dtype = every[holders[0]][name]
                full = torch.empty(shape, dtype=dtype, device=next(iter(local.values())).device)
                dist.recv(full, src=holders[0])
        yield name, (full.detach() if rank == 0 else None)
