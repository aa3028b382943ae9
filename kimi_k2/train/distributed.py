"""Data parallelism over `torch.distributed` as launched by `torchrun` (gloo on CPU, NCCL on GPU).

Every rank holds the full model and optimizer (or, with expert parallelism, its slice of the routed experts: see
expert_parallel.py); gradients are averaged by DDP, so Muon's Newton-Schulz runs on full (all-reduced) matrices, the
quantity Distributed Muon (Moonlight §2.3) reconstructs with its DP gather; an expert's matrices live whole on its
owner rank.
Single node:  torchrun --nproc-per-node N -m kimi_k2.cli train --config recipe.toml
Multi node:   torchrun --nnodes M --node-rank R --nproc-per-node N --rdzv-backend c10d \
                  --rdzv-endpoint HOST0:29500 -m kimi_k2.cli train --config recipe.toml
Checkpoints are written by rank 0 (by every rank under expert parallelism) into train.out_dir, so across machines
out_dir must be on a filesystem every node sees for a run to resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment; a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local)


def wrap_data_parallel(model: torch.nn.Module, info: DistInfo, ignore: list[str] | None = None) -> torch.nn.Module:
    """DDP over all ranks, except the parameters named in `ignore` (rank-local experts under expert parallelism).

    Routed experts a rank's tokens never reach have no gradient there: find_unused_parameters.

    Buffers are synced once at construction, not every forward: the only mutable buffer, e_score_correction_bias,
    is updated identically on every rank from the all-reduced expert load.
    """
    if not info.enabled:
        return model
    if ignore:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    return DistributedDataParallel(model, find_unused_parameters=True, forward_sync_buffers=False)


def all_reduce_(t: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
